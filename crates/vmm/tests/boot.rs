//! Boot paths: PVH 32-bit entry, ELF 64-bit entry and bzImage 64-bit entry, each
//! with command line and initrd, checked from inside tiny guests.

mod common;

use common::asm::{Guest, CODE_BASE, STACK_TOP};
use common::image::{self, Segment};
use iced_x86::code_asm::*;

const INITRD_MARKER: &str = "INITRD-MARKER-42";

/// PVH guest: prints start_info magic, the command line it points to and the
/// first bytes of module 0 (the initrd).
fn pvh_guest() -> Vec<u8> {
    let mut g = Guest::new(32);
    g.a.mov(esp, STACK_TOP).unwrap();
    g.a.mov(ebp, ebx).unwrap(); // keep the start_info pointer
    g.print("pvh magic=");
    g.a.mov(eax, dword_ptr(ebp)).unwrap();
    g.print_hex32();
    g.print("\ncmdline=");
    g.a.mov(esi, dword_ptr(ebp + 24)).unwrap();
    g.print_zstring();
    g.print("\nmodules=");
    g.a.mov(eax, dword_ptr(ebp + 12)).unwrap();
    g.print_hex32();
    let mut no_module = g.label();
    g.a.test(eax, eax).unwrap();
    g.a.jz(no_module).unwrap();
    g.print("\ninitrd=");
    g.a.mov(ebx, dword_ptr(ebp + 16)).unwrap(); // modlist
    g.a.mov(esi, dword_ptr(ebx)).unwrap(); // paddr
    g.a.mov(ecx, INITRD_MARKER.len() as u32).unwrap();
    g.print_bytes();
    g.print(" size=");
    g.a.mov(eax, dword_ptr(ebx + 8)).unwrap();
    g.print_hex32();
    g.set(&mut no_module);
    g.print("\n");
    g.poweroff();
    let code = g.assemble(CODE_BASE);
    image::elf(
        &[Segment {
            addr: CODE_BASE,
            data: code,
        }],
        CODE_BASE,
        Some(CODE_BASE as u32),
    )
}

/// 64-bit guest reading boot_params at %rsi: e820 entries, command line, initrd.
fn linux64_code(base: u64) -> Vec<u8> {
    let mut g = Guest::new(64);
    g.a.mov(rbp, rsi).unwrap();
    g.print("hdr=");
    g.a.mov(eax, dword_ptr(rbp + 0x202)).unwrap();
    g.print_hex32();
    g.print("\ne820 entries=");
    g.a.movzx(eax, byte_ptr(rbp + 0x1e8)).unwrap();
    g.a.mov(r12d, eax).unwrap();
    g.print_hex32();
    g.print("\n");
    // for r13 in 0..r12: print addr size type
    g.a.lea(r13, qword_ptr(rbp + 0x2d0)).unwrap();
    let mut top = g.label();
    let mut done = g.label();
    g.set(&mut top);
    g.a.test(r12d, r12d).unwrap();
    g.a.jz(done).unwrap();
    g.print("e820 ");
    g.a.mov(rax, qword_ptr(r13)).unwrap();
    g.print_hex64();
    g.print(" ");
    g.a.mov(rax, qword_ptr(r13 + 8)).unwrap();
    g.print_hex64();
    g.print(" ");
    g.a.mov(eax, dword_ptr(r13 + 16)).unwrap();
    g.print_hex32();
    g.print("\n");
    g.a.add(r13, 20).unwrap();
    g.a.dec(r12d).unwrap();
    g.a.jmp(top).unwrap();
    g.set(&mut done);
    g.print("cmdline=");
    g.a.mov(esi, dword_ptr(rbp + 0x228)).unwrap();
    g.print_zstring();
    g.print("\nrsdp=");
    g.a.mov(rax, qword_ptr(rbp + 0x70)).unwrap();
    g.print_hex64();
    let mut no_initrd = g.label();
    g.a.mov(ecx, dword_ptr(rbp + 0x21c)).unwrap();
    g.a.test(ecx, ecx).unwrap();
    g.a.jz(no_initrd).unwrap();
    g.print("\ninitrd=");
    g.a.mov(esi, dword_ptr(rbp + 0x218)).unwrap();
    g.a.mov(ecx, INITRD_MARKER.len() as u32).unwrap();
    g.print_bytes();
    g.set(&mut no_initrd);
    g.print("\n");
    g.poweroff();
    g.assemble(base)
}

fn expect_poweroff(run: &common::Run) {
    assert_eq!(run.status, 0, "exit status; stderr: {}", run.stderr);
    assert_eq!(run.stderr.trim(), "guest powered off", "stderr");
}

#[test]
fn pvh_entry_gets_start_info_cmdline_and_initrd() {
    let dir = common::tempdir();
    let kernel = image::write(dir.path(), "pvh.elf", &pvh_guest());
    let initrd = image::write(
        dir.path(),
        "initrd",
        format!("{INITRD_MARKER}-and-more-bytes").as_bytes(),
    );
    let run = common::boot(
        &kernel,
        &[
            "--cmdline",
            "hello=pvh quiet",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
    );
    expect_poweroff(&run);
    assert!(
        run.stdout.contains("pvh magic=336ec578\n"),
        "stdout: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("cmdline=hello=pvh quiet\n"),
        "stdout: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("modules=00000001"),
        "stdout: {}",
        run.stdout
    );
    let size = INITRD_MARKER.len() + "-and-more-bytes".len();
    assert!(
        run.stdout
            .contains(&format!("initrd={INITRD_MARKER} size={size:08x}")),
        "stdout: {}",
        run.stdout
    );
}

#[test]
fn pvh_entry_without_initrd_reports_no_module() {
    let dir = common::tempdir();
    let kernel = image::write(dir.path(), "pvh.elf", &pvh_guest());
    let run = common::boot(&kernel, &[]);
    expect_poweroff(&run);
    assert!(
        run.stdout.contains("modules=00000000\n"),
        "stdout: {}",
        run.stdout
    );
    // The default command line is Linux-friendly.
    assert!(
        run.stdout.contains("cmdline=console=ttyS0"),
        "stdout: {}",
        run.stdout
    );
}

/// Parses the guest's "e820 ADDR SIZE TYPE" lines.
fn guest_e820(stdout: &str) -> Vec<(u64, u64, u32)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("e820 "))
        .filter(|l| !l.starts_with("entries"))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                u64::from_str_radix(f[0], 16).unwrap(),
                u64::from_str_radix(f[1], 16).unwrap(),
                u32::from_str_radix(f[2], 16).unwrap(),
            )
        })
        .collect()
}

#[test]
fn elf64_entry_sees_e820_and_cmdline_in_boot_params() {
    let dir = common::tempdir();
    let elf = image::elf(
        &[Segment {
            addr: CODE_BASE,
            data: linux64_code(CODE_BASE),
        }],
        CODE_BASE,
        None,
    );
    let kernel = image::write(dir.path(), "vmlinux", &elf);
    let initrd = image::write(dir.path(), "initrd", INITRD_MARKER.as_bytes());
    let run = common::boot(
        &kernel,
        &[
            "--memory",
            "96",
            "--cmdline",
            "root=/dev/vda console=ttyS0",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
    );
    expect_poweroff(&run);
    let e820 = guest_e820(&run.stdout);
    assert_eq!(
        e820,
        vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x100000 - 0x9fc00, 2),
            (0x100000, (96 << 20) - 0x100000, 1),
            (0xe000_0000, 1 << 20, 2)
        ],
        "stdout: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("cmdline=root=/dev/vda console=ttyS0\n"),
        "stdout: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("rsdp=00000000000e0000"),
        "stdout: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("initrd={INITRD_MARKER}")),
        "stdout: {}",
        run.stdout
    );
}

#[test]
fn bzimage_enters_64_bit_with_its_setup_header() {
    let dir = common::tempdir();
    // The 64-bit entry is 0x200 into the protected-mode code loaded at 1 MiB.
    let code = linux64_code(CODE_BASE + 0x200);
    let kernel = image::write(dir.path(), "bzImage", &image::bzimage(&code));
    let run = common::boot(&kernel, &["--cmdline", "from=bzimage"]);
    expect_poweroff(&run);
    // boot_params.hdr.header as the guest reads it at 0x202: "HdrS".
    assert!(
        run.stdout.contains("hdr=53726448"),
        "stdout: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("cmdline=from=bzimage\n"),
        "stdout: {}",
        run.stdout
    );
    assert_eq!(
        guest_e820(&run.stdout).get(2).map(|e| e.1),
        Some((64 << 20) - 0x100000)
    );
}
