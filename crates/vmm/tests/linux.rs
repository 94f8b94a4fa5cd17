//! Real Linux (Debian's cloud kernel) on ferrovmm: as a PVH vmlinux and as a bzImage,
//! with a busybox initramfs whose init prints from user space and powers off through
//! ACPI. On this kind of host (/dev/kvm is PVM) the runs happen inside the nested
//! harness, a real KVM host in QEMU TCG; with vmx/svm they run directly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferrovirt_testkit::{guest_kernel, hardware_kvm, linux_guest_script, scratch_dir, Nested};

/// User-space output long enough that it only gets through with the UART interrupt.
const BODY: &str = "echo CPUS=$(grep -c ^processor /proc/cpuinfo)\n\
                    echo MEM=$(grep MemTotal /proc/meminfo | tr -s ' ')\n\
                    echo CMDLINE=$(cat /proc/cmdline)\n\
                    seq 1 400 | tr '\\n' ' '; echo\n\
                    echo LINUX-ON-FERROVMM-UP";

struct Boot {
    status: i32,
    output: String,
}

fn boot_linux(kernel_kind: &str, vcpus: u32) -> Boot {
    let kernel = guest_kernel().expect("guest kernel (guest/fetch-kernel.sh)");
    let dir = scratch_dir("ferrovmm-linux").unwrap();
    let initrd = linux_guest_script(BODY)
        .build(dir.join("initrd.cpio.gz"))
        .expect("initramfs");
    let image: &Path = if kernel_kind == "bzImage" {
        &kernel.bzimage
    } else {
        &kernel.vmlinux
    };
    let args = format!(
        "--name linux --kernel /guest/kernel --initrd /guest/initrd --memory 256 --vcpus {vcpus} \
         --cmdline 'console=ttyS0 panic=-1 quiet no_timer_check ferrovirt.test=1'"
    );
    let boot = if hardware_kvm() {
        // As the nested harness does, bound the run: a guest that hangs must not hang the suite.
        let out = Command::new("timeout")
            .args(["--kill-after=5", "300", env!("CARGO_BIN_EXE_ferrovmm")])
            .args(shell_words(
                &args
                    .replace("/guest/kernel", image.to_str().unwrap())
                    .replace("/guest/initrd", initrd.to_str().unwrap()),
            ))
            .output()
            .expect("run ferrovmm");
        Boot {
            status: out.status.code().unwrap_or(-1),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    } else {
        let out = Nested::new()
            .timeout(Duration::from_secs(300))
            .binary(env!("CARGO_BIN_EXE_ferrovmm"), "/bin/ferrovmm")
            .file(image, "/guest/kernel")
            .file(&initrd, "/guest/initrd")
            .run(&format!("ferrovmm {args} 2>&1"))
            .expect("nested harness");
        eprintln!(
            "nested: outer init {:?}, total {:?}",
            out.time_to_init, out.total
        );
        Boot {
            status: out.status,
            output: out.output,
        }
    };
    let _ = std::fs::remove_dir_all(dir);
    boot
}

fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

fn check(boot: &Boot, vcpus: u32) {
    let out = &boot.output;
    assert_eq!(boot.status, 0, "ferrovmm output:\n{out}");
    assert!(
        out.lines().any(|l| l == "LINUX-ON-FERROVMM-UP"),
        "no marker:\n{out}"
    );
    assert!(
        out.lines().any(|l| l == format!("CPUS={vcpus}")),
        "vCPU count:\n{out}"
    );
    assert!(
        out.contains("CMDLINE=console=ttyS0 panic=-1 quiet no_timer_check ferrovirt.test=1"),
        "cmdline:\n{out}"
    );
    let numbers: String = (1..=400).map(|n| format!("{n} ")).collect();
    assert!(
        out.contains(numbers.trim_end()),
        "user-space output was cut short:\n{out}"
    );
    assert!(
        out.trim_end().ends_with("guest powered off"),
        "no ACPI poweroff:\n{out}"
    );
}

#[test]
fn linux_vmlinux_boots_through_pvh_with_two_vcpus() {
    let boot = boot_linux("vmlinux", 2);
    check(&boot, 2);
}

#[test]
fn linux_bzimage_boots_through_the_64_bit_protocol() {
    let boot = boot_linux("bzImage", 1);
    check(&boot, 1);
}

/// The guest waits for the ACPI power button (its input device, as acpid would) and powers
/// off; the host presses the button through ferrovmm's API.
#[test]
fn linux_shuts_down_cleanly_on_the_acpi_power_button() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("ferrovmm-button").unwrap();
    let body = "for e in /sys/class/input/event*; do grep -q 'Power Button' $e/device/name && DEV=/dev/input/${e##*/}; done\n\
                echo BUTTON-DEV=$DEV\n\
                head -c 1 $DEV >/dev/null\n\
                echo GOT-POWER-BUTTON";
    let initrd = linux_guest_script(body)
        .modules(&["button", "evdev"])
        .build(dir.join("initrd.cpio.gz"))
        .unwrap();
    // W is a scratch folder, K/I the kernel and initrd: /guest and / in the nested host.
    let script = "ferrovmm --name button --kernel $K --initrd $I --memory 256 \
                  --cmdline 'console=ttyS0 quiet panic=-1 no_timer_check' --serial file=$W/serial.log --api-socket $W/api.sock 2>$W/vmm.err &\n\
                  VMM=$!\n\
                  i=0; until grep -q BUTTON-DEV=/dev/input $W/serial.log 2>/dev/null; do i=$((i+1)); [ $i -gt 1200 ] && break; sleep 0.1; done\n\
                  curl -s -o /dev/null -w 'HTTP=%{http_code}\\n' -X PUT --unix-socket $W/api.sock http://localhost/vm/power-button\n\
                  wait $VMM; echo VMM-EXIT=$?\n\
                  cat $W/serial.log $W/vmm.err";
    let o = if hardware_kvm() {
        let out = Command::new("timeout")
            .args(["--kill-after=5", "300", "sh", "-c", script])
            .env("K", &kernel.vmlinux)
            .env("I", dir.join("initrd.cpio.gz"))
            .env("W", &dir)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    Path::new(env!("CARGO_BIN_EXE_ferrovmm"))
                        .parent()
                        .unwrap()
                        .display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        Nested::new()
            .timeout(Duration::from_secs(300))
            .binary(env!("CARGO_BIN_EXE_ferrovmm"), "/bin/ferrovmm")
            .binary("/usr/bin/curl", "/bin/curl")
            .file(&kernel.vmlinux, "/guest/kernel")
            .file(&initrd, "/guest/initrd")
            .run(&format!(
                "K=/guest/kernel I=/guest/initrd W=/var\nmkdir -p $W\n{script}"
            ))
            .expect("nested harness")
            .output
    };
    let _ = std::fs::remove_dir_all(dir);
    let o = &o;
    assert!(o.contains("HTTP=204"), "{o}");
    assert!(
        o.contains("GOT-POWER-BUTTON"),
        "the guest never saw the button:\n{o}"
    );
    assert!(o.contains("VMM-EXIT=0"), "{o}");
    assert!(o.trim_end().ends_with("guest powered off"), "{o}");
}
