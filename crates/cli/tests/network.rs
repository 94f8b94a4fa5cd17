//! End-to-end tests of virtual networks: a real ferrovirtd inside a network namespace the test
//! creates (so the host's networking is never touched), real dnsmasq, nftables and bridges, and
//! real QEMU (TCG) guests running busybox's udhcpc.
//!
//! Topology per test: namespace `inner` runs the daemon; a veth pair links it to namespace
//! `outer` (10.99.N.2), the "outside world", where a TCP server tells each client its source
//! address — so a guest behind NAT sees the inner namespace's uplink address.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrovirt_testkit::{guest_kernel, linux_guest_script, scratch_dir};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

static COUNTER: AtomicU32 = AtomicU32::new(0);
const BOOT: Duration = Duration::from_secs(120);

fn cli_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovirt"))
}

fn daemon_binary() -> PathBuf {
    let p = cli_binary().with_file_name("ferrovirtd");
    assert!(
        p.is_file(),
        "{} is missing: build the daemon first (cargo build -p ferrovirtd)",
        p.display()
    );
    p
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output_within(TOOL_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn require_tools() {
    for (tool, pkg) in [
        ("nft", "nftables"),
        ("dnsmasq", "dnsmasq-base"),
        ("ip", "iproute2"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).is_file();
        assert!(found, "{tool} is missing: apt-get install {pkg}");
    }
}

/// The namespaces, the daemon inside `inner`, and its folders. Everything goes on drop.
struct World {
    n: u32,
    /// The inner namespace's net.ipv4.ip_forward before the daemon ran: what it must restore.
    forward_at_start: bool,
    inner: String,
    outer: String,
    dir: PathBuf,
    daemon: Option<Child>,
}

impl World {
    fn new() -> World {
        World::with_ip_forward(false)
    }

    /// A new namespace inherits IPv4 forwarding from the host (or not, by
    /// net.core.devconf_inherit_init_net): set it, so the test knows what the daemon must restore.
    fn with_ip_forward(on: bool) -> World {
        require_tools();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let w = World {
            n,
            forward_at_start: on,
            inner: format!("fvnet-in-{id}"),
            outer: format!("fvnet-out-{id}"),
            dir: PathBuf::from(format!("/tmp/fvn-{id}")),
            daemon: None,
        };
        let _ = fs::remove_dir_all(&w.dir);
        fs::create_dir_all(&w.dir).unwrap();
        sh(&["ip", "netns", "add", &w.inner]);
        sh(&["ip", "netns", "add", &w.outer]);
        let (up_in, up_out) = (format!("fvup{n}a"), format!("fvup{n}b"));
        w.inner(&["ip", "link", "set", "lo", "up"]);
        w.outer(&["ip", "link", "set", "lo", "up"]);
        w.inner(&[
            "ip", "link", "add", &up_in, "type", "veth", "peer", "name", &up_out, "netns", &w.outer,
        ]);
        w.inner(&[
            "ip",
            "addr",
            "add",
            &format!("10.99.{n}.1/24"),
            "dev",
            &up_in,
        ]);
        w.inner(&["ip", "link", "set", &up_in, "up"]);
        w.inner(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.99.{n}.2"),
        ]);
        w.outer(&[
            "ip",
            "addr",
            "add",
            &format!("10.99.{n}.2/24"),
            "dev",
            &up_out,
        ]);
        w.outer(&["ip", "link", "set", &up_out, "up"]);
        w.inner(&[
            "sh",
            "-c",
            &format!("echo {} > /proc/sys/net/ipv4/ip_forward", u8::from(on)),
        ]);
        assert_eq!(w.ip_forward(), on, "ip_forward set in {}", w.inner);
        w
    }

    fn ip_forward(&self) -> bool {
        self.inner(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim() == "1"
    }

    fn inner(&self, cmd: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.inner];
        a.extend_from_slice(cmd);
        String::from_utf8_lossy(&sh(&a).stdout).into_owned()
    }

    fn outer(&self, cmd: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.outer];
        a.extend_from_slice(cmd);
        String::from_utf8_lossy(&sh(&a).stdout).into_owned()
    }

    fn outside_addr(&self) -> String {
        format!("10.99.{}.2", self.n)
    }
    fn uplink_addr(&self) -> String {
        format!("10.99.{}.1", self.n)
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("run/ferrovirtd.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Start ferrovirtd inside the inner namespace (a first start defines `default`).
    fn start_daemon(&mut self) {
        let _ = fs::remove_file(self.socket());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.inner])
            .arg(daemon_binary())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .env_remove("FERROVIRT_NO_DEFAULT_NETWORK")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ferrovirtd");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "ferrovirtd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(cli_binary())
            .arg("-c")
            .arg(self.socket())
            .args(args)
            .output_within(TOOL_TIMEOUT)
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "ferrovirt {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(!out.status.success(), "ferrovirt {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn console(&self, vm: &str) -> String {
        fs::read_to_string(self.dir.join(format!("state/logs/{vm}.log"))).unwrap_or_default()
    }

    fn wait_console(&self, vm: &str, marker: &str) {
        let deadline = Instant::now() + BOOT;
        while !self.console(vm).contains(marker) {
            assert!(
                Instant::now() < deadline,
                "no '{marker}' from {vm}; console:\n{}\ndaemon log:\n{}",
                self.console(vm),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What of ours exists in the inner namespace: (bridges/TAPs by name, nft tables, dnsmasq pids).
    fn census(&self) -> (Vec<String>, Vec<String>, Vec<u32>) {
        let links: Vec<String> = self
            .inner(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or("").to_string())
            .filter(|n| n.starts_with("fv") && !n.starts_with("fvup"))
            .collect();
        let tables: Vec<String> = self
            .inner(&["nft", "list", "tables"])
            .lines()
            .map(|l| l.trim().to_string())
            .collect();
        let conf_prefix = format!("--conf-file={}/", self.run_dir().join("networks").display());
        let dnsmasq: Vec<u32> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let zombie = status
                    .lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'));
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !zombie
                    && cmd
                        .split(|b| *b == 0)
                        .any(|a| a.starts_with(conf_prefix.as_bytes()))
            })
            .collect();
        (links, tables, dnsmasq)
    }

    /// A TCP server in the outer namespace answering "PEER <client address>".
    fn outside_server(&self, port: u16) {
        let ns = fs::File::open(format!("/run/netns/{}", self.outer)).unwrap();
        let addr = format!("{}:{port}", self.outside_addr());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace file descriptor.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into the outer namespace");
            let listener = TcpListener::bind(&addr).expect("bind the outside server");
            tx.send(()).unwrap();
            for conn in listener.incoming().flatten() {
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let mut conn = conn;
                let _ = writeln!(conn, "PEER {peer}");
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Stop VMs (QEMU processes live in the namespace too), then the daemon, then the namespaces.
        if self.socket().exists() && self.daemon.is_some() {
            let list = self.cmd(&["list", "--name-only"]);
            let _ = list;
            for vm in ["vm1", "isoa", "isob", "inst"] {
                let _ = self.cmd(&["destroy", vm]);
            }
        }
        self.kill9();
        for pid in self.census().2 {
            // SAFETY: kill(2) of a dnsmasq this test's daemon started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.inner])
            .status_within(TOOL_TIMEOUT);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.outer])
            .status_within(TOOL_TIMEOUT);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const UDHCPC_SCRIPT: &str = "#!/bin/sh
case \"$1\" in
bound|renew)
  ip addr flush dev \"$interface\"
  ip addr add \"$ip/$mask\" dev \"$interface\"
  [ -n \"$router\" ] && ip route add default via \"${router%% *}\"
  echo \"LEASE $ip\"
  ;;
esac
exit 0
";

/// A guest kernel + initramfs whose init brings eth0 up with DHCP and runs `body`, then idles.
fn guest(dir: &Path, name: &str, body: &str) -> (PathBuf, PathBuf) {
    let kernel = guest_kernel().expect("guest kernel (guest/fetch-kernel.sh)");
    let script = format!(
        "ip link set lo up\nip link set eth0 up\n\
         udhcpc -i eth0 -s /etc/udhcpc.script -q -t 20 -T 1 -x hostname:{name} || echo DHCP-FAILED\n\
         {body}\necho GUEST-DONE\nsleep 600\n"
    );
    let initrd = linux_guest_script(&script)
        .bytes("/etc/udhcpc.script", 0o755, UDHCPC_SCRIPT)
        .modules(&["virtio_pci", "virtio_net"])
        .build(dir.join(format!("{name}.cpio.gz")))
        .expect("initramfs");
    (kernel.bzimage.clone(), initrd)
}

/// `ferrovirt install` arguments for a direct-kernel-boot qemu guest without disks.
fn install_args(w: &World, name: &str, networks: &[&str]) -> Vec<String> {
    let (kernel, initrd) = guest(&w.dir, name, "");
    let mut a: Vec<String> = [
        "install",
        "--name",
        name,
        "--virt-type",
        "qemu",
        "--memory",
        "160",
        "--disk",
        "none",
        "--noautoconsole",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--boot".into());
    a.push(format!(
        "kernel={},initrd={},kernel_args=console=ttyS0 no_timer_check",
        kernel.display(),
        initrd.display()
    ));
    for n in networks {
        a.push(format!("--network={n}"));
    }
    a
}

fn vm_def(w: &World, name: &str, network: &str, mac: &str, body: &str) -> String {
    let (kernel, initrd) = guest(&w.dir, name, body);
    w.file(
        &format!("{name}.toml"),
        &format!(
            "name = \"{name}\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 160\n\
             [os]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet no_timer_check\"\n\
             [[interface]]\ntype = \"network\"\nsource = \"{network}\"\nmac = \"{mac}\"\n",
            kernel.display(),
            initrd.display()
        ),
    )
}

#[test]
fn default_network_gives_dhcp_nat_and_leaves_nothing_behind() {
    let mut w = World::new();
    let _scratch = scratch_dir("ferrovirt-net").unwrap();
    w.start_daemon();
    let list = w.ok(&["net-list"]);
    assert!(
        list.contains("default") && list.contains("active"),
        "default network autostarted:\n{list}"
    );
    let (links, tables, dns) = w.census();
    assert_eq!(links, vec!["fvbr0".to_string()]);
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert!(
        tables[0].starts_with("table ip ferrovirt_default_"),
        "{tables:?}"
    );
    assert_eq!(dns.len(), 1, "one dnsmasq");
    assert!(w
        .inner(&["ip", "-4", "addr", "show", "fvbr0"])
        .contains("192.168.123.1/24"));
    assert!(w.ip_forward(), "a NAT network turns forwarding on");

    w.outside_server(8080);
    let body = format!(
        "ping -c 2 -W 3 192.168.123.1 && echo PING-BRIDGE-OK\n\
         nc {} 8080 </dev/null\n",
        w.outside_addr()
    );
    let def = vm_def(&w, "vm1", "default", "52:54:00:12:34:56", &body);
    w.ok(&["define", &def]);
    w.ok(&["start", "vm1"]);
    let iflist = w.ok(&["domiflist", "vm1"]);
    assert!(
        iflist.contains("network")
            && iflist.contains("default")
            && iflist.contains("52:54:00:12:34:56"),
        "{iflist}"
    );
    let tap = iflist
        .lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(tap.starts_with("fv"), "{iflist}");
    assert!(
        w.inner(&["ip", "-o", "link", "show", &tap])
            .contains("master fvbr0"),
        "TAP {tap} is on the bridge"
    );

    w.wait_console("vm1", "GUEST-DONE");
    let console = w.console("vm1");
    assert!(console.contains("LEASE 192.168.123."), "{console}");
    assert!(console.contains("PING-BRIDGE-OK"), "{console}");
    assert!(
        console.contains(&format!("PEER {}", w.uplink_addr())),
        "the outside server saw the guest NATed to the uplink address:\n{console}"
    );
    let leases = w.ok(&["net-dhcp-leases", "default"]);
    assert!(
        leases.contains("52:54:00:12:34:56")
            && leases.contains("192.168.123.")
            && leases.contains("vm1"),
        "{leases}"
    );
    let addr = w.ok(&["domifaddr", "vm1"]);
    assert!(
        addr.contains(&tap) && addr.contains("ipv4") && addr.contains("192.168.123."),
        "{addr}"
    );

    // kill -9 of the daemon with a VM and the network up; a new daemon adopts, never duplicates,
    // and leaves alone what is not its own: the host's devices and tables, and objects marked
    // by another daemon (same network name, another uuid).
    w.kill9();
    let foreign = [
        ("fvdeadbeefn0", "ferrovirt:tap:ghost@default:0badf00d"),
        ("fvforeign0", "ferrovirt:net:default:0badf00d"),
    ];
    w.inner(&["ip", "tuntap", "add", "dev", "fvdeadbeefn0", "mode", "tap"]);
    w.inner(&["ip", "link", "add", "fvforeign0", "type", "bridge"]);
    for (dev, alias) in foreign {
        w.inner(&["ip", "link", "set", "dev", dev, "alias", alias]);
    }
    w.inner(&["ip", "tuntap", "add", "dev", "fvhostown0", "mode", "tap"]);
    w.inner(&["nft", "add", "table", "ip", "ferrovirt_default_0badf00d"]);
    w.inner(&["nft", "add", "table", "ip", "hostfilter"]);
    w.start_daemon();
    let tables = w.inner(&["nft", "list", "tables"]);
    assert!(
        tables.contains("ferrovirt_default_0badf00d") && tables.contains("hostfilter"),
        "{tables}"
    );
    w.inner(&["nft", "delete", "table", "ip", "hostfilter"]);
    w.inner(&["nft", "delete", "table", "ip", "ferrovirt_default_0badf00d"]);
    for dev in ["fvdeadbeefn0", "fvforeign0", "fvhostown0"] {
        w.inner(&["ip", "link", "del", dev]);
    }
    let (links, tables, dns) = w.census();
    let mut want = vec!["fvbr0".to_string(), tap.clone()];
    want.sort();
    let mut links = links;
    links.sort();
    assert_eq!(links, want, "exactly one bridge and one TAP:\n{}", w.log());
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert!(
        tables[0].starts_with("table ip ferrovirt_default_"),
        "{tables:?}"
    );
    assert_eq!(dns.len(), 1, "exactly one dnsmasq:\n{}", w.log());
    assert!(w.ok(&["domifaddr", "vm1"]).contains("192.168.123."));

    // The VM dies while the daemon is down: the next start removes its TAP.
    let info: serde_json::Value =
        serde_json::from_str(&w.ok(&["--json", "dominfo", "vm1"])).unwrap();
    let pid = info["pid"].as_u64().expect("vm1 has a pid") as i32;
    w.kill9();
    // SAFETY: kill(2) of the QEMU process of this test's VM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Dead means gone or a zombie (init reaps orphans late here): its TAP is closed then.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    }) {
        assert!(Instant::now() < deadline, "QEMU {pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
    w.start_daemon();
    assert_eq!(w.census().0, vec!["fvbr0".to_string()], "{}", w.log());
    assert!(w.ok(&["domstate", "--reason", "vm1"]).contains("shut off"));

    // Undefine of an active network is refused.
    let err = w.fails(&["net-undefine", "default"]);
    assert!(err.contains("destroy it first"), "{err}");

    // net-destroy: no bridge, TAP, dnsmasq or table left; ip_forward back to what it was.
    w.ok(&["net-destroy", "default"]);
    let (links, tables, dns) = w.census();
    assert!(links.is_empty(), "{links:?}");
    assert!(tables.is_empty(), "{tables:?}");
    assert!(dns.is_empty(), "{dns:?}");
    assert!(!w.ip_forward(), "ip_forward restored to its starting 0");
    // A VM cannot start on an inactive network: one clear error.
    let err = w.fails(&["start", "vm1"]);
    assert!(
        err.contains("network 'default' is not active") && err.contains("net-start"),
        "{err}"
    );
    assert!(w.census().0.is_empty(), "no TAP left by the failed start");
}

#[test]
fn isolated_network_connects_its_guests_and_nothing_else() {
    let mut w = World::new();
    w.start_daemon();
    w.outside_server(8080);
    let net = w.file(
        "iso.xml",
        "<network><name>iso</name><bridge name='fviso0'/>\
         <ip address='10.77.0.1' netmask='255.255.255.0'><dhcp><range start='10.77.0.10' end='10.77.0.50'/></dhcp></ip></network>",
    );
    w.ok(&["net-define", &net]);
    // Overlapping subnets and bad names are refused with the reason.
    let clash = w.file(
        "clash.toml",
        "name = \"clash\"\nforward = \"isolated\"\n[ip]\naddress = \"10.77.0.129\"\nprefix = 25\n",
    );
    assert!(w
        .fails(&["net-define", &clash])
        .contains("overlaps network 'iso'"));
    let uplink = w.file(
        "uplink.toml",
        &format!(
            "name = \"up\"\n[ip]\naddress = \"10.99.{}.200\"\nprefix = 24\n",
            w.n
        ),
    );
    w.ok(&["net-define", &uplink]);
    let err = w.fails(&["net-start", "up"]);
    assert!(err.contains("overlaps the host route"), "{err}");
    assert!(w.census().0.iter().all(|l| l != "fvbr1"), "nothing made");
    let badname = w.file(
        "bad.toml",
        "name = \"bad\"\nbridge = \"this-name-is-too-long\"\n[ip]\naddress = \"10.5.0.1\"\nprefix = 24\n",
    );
    assert!(w.fails(&["net-define", &badname]).contains("15 characters"));
    w.ok(&["net-start", "iso"]);
    w.ok(&["net-autostart", "iso"]);
    assert!(w.ok(&["net-info", "iso"]).contains("Autostart:      yes"));
    w.ok(&["net-autostart", "--disable", "iso"]);
    let info = w.ok(&["net-info", "iso"]);
    assert!(
        info.contains("Autostart:      no")
            && info.contains("Bridge:         fviso0")
            && info.contains("Forward:        isolated"),
        "{info}"
    );

    // dnsmasq is supervised: killed, it is back within a few seconds (one, not two).
    let before = w.census().2;
    assert_eq!(before.len(), 2, "dnsmasq of default and iso");
    let iso_pid = *before
        .iter()
        .find(|p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("/networks/iso/"))
                .unwrap_or(false)
        })
        .expect("iso's dnsmasq");
    // SAFETY: kill(2) of the dnsmasq this test's daemon started.
    unsafe { libc::kill(iso_pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = w.census().2;
        if now.len() == 2 && !now.contains(&iso_pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq not restarted: {now:?}\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let b = vm_def(
        &w,
        "isob",
        "iso",
        "52:54:00:00:00:0b",
        "ip addr add 10.77.0.200/24 dev eth0\necho B-READY",
    );
    let a = vm_def(
        &w,
        "isoa",
        "iso",
        "52:54:00:00:00:0a",
        &format!(
            "i=0; until ping -c 1 -W 1 10.77.0.200 >/dev/null; do i=$((i+1)); [ $i -gt 60 ] && break; done\n\
             ping -c 1 -W 1 10.77.0.200 >/dev/null && echo PEER-REACHED\n\
             ping -c 1 -W 2 10.77.0.1 >/dev/null || echo HOST-UNREACHABLE\n\
             ip route add default via 10.77.0.1\n\
             nc -w 3 {} 8080 </dev/null || echo OUTSIDE-UNREACHABLE",
            w.outside_addr()
        ),
    );
    w.ok(&["define", &b]);
    w.ok(&["define", &a]);
    w.ok(&["start", "isob"]);
    w.ok(&["start", "isoa"]);
    w.wait_console("isob", "B-READY");
    w.wait_console("isoa", "GUEST-DONE");
    let ca = w.console("isoa");
    assert!(ca.contains("LEASE 10.77.0."), "{ca}");
    assert!(ca.contains("PEER-REACHED"), "{ca}");
    assert!(ca.contains("HOST-UNREACHABLE"), "{ca}");
    assert!(
        ca.contains("OUTSIDE-UNREACHABLE") && !ca.contains("PEER 10."),
        "{ca}"
    );
    let leases = w.ok(&["net-dhcp-leases", "iso"]);
    assert!(
        leases.contains("52:54:00:00:00:0a") && leases.contains("52:54:00:00:00:0b"),
        "{leases}"
    );
    // Restarting the network while its VMs run puts their TAPs back on the new bridge.
    let tap_a = w.ok(&["domiflist", "isoa"]);
    let tap_a = tap_a
        .lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    w.ok(&["net-destroy", "iso"]);
    assert!(!w
        .inner(&["ip", "-o", "link", "show", &tap_a])
        .contains("master"));
    w.ok(&["net-start", "iso"]);
    assert!(
        w.inner(&["ip", "-o", "link", "show", &tap_a])
            .contains("master fviso0"),
        "TAP {tap_a} back on the bridge"
    );
    w.ok(&["destroy", "isoa"]);
    w.ok(&["destroy", "isob"]);

    // virt-install's three --network shapes, and a forward = "bridge" network on a host bridge.
    w.inner(&["ip", "link", "add", "hostbr0", "type", "bridge"]);
    let hb = w.file(
        "hostbr.toml",
        "name = \"hostbr\"\nforward = \"bridge\"\nbridge = \"hostbr0\"\n",
    );
    w.ok(&["net-define", &hb]);
    w.ok(&["net-start", "hostbr"]);
    let args = install_args(
        &w,
        "inst",
        &[
            "default",
            "network=iso,mac=52:54:00:aa:00:01",
            "bridge=hostbr0",
            "network=hostbr",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.ok(&args);
    let iflist = w.ok(&["domiflist", "inst"]);
    let rows: Vec<Vec<&str>> = iflist
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| r.len() == 5)
        .collect();
    assert_eq!(rows.len(), 4, "{iflist}");
    let masters: Vec<String> = rows
        .iter()
        .map(|r| {
            let link = w.inner(&["ip", "-o", "link", "show", r[0]]);
            link.split(" master ")
                .nth(1)
                .and_then(|m| m.split_whitespace().next())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        masters,
        ["fvbr0", "fviso0", "hostbr0", "hostbr0"],
        "{iflist}"
    );
    assert_eq!(rows[1][4], "52:54:00:aa:00:01");
    assert!(
        rows.iter().all(|r| r[4].starts_with("52:54:00:")),
        "{iflist}"
    );
    w.ok(&["destroy", "inst"]);
    w.ok(&["net-destroy", "hostbr"]);
    assert!(
        w.inner(&["ip", "-o", "link", "show", "hostbr0"])
            .contains("hostbr0"),
        "the host's bridge stays"
    );
    w.inner(&["ip", "link", "del", "hostbr0"]);
    w.ok(&["net-destroy", "iso"]);
    w.ok(&["net-destroy", "default"]);
    let (links, tables, dns) = w.census();
    assert!(
        links.is_empty() && tables.is_empty() && dns.is_empty(),
        "{links:?} {tables:?} {dns:?}"
    );
    w.ok(&["net-undefine", "iso"]);
    assert!(!w.ok(&["net-list", "--all"]).contains("iso"));
}

#[test]
fn default_network_never_takes_a_subnet_the_host_uses_and_undefine_is_final() {
    // Forwarding on, as on a host that already routes: the daemon must not touch it.
    let mut w = World::with_ip_forward(true);
    // The "host" already uses 192.168.123.0/24: the default network must not start over it.
    w.inner(&[
        "ip", "link", "add", "fvx0", "type", "veth", "peer", "name", "fvx1",
    ]);
    w.inner(&["ip", "addr", "add", "192.168.123.5/24", "dev", "fvx0"]);
    w.inner(&["ip", "link", "set", "fvx0", "up"]);
    w.start_daemon();
    let list = w.ok(&["net-list", "--all"]);
    assert!(
        list.contains("default") && list.contains("inactive"),
        "{list}"
    );
    assert!(
        w.log()
            .contains("overlaps the host route 192.168.123.0/24 on fvx0"),
        "{}",
        w.log()
    );
    let (mut links, tables, dns) = w.census();
    links.sort();
    assert_eq!(links, ["fvx0", "fvx1"], "no bridge made");
    assert!(tables.is_empty() && dns.is_empty(), "{tables:?} {dns:?}");
    assert_eq!(
        w.ip_forward(),
        w.forward_at_start,
        "a network that did not start leaves ip_forward alone"
    );
    let err = w.fails(&["net-start", "default"]);
    assert!(
        err.contains("overlaps the host route") && err.contains("another subnet"),
        "{err}"
    );

    // dumpxml / --toml, then a redefinition on a free subnet keeps the uuid and starts.
    let xml = w.ok(&["net-dumpxml", "default"]);
    assert!(
        xml.contains("<forward mode='nat'/>") && xml.contains("<bridge name='fvbr0'/>"),
        "{xml}"
    );
    let uuid = w.ok(&["net-info", "default"]);
    let toml = w.ok(&["net-dumpxml", "--toml", "default"]);
    let moved = w.file("moved.toml", &toml.replace("192.168.123.", "192.168.124."));
    w.ok(&["net-define", &moved]);
    let info = w.ok(&["net-info", "default"]);
    assert_eq!(
        info.lines().nth(1),
        uuid.lines().nth(1),
        "same uuid after redefinition"
    );
    assert!(info.contains("192.168.124.1/24"), "{info}");
    w.ok(&["net-start", "default"]);
    assert!(w
        .inner(&["ip", "-4", "addr", "show", "fvbr0"])
        .contains("192.168.124.1/24"));
    let err = w.fails(&["net-define", &moved]);
    assert!(err.contains("is active"), "{err}");
    w.ok(&["net-destroy", "default"]);

    // Undefined once, `default` is not defined again by a later start.
    w.ok(&["net-undefine", "default"]);
    w.kill9();
    w.start_daemon();
    assert!(!w.ok(&["net-list", "--all"]).contains("default"));
    let err = w.fails(&["net-info", "default"]);
    assert!(
        err.contains("network 'default' not found") && err.contains("[no_network]"),
        "{err}"
    );

    // Without a bridge name the daemon picks a free fvbrN, and a redefinition keeps it.
    w.ok(&["net-define", &moved]);
    let lab = w.file(
        "lab.toml",
        "name = \"lab\"\n[ip]\naddress = \"10.33.0.1\"\nprefix = 24\n",
    );
    w.ok(&["net-define", &lab]);
    assert!(w.ok(&["net-info", "lab"]).contains("Bridge:         fvbr1"));
    w.ok(&["net-define", &lab]);
    assert!(w.ok(&["net-info", "lab"]).contains("Bridge:         fvbr1"));
}

#[test]
fn nat_network_gives_back_ip_forward_that_was_already_on() {
    // A virtualization host routes already (libvirt's NAT does the same): after the daemon's NAT
    // network goes, forwarding must stay on, also across a kill -9 of the daemon in between.
    let mut w = World::with_ip_forward(true);
    w.start_daemon();
    assert!(w.ok(&["net-list"]).contains("default"));
    assert!(w.ip_forward());
    w.kill9();
    w.start_daemon();
    w.ok(&["net-destroy", "default"]);
    assert!(w.census().0.is_empty(), "bridge removed");
    assert!(
        w.ip_forward(),
        "forwarding was on before the daemon: it stays on"
    );
    // And a cycle that starts from on ends on, not at a value saved by an earlier cycle.
    w.ok(&["net-start", "default"]);
    w.ok(&["net-destroy", "default"]);
    assert!(w.ip_forward());
}

#[test]
fn orphans_of_a_removed_state_folder_are_named_and_can_be_removed() {
    let mut w = World::new();
    w.start_daemon();
    let check = |w: &World| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &w.inner])
            .arg(cli_binary())
            .arg("-c")
            .arg(w.socket())
            .arg("host-validate")
            .output_within(TOOL_TIMEOUT)
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.contains("ferrovirt network leftovers"))
            .unwrap_or_else(|| panic!("no leftovers line:\n{text}"))
            .to_string()
    };
    assert!(
        check(&w).contains(": PASS (none)"),
        "the running daemon owns its network's objects: {}",
        check(&w)
    );

    // A benchmark or a careless admin: the daemon killed, its folders removed, network running.
    w.kill9();
    fs::remove_dir_all(w.dir.join("state")).unwrap();
    fs::remove_dir_all(w.run_dir()).unwrap();
    let line = check(&w);
    assert!(line.contains(": WARN"), "{line}");
    for part in [
        "bridge fvbr0 of network 'default'",
        "nftables table ip ferrovirt_default_",
        "dnsmasq pid ",
        "no daemon answered",
        "ip link del fvbr0",
        "nft delete table ip ferrovirt_default_",
    ] {
        assert!(line.contains(part), "'{part}' missing: {line}");
    }

    // A new daemon on a fresh state folder defines a new `default` (another uuid): it cannot take
    // the orphan's bridge, and says what the orphan is and how to remove it.
    w.start_daemon();
    let err = w.fails(&["net-start", "default"]);
    for part in [
        "device 'fvbr0' already exists",
        "network 'default'",
        "this daemon does not know",
        "ip link del fvbr0",
        "host-validate",
    ] {
        assert!(err.contains(part), "'{part}' missing: {err}");
    }
    let line = check(&w);
    assert!(
        line.contains("the daemon at") && line.contains("does not own them"),
        "{line}"
    );

    // The commands host-validate gives remove everything; then the network starts.
    let how = line
        .split("remove with: ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    for cmd in how.split("; ") {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        w.inner(&argv);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&w).contains(": PASS (none)") {
        assert!(Instant::now() < deadline, "still: {}", check(&w));
        std::thread::sleep(Duration::from_millis(50));
    }
    w.ok(&["net-start", "default"]);
    assert!(check(&w).contains(": PASS (none)"), "{}", check(&w));
    // (ip_forward: the removed folder held the value to give back; the new daemon found it on.)
    w.ok(&["net-destroy", "default"]);
    assert!(w.census().0.is_empty(), "{:?}", w.census());
}
