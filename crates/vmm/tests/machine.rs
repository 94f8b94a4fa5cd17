//! The machine model as tiny guests see it: serial in and out, i8042 reset, triple
//! fault, ACPI S5 found through RSDP → XSDT → FADT/DSDT, several vCPUs started
//! with INIT/SIPI, and fatal exits with a register dump.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::asm::{Guest, CODE_BASE, STACK_TOP};
use common::image::{self, Segment};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use common::pvh_kernel;

#[test]
fn serial_input_reaches_the_guest() {
    // The guest echoes what it reads from COM1, upper-cased, until it reads '.'.
    let mut g = Guest::new(32);
    g.print("ready\n");
    let mut poll = g.label();
    let mut done = g.label();
    let mut emit = g.label();
    g.set(&mut poll);
    g.a.mov(dx, 0x3fd).unwrap(); // LSR
    g.a.in_(al, dx).unwrap();
    g.a.test(al, 1).unwrap(); // data ready
    g.a.jz(poll).unwrap();
    g.a.mov(dx, 0x3f8).unwrap();
    g.a.in_(al, dx).unwrap();
    g.a.cmp(al, b'.' as i32).unwrap();
    g.a.je(done).unwrap();
    g.a.cmp(al, b'a' as i32).unwrap();
    g.a.jb(emit).unwrap();
    g.a.sub(al, 0x20).unwrap();
    g.set(&mut emit);
    g.a.out(dx, al).unwrap();
    g.a.jmp(poll).unwrap();
    g.set(&mut done);
    g.print("\nbye\n");
    g.poweroff();
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "echo.elf", g, vec![]);

    let mut child = Command::new(common::ferrovmm_bin())
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // More than the 64-byte receive FIFO holds: the rest must wait, not be lost.
    let text = "hello serial ".repeat(10);
    stdin.write_all(text.as_bytes()).unwrap();
    stdin.write_all(b".").unwrap();
    drop(stdin);
    let run = common::wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains(&text.to_uppercase()),
        "stdout: {}",
        run.stdout
    );
    assert!(run.stdout.ends_with("\nbye\n"), "stdout: {}", run.stdout);
}

#[test]
fn i8042_reset_ends_the_vm_with_guest_reset() {
    let mut g = Guest::new(32);
    g.print("resetting\n");
    g.a.mov(al, 0xfe).unwrap();
    g.a.out(0x64, al).unwrap();
    g.halt_forever();
    let dir = common::tempdir();
    let run = common::boot(&pvh_kernel(dir.path(), "reset.elf", g, vec![]), &[]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stderr.trim(), "guest reset");
    assert_eq!(run.stdout, "resetting\n");
}

#[test]
fn triple_fault_is_a_reset() {
    // An empty IDT: the breakpoint exception cannot be delivered → triple fault.
    let mut g = Guest::new(32);
    g.a.mov(esp, STACK_TOP).unwrap();
    g.a.push(0).unwrap();
    g.a.push(0).unwrap();
    g.a.lidt(ptr(esp + 2)).unwrap();
    g.print("faulting\n");
    g.a.ud2().unwrap();
    g.halt_forever();
    let dir = common::tempdir();
    let run = common::boot(&pvh_kernel(dir.path(), "tf.elf", g, vec![]), &[]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stderr.trim(), "guest reset");
    assert_eq!(run.stdout, "faulting\n");
}

/// A guest that finds the RSDP by scanning the BIOS area, walks the XSDT to the FADT,
/// reads PM1a_CNT_BLK, finds SLP_TYPa of \_S5 in the DSDT, and enters S5.
fn acpi_poweroff_guest() -> Guest {
    let mut g = Guest::new(32);
    let a = &mut g.a;
    let mut scan = a.create_label();
    let mut next = a.create_label();
    let mut rsdp_found = a.create_label();
    let mut xsdt_loop = a.create_label();
    let mut fadt_found = a.create_label();
    let mut s5_scan = a.create_label();
    let mut s5_found = a.create_label();
    let mut fail = a.create_label();
    a.mov(esp, STACK_TOP).unwrap();
    a.mov(esi, 0xe0000).unwrap();
    a.set_label(&mut scan).unwrap();
    a.cmp(dword_ptr(esi), 0x2044_5352).unwrap(); // "RSD "
    a.jne(next).unwrap();
    a.cmp(dword_ptr(esi + 4), 0x2052_5450).unwrap(); // "PTR "
    a.je(rsdp_found).unwrap();
    a.set_label(&mut next).unwrap();
    a.add(esi, 16).unwrap();
    a.cmp(esi, 0x10_0000).unwrap();
    a.jb(scan).unwrap();
    a.jmp(fail).unwrap();
    // XSDT: entries are 8 bytes from offset 36 to its length.
    a.set_label(&mut rsdp_found).unwrap();
    a.mov(ebx, dword_ptr(esi + 24)).unwrap(); // XSDT address (low half)
    a.mov(ecx, dword_ptr(ebx + 4)).unwrap(); // XSDT length
    a.add(ecx, ebx).unwrap(); // end
    a.lea(edi, ptr(ebx + 36)).unwrap();
    a.set_label(&mut xsdt_loop).unwrap();
    a.cmp(edi, ecx).unwrap();
    a.jae(fail).unwrap();
    a.mov(eax, dword_ptr(edi)).unwrap();
    a.cmp(dword_ptr(eax), 0x5043_4146).unwrap(); // "FACP"
    a.je(fadt_found).unwrap();
    a.add(edi, 8).unwrap();
    a.jmp(xsdt_loop).unwrap();
    // FADT: DSDT at 40, PM1a_CNT_BLK at 64.
    a.set_label(&mut fadt_found).unwrap();
    a.mov(ebp, dword_ptr(eax + 64)).unwrap(); // PM1a_CNT port
    a.mov(ebx, dword_ptr(eax + 40)).unwrap(); // DSDT
    a.mov(ecx, dword_ptr(ebx + 4)).unwrap();
    a.add(ecx, ebx).unwrap();
    a.lea(edi, ptr(ebx + 36)).unwrap();
    a.set_label(&mut s5_scan).unwrap();
    a.cmp(edi, ecx).unwrap();
    a.jae(fail).unwrap();
    a.cmp(dword_ptr(edi), 0x5f35_535f).unwrap(); // "_S5_"
    a.je(s5_found).unwrap();
    a.inc(edi).unwrap();
    a.jmp(s5_scan).unwrap();
    // "_S5_" PackageOp PkgLength NumElements BytePrefix(0x0a) SLP_TYPa
    a.set_label(&mut s5_found).unwrap();
    a.movzx(eax, byte_ptr(edi + 8)).unwrap();
    a.shl(eax, 10).unwrap();
    a.or(eax, 1 << 13).unwrap();
    a.mov(edx, ebp).unwrap();
    a.out(dx, ax).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut fail).unwrap();
    a.nop().unwrap();
    g.print("acpi walk failed\n");
    g.halt_forever();
    g
}

#[test]
fn guest_finds_pm1a_through_rsdp_and_fadt_and_powers_off() {
    let dir = common::tempdir();
    let run = common::boot(
        &pvh_kernel(dir.path(), "s5.elf", acpi_poweroff_guest(), vec![]),
        &[],
    );
    assert_eq!(
        run.status, 0,
        "stdout: {} stderr: {}",
        run.stdout, run.stderr
    );
    assert_eq!(run.stderr.trim(), "guest powered off");
    assert!(!run.stdout.contains("failed"), "stdout: {}", run.stdout);
}

const TRAMPOLINE: u64 = 0x1_0000;
const AP_LOCK: u64 = 0x1_1000;
const AP_COUNT: u64 = 0x1_1004;

/// Real-mode AP entry at 0x10000: load a flat GDT, switch to 32-bit protected
/// mode and continue at `pm_entry`.
fn ap_trampoline(pm_entry: u32) -> Vec<u8> {
    const DESC_OFF: u16 = 0x30;
    const GDT_OFF: u32 = 0x40;
    let mut t = CodeAssembler::new(16).unwrap();
    t.cli().unwrap();
    t.mov(ax, cs).unwrap();
    t.mov(ds, ax).unwrap();
    t.mov(bx, DESC_OFF as i32).unwrap();
    t.lgdt(ptr(bx)).unwrap();
    t.mov(eax, cr0).unwrap();
    t.or(eax, 1).unwrap();
    t.mov(cr0, eax).unwrap();
    // jmp dword 0x08:pm_entry
    t.db(&[0x66, 0xea]).unwrap();
    t.dd(&[pm_entry]).unwrap();
    t.dw(&[0x08]).unwrap();
    let mut code = t.assemble(0).unwrap(); // IP is relative to CS = 0x1000
    assert!(code.len() <= DESC_OFF as usize);
    code.resize(DESC_OFF as usize, 0);
    code.extend_from_slice(&23u16.to_le_bytes());
    code.extend_from_slice(&(TRAMPOLINE as u32 + GDT_OFF).to_le_bytes());
    code.resize(GDT_OFF as usize, 0);
    // GDT: null, flat 32-bit code, flat data.
    for e in [0u64, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff] {
        code.extend_from_slice(&e.to_le_bytes());
    }
    code
}

#[test]
fn every_vcpu_starts_and_reports_its_apic_id() {
    const VCPUS: u32 = 3;
    let mut g = Guest::new(32);
    let mut ap_entry = g.label();
    let mut wait = g.label();
    let mut all_up = g.label();
    g.a.mov(esp, STACK_TOP).unwrap();
    g.print("bsp apic=");
    g.a.mov(eax, dword_ptr(0xfee0_0020u32)).unwrap();
    g.a.shr(eax, 24).unwrap();
    g.print_hex32();
    g.print("\n");
    // INIT, then SIPI (vector 0x10 → 0x10000) to all but self, twice as the MP spec says.
    g.a.mov(dword_ptr(0xfee0_0300u32), 0x000c_4500).unwrap();
    g.a.mov(dword_ptr(0xfee0_0300u32), 0x000c_4610).unwrap();
    g.a.mov(dword_ptr(0xfee0_0300u32), 0x000c_4610).unwrap();
    // Wait as long as it takes: the host side bounds the run (common::run) and reports.
    g.set(&mut wait);
    g.a.cmp(dword_ptr(AP_COUNT as u32), (VCPUS - 1) as i32)
        .unwrap();
    g.a.je(all_up).unwrap();
    g.a.pause().unwrap();
    g.a.jmp(wait).unwrap();
    g.set(&mut all_up);
    g.print("all up\n");
    g.poweroff();

    // AP code in 32-bit protected mode: flat data segments, print under a spinlock.
    g.set(&mut ap_entry);
    let mut spin = g.label();
    g.a.mov(ax, 0x10).unwrap();
    g.a.mov(ds, ax).unwrap();
    g.a.mov(es, ax).unwrap();
    g.a.mov(ss, ax).unwrap();
    g.set(&mut spin);
    g.a.lock().bts(dword_ptr(AP_LOCK as u32), 0).unwrap();
    g.a.jc(spin).unwrap();
    g.print("ap apic=");
    g.a.mov(eax, dword_ptr(0xfee0_0020u32)).unwrap();
    g.a.shr(eax, 24).unwrap();
    g.print_hex32();
    g.print("\n");
    g.a.mov(dword_ptr(AP_LOCK as u32), 0).unwrap();
    g.a.lock().inc(dword_ptr(AP_COUNT as u32)).unwrap();
    g.halt_forever();

    let ap_entry_addr = {
        // Assemble once to learn the AP entry's address.
        let result =
            g.a.assemble_options(
                CODE_BASE,
                BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .unwrap();
        result.label_ip(&ap_entry).unwrap()
    };
    let dir = common::tempdir();
    let tramp = Segment {
        addr: TRAMPOLINE,
        data: ap_trampoline(ap_entry_addr as u32),
    };
    let kernel = pvh_kernel(dir.path(), "smp.elf", g, vec![tramp]);
    let run = common::boot(&kernel, &["--vcpus", &VCPUS.to_string()]);
    assert_eq!(
        run.status, 0,
        "stdout: {} stderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.contains("bsp apic=00000000\n"),
        "stdout: {}",
        run.stdout
    );
    let mut ap_ids: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ap apic="))
        .collect();
    ap_ids.sort();
    assert_eq!(
        ap_ids,
        vec!["00000001", "00000002"],
        "stdout: {}",
        run.stdout
    );
    assert!(run.stdout.ends_with("all up\n"), "stdout: {}", run.stdout);
}

#[test]
fn fetching_code_from_unbacked_memory_is_fatal_with_a_register_dump() {
    let mut g = Guest::new(32);
    g.print("jumping\n");
    g.a.mov(eax, 0xd000_0000u32).unwrap();
    g.a.jmp(eax).unwrap();
    let dir = common::tempdir();
    let run = common::boot(&pvh_kernel(dir.path(), "bad.elf", g, vec![]), &[]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("vcpu0: "), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("rip="), "stderr: {}", run.stderr);
}

#[test]
fn ports_without_devices_read_all_ones_and_writes_are_ignored() {
    let mut g = Guest::new(32);
    g.a.mov(dx, 0x2f8).unwrap(); // COM2: nothing there
    g.a.mov(al, 0x55).unwrap();
    g.a.out(dx, al).unwrap();
    g.a.in_(eax, dx).unwrap();
    g.a.mov(ebx, eax).unwrap();
    g.print("com2=");
    g.a.mov(eax, ebx).unwrap();
    g.print_hex32();
    g.print("\n");
    g.poweroff();
    let dir = common::tempdir();
    let run = common::boot(&pvh_kernel(dir.path(), "holes.elf", g, vec![]), &[]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, "com2=ffffffff\n");
}

/// A hostile guest: 20000 random port writes and random MMIO writes into the PCI BARs
/// and ECAM of a machine with a disk and an rng (random feature bits, queue addresses,
/// device status, MSI-X entries, BAR moves). ferrovmm must neither crash nor flood its log.
#[test]
fn random_port_and_mmio_writes_never_crash_the_vmm() {
    let dir = common::tempdir();
    let disk = image::write(dir.path(), "disk.raw", &vec![0u8; 1 << 20]);
    for seed in [1u32, 0x9e37_79b9, 0x1234_5678] {
        let mut g = Guest::new(32);
        let mut top = g.label();
        let mut port = g.label();
        let mut next = g.label();
        let mut ecam = g.label();
        let mut write = g.label();
        g.a.mov(esp, STACK_TOP).unwrap();
        g.a.mov(ebx, seed).unwrap();
        g.a.mov(ecx, 20_000).unwrap();
        g.set(&mut top);
        g.a.imul_3(ebx, ebx, 1_103_515_245).unwrap();
        g.a.add(ebx, 12345).unwrap();
        g.a.mov(eax, ebx).unwrap();
        g.a.test(eax, 0x300).unwrap();
        g.a.jz(port).unwrap();
        g.a.mov(edx, ebx).unwrap();
        g.a.shr(edx, 8).unwrap();
        g.a.test(eax, 0x200).unwrap();
        g.a.jz(ecam).unwrap();
        g.a.and(edx, 0x0001_fffc).unwrap(); // the virtio BARs at 0xc0000000
        g.a.or(edx, 0xc000_0000u32 as i32).unwrap();
        g.a.jmp(write).unwrap();
        g.set(&mut ecam);
        g.a.and(edx, 0x000f_fffc).unwrap(); // ECAM, bus 0
        g.a.or(edx, 0xe000_0000u32 as i32).unwrap();
        g.set(&mut write);
        g.a.mov(dword_ptr(edx), eax).unwrap();
        g.a.jmp(next).unwrap();
        g.set(&mut port);
        g.a.mov(edx, ebx).unwrap();
        g.a.shr(edx, 16).unwrap();
        // Spare the i8042 and PM1a ports, which would end the VM early.
        g.a.mov(esi, edx).unwrap();
        g.a.and(esi, 0xfff0).unwrap();
        g.a.cmp(esi, 0x60).unwrap();
        g.a.je(next).unwrap();
        g.a.cmp(esi, 0x600).unwrap();
        g.a.je(next).unwrap();
        g.a.out(dx, eax).unwrap();
        g.set(&mut next);
        g.a.dec(ecx).unwrap();
        g.a.jnz(top).unwrap();
        g.print("\nsurvived\n");
        g.poweroff();
        let kernel = pvh_kernel(dir.path(), "chaos.elf", g, vec![]);
        let log = dir.path().join("serial.log");
        let _ = std::fs::remove_file(&log);
        let run = common::boot(
            &kernel,
            &[
                "--rng",
                "--disk",
                &format!("path={}", disk.display()),
                "--serial",
                &format!("file={}", log.display()),
            ],
        );
        assert_eq!(run.status, 0, "seed {seed:#x}: stderr: {}", run.stderr);
        assert!(
            std::fs::read_to_string(&log)
                .unwrap()
                .ends_with("\nsurvived\n"),
            "seed {seed:#x}"
        );
        assert!(
            !run.stderr.contains("panicked"),
            "seed {seed:#x}: {}",
            run.stderr
        );
        assert!(
            run.stderr.lines().count() <= 8,
            "seed {seed:#x}: the guest floods the log:\n{}",
            run.stderr
        );
        assert_eq!(
            run.stderr.trim_end().lines().last(),
            Some("guest powered off"),
            "seed {seed:#x}"
        );
    }
}
