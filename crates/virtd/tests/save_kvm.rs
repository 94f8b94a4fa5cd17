//! save, restore and managed save with the kvm driver (ferrovmm) end to end: a tiny guest on
//! this host's /dev/kvm counts in RAM and prints every count on its serial console; after a
//! restore the count goes on from where it was (RAM, registers and the UART came back), in one
//! console log. The definitions name ferrovmm as their emulator, so they run on a PVM
//! /dev/kvm too.

mod common;

use std::time::Duration;

use common::{console_log, wait_for, Daemon, Tmpfs};
use ferrovirt_api::client::{ClientError, DefFormat};
use ferrovirt_api::{DomainOp, DomainState, ErrorCode, StateReason};
use ferrovirt_testkit::image::pvh_kernel;

/// 32-bit code entered through PVH, hand-assembled: a counter at 0x200000 (in RAM, so RAM must
/// come back), printed as "c XXXXXXXX\n" on COM1, then a short spin, forever.
const COUNTER: [u8; 74] = [
    0xc7, 0x05, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [0x200000], 0
    0xff, 0x05, 0x00, 0x00, 0x20, 0x00, // top: inc dword [0x200000]
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x63, 0xee, 0xb0, 0x20, 0xee, // out 'c', ' '
    0xa1, 0x00, 0x00, 0x20, 0x00, // mov eax, [0x200000]
    0x89, 0xc7, // mov edi, eax
    0xb9, 0x08, 0x00, 0x00, 0x00, // mov ecx, 8
    0xc1, 0xc7, 0x04, // hex: rol edi, 4
    0x89, 0xf8, // mov eax, edi
    0x83, 0xe0, 0x0f, // and eax, 0xf
    0x83, 0xf8, 0x0a, // cmp eax, 10
    0x72, 0x03, // jb digit
    0x83, 0xc0, 0x27, // add eax, 'a' - '0' - 10
    0x83, 0xc0, 0x30, // digit: add eax, '0'
    0xee, // out dx, al
    0x49, // dec ecx
    0x75, 0xe9, // jnz hex
    0xb0, 0x0a, 0xee, // out '\n'
    0xb9, 0x2c, 0x01, 0x00, 0x00, // mov ecx, 300
    0x49, // spin: dec ecx
    0x75, 0xfd, // jnz spin
    0xeb, 0xc0, // jmp top
];

/// The counts in a console log, in order.
fn counts(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.strip_prefix("c "))
        .filter(|h| h.len() == 8)
        .filter_map(|h| u32::from_str_radix(h, 16).ok())
        .collect()
}

fn last_count(d: &Daemon, name: &str) -> u32 {
    counts(&console_log(d, name)).last().copied().unwrap_or(0)
}

/// The log counts on by one from its first line (the guest may have counted a little before
/// the console was attached at its first start), nothing skipped or repeated. Known defect of ferrovmm on a
/// PVM host (README): at a restore the last serial byte before the pause is occasionally
/// written again, garbling that one line; at most `garbled` such lines are allowed.
fn assert_unbroken(log: &str, garbled: usize) {
    let mut bad = Vec::new();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("c ")).collect();
    let first = counts(log).first().copied().unwrap_or(1);
    // A garbled line stands for the one count it was.
    for (i, (expected, line)) in (first..).zip(&lines).enumerate() {
        match line
            .strip_prefix("c ")
            .filter(|h| h.len() == 8)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
        {
            Some(v) => assert_eq!(
                v,
                expected,
                "the count broke at {line:?}; the lines before: {:?}",
                &lines[i.saturating_sub(6)..i]
            ),
            None => bad.push(*line),
        }
    }
    assert!(bad.len() <= garbled, "garbled lines: {bad:?}");
}

fn ferrovmm_present() {
    let p = common::daemon_binary().with_file_name("ferrovmm");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p ferrovmm)",
        p.display()
    );
}

fn define_counter(d: &Daemon, name: &str) {
    let kernel = pvh_kernel(&d.dir, &format!("{name}.elf"), &COUNTER);
    let def = format!(
        "name = \"{name}\"\ntype = \"kvm\"\nemulator = \"ferrovmm\"\nmemory_mib = 16\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    d.client()
        .define(&def, DefFormat::Toml, false)
        .expect("define");
}

fn counts_past(d: &Daemon, name: &str, n: u32) {
    wait_for(
        &format!("{name} to count past {n}"),
        Duration::from_secs(60),
        || last_count(d, name) > n,
    );
}

#[test]
fn a_restored_tiny_guest_counts_on_from_where_it_was_saved() {
    ferrovmm_present();
    let d = Daemon::start();
    let c = d.client();
    define_counter(&d, "count");
    c.action("count", DomainOp::Start)
        .unwrap_or_else(|e| panic!("start: {e:?}\n{}", d.log()));
    counts_past(&d, "count", 5);

    let file = d.dir.join("count.save");
    let info = c
        .save("count", file.to_str().unwrap(), None)
        .unwrap_or_else(|e| panic!("save: {e:?}\n{}", d.log()));
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Saved)
    );
    // The VM is gone: its console says nothing more.
    let at_save = last_count(&d, "count");
    // Sparse: 16 MiB of RAM, almost all zero, takes little room.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&file).unwrap();
    assert!(meta.len() > 16 << 20, "the file holds all of RAM");
    assert!(meta.blocks() * 512 < 4 << 20, "zero pages are holes");
    assert!(
        std::fs::read_dir(&d.dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".ferrovirt-save")),
        "the staging folder is removed"
    );

    let info = c
        .restore(file.to_str().unwrap(), None)
        .unwrap_or_else(|e| panic!("restore: {e:?}\n{}", d.log()));
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Restored)
    );
    counts_past(&d, "count", at_save + 20);
    assert_unbroken(&console_log(&d, "count"), 1);

    // managedsave, then start resumes.
    let info = c.managed_save("count", None).unwrap();
    assert!(info.managed_save);
    let at_save = last_count(&d, "count");
    let info = c.action("count", DomainOp::Start).unwrap();
    assert_eq!(
        (info.state, info.reason, info.managed_save),
        (DomainState::Running, StateReason::Restored, false)
    );
    counts_past(&d, "count", at_save + 20);
    assert_unbroken(&console_log(&d, "count"), 2);

    // A paused VM saves too, and restore --paused keeps it paused until resume.
    c.action("count", DomainOp::Suspend).unwrap();
    let paused = d.dir.join("paused.save");
    c.save("count", paused.to_str().unwrap(), None).unwrap();
    let at_save = last_count(&d, "count");
    let info = c.restore(paused.to_str().unwrap(), None).unwrap();
    assert_eq!(
        info.state,
        DomainState::Paused,
        "saved paused, restored paused"
    );
    c.action("count", DomainOp::Resume).unwrap();
    counts_past(&d, "count", at_save + 20);
    assert_unbroken(&console_log(&d, "count"), 3);
}

#[test]
fn a_damaged_kvm_save_is_refused_and_a_failed_save_keeps_the_vm_running() {
    // (an existing target, a full file system, damage in ferrovmm's part of the payload)
    ferrovmm_present();
    let d = Daemon::start();
    let c = d.client();
    define_counter(&d, "solid");
    c.action("solid", DomainOp::Start).unwrap();
    counts_past(&d, "solid", 5);
    let pid = c.get("solid").unwrap().pid;

    // An existing target: refused before the VM is touched; it counts on.
    let existing = d.file("taken.save", "mine\n");
    match c.save("solid", existing.to_str().unwrap(), None) {
        Err(ClientError::Api(e)) => assert!(e.message.contains("already exists"), "{e}"),
        other => panic!("expected an error: {other:?}"),
    }
    let i = c.get("solid").unwrap();
    assert_eq!((i.state, i.pid), (DomainState::Running, pid));
    let n = last_count(&d, "solid");
    counts_past(&d, "solid", n + 10);

    // A file system too small for the state: one clear error, nothing left behind, the VM
    // counts on.
    let small = Tmpfs::mount(d.dir.join("small"), "16k");
    let full = c.save("solid", small.0.join("full.save").to_str().unwrap(), None);
    let listing: Vec<_> = std::fs::read_dir(&small.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    drop(small);
    match full {
        Err(ClientError::Api(e)) => assert!(e.message.contains("No space left"), "{e}"),
        other => panic!("expected an error: {other:?}"),
    }
    assert!(listing.is_empty(), "left behind: {listing:?}");
    let i = c.get("solid").unwrap();
    assert_eq!(
        (i.state, i.reason, i.pid),
        (DomainState::Running, StateReason::Booted, pid)
    );
    let n = last_count(&d, "solid");
    counts_past(&d, "solid", n + 10);

    let file = d.dir.join("solid.save");
    c.save("solid", file.to_str().unwrap(), None).unwrap();
    // Damage in ferrovmm's part of the payload (its own header): one clear error.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4096..4104].copy_from_slice(b"GARBAGE!");
    let bad = d.dir.join("bad.save");
    std::fs::write(&bad, bytes).unwrap();
    match c.restore(bad.to_str().unwrap(), None) {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
            assert!(e.message.contains("damaged"), "{e}");
        }
        other => panic!("expected an error: {other:?}"),
    }
    let i = c.get("solid").unwrap();
    assert_eq!(
        (i.state, i.reason),
        (DomainState::Shutoff, StateReason::Saved)
    );
    // The good file still restores.
    c.restore(file.to_str().unwrap(), None).unwrap();
    let n = last_count(&d, "solid");
    counts_past(&d, "solid", n + 10);
}
