//! The command line: --help, serial back ends, and one clear line with the right
//! exit status for every bad input.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::asm::Guest;
use common::image::{self, Segment};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

fn hello_kernel(dir: &std::path::Path) -> std::path::PathBuf {
    let mut g = Guest::new(32);
    g.print("hello from the guest\n");
    g.poweroff();
    common::pvh_kernel(dir, "hello.elf", g, vec![])
}

/// Asserts a usage or runtime error: no output, one line on stderr mentioning `needle`.
fn assert_error(run: &common::Run, status: i32, needle: &str) {
    assert_eq!(run.status, status, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "stderr should mention {needle:?}: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
}

fn one_line(run: &common::Run) {
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "want one line: {}",
        run.stderr
    );
}

#[test]
fn help_documents_every_flag() {
    let run = common::run(&["--help"]);
    assert_eq!(run.status, 0);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--vcpus",
        "--serial",
        "--api-socket",
        "--exit-file",
        "--log-level",
        "--name",
    ] {
        assert!(
            run.stdout.contains(flag),
            "--help lacks {flag}:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("[default: 256]"), "{}", run.stdout);
}

#[test]
fn missing_or_unreadable_kernels_are_usage_errors() {
    let dir = common::tempdir();
    let run = common::run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_error(&run, 2, "/nonexistent/vmlinux");
    one_line(&run);

    let run = common::run(&["--kernel", dir.path().to_str().unwrap()]);
    assert_error(&run, 2, "not a regular file");
    one_line(&run);

    let junk = image::write(dir.path(), "junk", &[0x42; 4096]);
    let run = common::run(&["--kernel", junk.to_str().unwrap()]);
    assert_error(&run, 2, "not a kernel image");
    one_line(&run);

    // An ELF whose segment lies outside guest memory.
    let far = image::elf(
        &[Segment {
            addr: 0x4000_0000,
            data: vec![0x90; 16],
        }],
        0x4000_0000,
        None,
    );
    let far = image::write(dir.path(), "far.elf", &far);
    let run = common::run(&["--kernel", far.to_str().unwrap(), "--memory", "32"]);
    assert_error(&run, 2, "cannot load");
    one_line(&run);

    let run = common::run(&[
        "--kernel",
        hello_kernel(dir.path()).to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_error(&run, 2, "--initrd /nonexistent/initrd");
}

#[test]
fn impossible_memory_and_vcpu_counts_are_usage_errors() {
    let dir = common::tempdir();
    let k = hello_kernel(dir.path());
    let k = k.to_str().unwrap();
    let run = common::run(&["--kernel", k, "--memory", "0"]);
    assert_error(&run, 2, "--memory");
    one_line(&run);
    let run = common::run(&["--kernel", k, "--memory", "100000000"]);
    assert_error(&run, 2, "more than this host has");
    one_line(&run);
    let run = common::run(&["--kernel", k, "--vcpus", "0"]);
    assert_error(&run, 2, "--vcpus");
    let run = common::run(&["--kernel", k, "--vcpus", "100000"]);
    assert_error(&run, 2, "more than KVM allows");
    one_line(&run);
    let run = common::run(&["--kernel", k, "--memory", "lots"]);
    assert_error(&run, 2, "--memory");
    let run = common::run(&["--kernel", k, "--serial", "tcp:1"]);
    assert_error(&run, 2, "--serial");
    let run = common::run(&["--kernel", k, "--serial", "file=/nonexistent/dir/log"]);
    assert_error(&run, 2, "/nonexistent/dir/log");
    let run = common::run(&["--memory", "64"]);
    assert_error(&run, 2, "--kernel");
}

#[test]
fn no_dev_kvm_is_a_runtime_error() {
    let dir = common::tempdir();
    let k = hello_kernel(dir.path());
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" --kernel \"$1\"",
        ])
        .arg(common::ferrovmm_bin())
        .arg(&k)
        .output_within(TOOL_TIMEOUT)
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
    assert!(stderr.contains("kvm module"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn no_permission_on_dev_kvm_is_a_runtime_error() {
    let dir = common::tempdir();
    let k = hello_kernel(dir.path());
    // Copy the binary where an unprivileged user can run it.
    let bin = dir.path().join("ferrovmm");
    std::fs::copy(common::ferrovmm_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Whatever the host's /dev/kvm mode: in a private mount namespace, a copy of the device
    // node owned by root with mode 0600 stands in its place, so uid 65534 is refused for sure.
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(
            "set -e; mknod \"$2/kvm\" c 10 232; chmod 600 \"$2/kvm\"; \
             mount --bind \"$2/kvm\" /dev/kvm; \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" --kernel \"$1\"",
        )
        .arg(&bin)
        .arg(&k)
        .arg(dir.path())
        .output_within(TOOL_TIMEOUT)
        .expect("unshare and setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("cannot open /dev/kvm: Permission denied"),
        "{stderr}"
    );
    assert!(stderr.contains("kvm group"), "{stderr}");
}

#[test]
fn serial_to_a_file() {
    let dir = common::tempdir();
    let k = hello_kernel(dir.path());
    let log = dir.path().join("console.log");
    let run = common::run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hello from the guest\n"
    );
}

#[test]
fn serial_on_a_socket_reaches_a_connected_client() {
    // The guest waits for a byte of input, then greets and powers off.
    let mut g = Guest::new(32);
    let mut poll = g.label();
    g.set(&mut poll);
    g.a.mov(iced_x86::code_asm::dx, 0x3fd).unwrap();
    g.a.in_(iced_x86::code_asm::al, iced_x86::code_asm::dx)
        .unwrap();
    g.a.test(iced_x86::code_asm::al, 1).unwrap();
    g.a.jz(poll).unwrap();
    g.print("hello socket\n");
    g.poweroff();
    let dir = common::tempdir();
    let k = common::pvh_kernel(dir.path(), "wait.elf", g, vec![]);
    let sock = dir.path().join("console.sock");
    let child = common::spawn(&[
        "--kernel",
        k.to_str().unwrap(),
        "--serial",
        &format!("socket={}", sock.display()),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Ok(c) = UnixStream::connect(&sock) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "console socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    use std::io::Write;
    client.write_all(b"x").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = String::new();
    let _ = client.read_to_string(&mut got);
    let run = common::wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(got, "hello socket\n");
    assert!(!sock.exists(), "console socket removed at exit");
}

#[test]
fn bad_disk_and_net_arguments_fail_before_the_guest_starts() {
    let dir = common::tempdir();
    let k = hello_kernel(dir.path());
    let k = k.to_str().unwrap();
    let run = common::run(&["--kernel", k, "--disk", "path=/nonexistent/disk.img"]);
    assert_error(&run, 2, "/nonexistent/disk.img");
    one_line(&run);

    let ro = image::write(dir.path(), "ro.img", &[0u8; 1 << 20]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let run = common::run(&["--kernel", k, "--disk", &format!("path={}", ro.display())]);
    assert_error(&run, 2, "readonly=on");
    one_line(&run);
    // With readonly=on the same file is fine.
    let run = common::run(&[
        "--kernel",
        k,
        "--disk",
        &format!("path={},readonly=on", ro.display()),
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);

    let run = common::run(&[
        "--kernel",
        k,
        "--disk",
        &format!("path={},format=vmdk", ro.display()),
    ]);
    assert_error(&run, 2, "unknown image format");
    let raw = image::write(dir.path(), "raw.img", &[0u8; 1 << 20]);
    let run = common::run(&[
        "--kernel",
        k,
        "--disk",
        &format!("path={},format=qcow2", raw.display()),
    ]);
    assert_error(&run, 2, "--disk");
    one_line(&run);

    let run = common::run(&["--kernel", k, "--net", "tap=ferro-no-such0"]);
    assert_error(&run, 2, "does not exist");
    one_line(&run);
    let run = common::run(&["--kernel", k, "--net", "tap=tap0,mac=52:54:00:zz:00:01"]);
    assert_error(&run, 2, "MAC");
    let run = common::run(&["--kernel", k, "--net", "fd=97"]);
    assert_error(&run, 2, "not open");
    let run = common::run(&["--kernel", k, "--net", "fd=0"]);
    assert_error(&run, 2, "fd=0");
    // A descriptor that is open but is no TAP (stderr, dup'ed by the shell).
    let out = Command::new("sh")
        .args(["-c", "exec \"$0\" --kernel \"$1\" --net fd=5 5>/dev/null"])
        .arg(common::ferrovmm_bin())
        .arg(k)
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a TAP"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Live (not zombie) processes whose command line mentions `needle`.
fn live_processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        if !status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn the_teardown_helper_never_outlives_the_vm() {
    let dir = common::tempdir();
    let k = hello_kernel(dir.path());
    let k = k.to_str().unwrap();
    for _ in 0..40 {
        let run = common::run(&["--kernel", k, "--vcpus", "2", "--memory", "32"]);
        assert_eq!(run.status, 0, "{}", run.stderr);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = live_processes_with(k);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// xorshift64*: seeded, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick(&mut self, items: &[String]) -> String {
        items[self.below(items.len())].clone()
    }
}

#[test]
fn randomized_command_lines_end_in_a_clear_status_never_a_panic() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let seed = ferrovirt_testkit::seed_from_env("FERROVMM_CLI_FUZZ_SEED");
    let count = ferrovirt_testkit::count_from_env("FERROVMM_CLI_FUZZ_COUNT", 60);
    println!("CLI fuzz: seed {seed} ({count} runs); replay with FERROVMM_CLI_FUZZ_SEED={seed}");
    let dir = common::tempdir();
    let kernel = hello_kernel(dir.path());
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let k = kernel.to_string_lossy().into_owned();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let numbers = s(&[
        "0",
        "1",
        "7",
        "8",
        "16",
        "32",
        "-1",
        "4294967296",
        "18446744073709551615",
        "99999999999999999999",
        "1e3",
        "0x10",
        "",
        " 16",
    ]);
    let disk_path = disk.to_string_lossy().into_owned();
    let disks: Vec<String> = vec![
        format!("path={disk_path}"),
        format!("path={disk_path},format=qcow2"),
        format!("path={disk_path},format=raw,readonly=on,serial=s1,cache=none"),
        format!("path={disk_path},serial={}", "x".repeat(30)),
        format!("path={disk_path},cache=bogus"),
        format!("path={k},format=qcow2"),
        "path=".into(),
        "path=/dev/null".into(),
        format!("path={}", dir.path().display()),
        format!("path={}", d("missing.img")),
        "format=raw".into(),
        ",,,".into(),
        "path=a,path=b".into(),
    ];
    let nets = s(&[
        "tap=lo",
        "tap=",
        "tap=waytoolonginterfacename",
        "fd=0",
        "fd=3",
        "fd=2147483647",
        "fd=-5",
        "tap=fvnotthere0,mac=52:54:00:00:00:01",
        "tap=t,mac=ff:ff:ff:ff:ff:ff",
        "mac=52:54:00:00:00:01",
        "tap=a,fd=4",
    ]);
    let long = format!("/tmp/{}", "p".repeat(200));
    let serials: Vec<String> = vec![
        "stdio".into(),
        "none".into(),
        format!("file={}", d("serial.log")),
        format!("file={}", d("no/such/dir/serial.log")),
        format!("socket={}", d("s.sock")),
        format!("socket={long}"),
        "file=".into(),
        "tcp:1".into(),
    ];
    let consoles = s(&["off", "stdio", "none", "socket=/x", "bogus"]);
    let names: Vec<String> = vec![
        "vm".into(),
        "".into(),
        "-dash".into(),
        "a\tb".into(),
        "n".repeat(65),
        "ünï".into(),
    ];
    let mut rng = Rng(seed);
    for run in 0..count {
        let mut args: Vec<OsString> = vec!["--name".into(), rng.pick(&names).into()];
        args.push("--kernel".into());
        args.push(match rng.below(6) {
            0 => d("missing-kernel").into(),
            1 => dir.path().as_os_str().to_owned(),
            2 => OsString::from_vec(vec![b'/', 0xff, 0xfe]),
            _ => k.clone().into(),
        });
        args.extend([
            "--serial".into(),
            "none".into(),
            "--memory".into(),
            "16".into(),
        ]);
        for _ in 0..rng.below(6) {
            let (flag, value): (&str, Option<String>) = match rng.below(11) {
                0 => ("--memory", Some(rng.pick(&numbers))),
                1 => ("--vcpus", Some(rng.pick(&numbers))),
                2 => ("--disk", Some(rng.pick(&disks))),
                3 => ("--net", Some(rng.pick(&nets))),
                4 => ("--serial", Some(rng.pick(&serials))),
                5 => ("--console", Some(rng.pick(&consoles))),
                6 => ("--cmdline", Some("c".repeat(rng.below(5000)))),
                7 => (
                    "--log-level",
                    Some(rng.pick(&s(&["debug", "LOUD", "off", ""]))),
                ),
                8 => (
                    "--api-socket",
                    Some(rng.pick(&[d("api.sock"), long.clone()])),
                ),
                9 => ("--rng", None),
                _ => ("--bogus", None),
            };
            args.push(flag.into());
            if let Some(v) = value {
                args.push(v.into());
            }
        }
        if rng.below(4) == 0 {
            // A flag without its value, at the end.
            args.push("--disk".into());
        }
        let child = Command::new(common::ferrovmm_bin())
            .args(&args)
            .arg("--exit-file")
            .arg(dir.path().join("exit.json"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ferrovmm");
        let result = common::wait_with_timeout(child, Duration::from_secs(30));
        assert!(
            [0, 1, 2].contains(&result.status) && !result.stderr.contains("panicked"),
            "seed {seed}, run {run}: {args:?} ended with status {} (-1: a signal)\nstderr: {}",
            result.status,
            result.stderr
        );
        let _ = std::fs::remove_file(dir.path().join("s.sock"));
        let _ = std::fs::remove_file(dir.path().join("api.sock"));
    }
}
