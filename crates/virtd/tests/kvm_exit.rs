//! The kvm driver learns how a VM ended from ferrovmm's exit record (exit.json in the VM's run
//! folder), not from its log: tiny guests on this host's /dev/kvm under the real daemon and
//! the real ferrovmm, each ending a different way. The definitions name ferrovmm as their
//! emulator, so they run on a PVM /dev/kvm too (tiny guests work there, Linux does not).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{wait_for, Daemon};
use ferrovirt_api::client::DefFormat;
use ferrovirt_api::{DomainOp, DomainState, StateReason};
use ferrovirt_testkit::image::pvh_kernel;

/// 32-bit code entered through PVH, hand-assembled.
mod code {
    /// cli; hlt; jmp back to the hlt.
    pub const HALT: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
    /// mov dx, 0x604 (PM1a_CNT); mov ax, 0x3400 (SLP_TYP 5 | SLP_EN); out dx, ax: ACPI S5.
    pub const POWEROFF: [u8; 10] = [0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef];
    /// mov al, 0xfe; out 0x64, al: the i8042 reset line.
    pub const RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
    /// mov eax, 0xd0000000; jmp eax: fetch code where no memory is, which KVM cannot emulate.
    pub const JUMP_INTO_NOTHING: [u8; 7] = [0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0];
    /// Enables the ACPI power-button event (PM1_EN 0x602) and polls PM1_STS (0x600) until the
    /// button is pressed: the guest ends only when the test says so (`shutdown`), never before
    /// the daemon has finished starting it.
    pub const WAIT_FOR_POWER_BUTTON: [u8; 22] = [
        0x66, 0xba, 0x02, 0x06, // mov dx, 0x602
        0x66, 0xb8, 0x00, 0x01, // mov ax, 0x100
        0x66, 0xef, // out dx, ax
        0x66, 0xba, 0x00, 0x06, // poll: mov dx, 0x600
        0x66, 0xed, // in ax, dx
        0x66, 0xa9, 0x00, 0x01, // test ax, 0x100
        0x74, 0xf4, // jz poll
    ];
}

/// A guest that waits for the power button, then runs `then` and halts.
fn guest(then: &[&[u8]]) -> Vec<u8> {
    let mut g: Vec<u8> = code::WAIT_FOR_POWER_BUTTON.to_vec();
    g.extend(then.concat());
    g.extend_from_slice(&code::HALT);
    g
}

fn ferrovmm_present() -> PathBuf {
    let p = common::daemon_binary().with_file_name("ferrovmm");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p ferrovmm)",
        p.display()
    );
    p
}

/// Defines and starts a kvm domain booting `code`, then presses its power button; `extra` goes
/// into the TOML definition.
fn start_and_press(d: &Daemon, name: &str, code: &[u8], extra: &str) {
    let kernel = pvh_kernel(&d.dir, &format!("{name}.elf"), code);
    let def = format!(
        "name = \"{name}\"\ntype = \"kvm\"\nemulator = \"ferrovmm\"\nmemory_mib = 16\n{extra}\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    let c = d.client();
    c.define(&def, DefFormat::Toml, false).expect("define");
    c.action(name, DomainOp::Start)
        .unwrap_or_else(|e| panic!("start {name}: {e:?}\n{}", d.log()));
    c.action(name, DomainOp::Shutdown)
        .unwrap_or_else(|e| panic!("shutdown {name}: {e:?}\n{}", d.log()));
}

fn wait_state(d: &Daemon, name: &str, state: DomainState) -> StateReason {
    let c = d.client();
    wait_for(
        &format!("{name} to become {state:?}"),
        Duration::from_secs(20),
        || c.get(name).is_ok_and(|i| i.state == state),
    );
    c.get(name).unwrap().reason
}

fn exit_json(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(d.run_dir().join("vms").join(name).join("exit.json"))
        .unwrap_or_default()
}

#[test]
fn the_kvm_driver_reports_how_each_vm_ended_from_its_exit_record() {
    ferrovmm_present();
    let d = Daemon::start();

    start_and_press(&d, "off", &guest(&[&code::POWEROFF]), "");
    assert_eq!(
        wait_state(&d, "off", DomainState::Shutoff),
        StateReason::Shutdown
    );
    assert!(
        exit_json(&d, "off").contains("\"poweroff\""),
        "{}",
        exit_json(&d, "off")
    );

    start_and_press(&d, "boom", &guest(&[&code::JUMP_INTO_NOTHING]), "");
    assert_eq!(
        wait_state(&d, "boom", DomainState::Crashed),
        StateReason::Crashed
    );
    assert!(
        exit_json(&d, "boom").contains("\"crash\""),
        "{}",
        exit_json(&d, "boom")
    );
    assert!(d.log().contains("crashed ("), "daemon log: {}", d.log());

    // A reset ends the VM as a reboot; with on_reboot = "destroy" it stays off.
    start_and_press(
        &d,
        "rst",
        &guest(&[&code::RESET]),
        "on_reboot = \"destroy\"",
    );
    assert_eq!(
        wait_state(&d, "rst", DomainState::Shutoff),
        StateReason::Shutdown
    );
    assert!(
        exit_json(&d, "rst").contains("\"reset\""),
        "{}",
        exit_json(&d, "rst")
    );
}

#[test]
fn a_vmm_that_dies_without_an_exit_record_is_a_crash() {
    ferrovmm_present();
    let d = Daemon::start();
    let kernel = pvh_kernel(&d.dir, "held.elf", &code::HALT);
    let def = format!(
        "name = \"held\"\ntype = \"kvm\"\nemulator = \"ferrovmm\"\nmemory_mib = 16\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    let c = d.client();
    c.define(&def, DefFormat::Toml, false).expect("define");
    c.action("held", DomainOp::Start).expect("start");
    let pid = c
        .get("held")
        .unwrap()
        .pid
        .expect("a running kvm VM has a pid");
    // SAFETY: kill(2) on the pid of the ferrovmm this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert_eq!(
        wait_state(&d, "held", DomainState::Crashed),
        StateReason::Crashed
    );
    assert!(
        exit_json(&d, "held").is_empty(),
        "a killed ferrovmm writes no record"
    );
    assert!(
        d.log().contains("ended without an exit record"),
        "daemon log: {}",
        d.log()
    );
}

#[test]
fn a_start_that_ferrovmm_refuses_fails_with_the_message_of_its_exit_record() {
    ferrovmm_present();
    let d = Daemon::start();
    // A kernel file that is neither an ELF nor a bzImage.
    let kernel = d.file("not-a-kernel", "just text\n");
    let def = format!(
        "name = \"bad\"\ntype = \"kvm\"\nemulator = \"ferrovmm\"\nmemory_mib = 16\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    let c = d.client();
    c.define(&def, DefFormat::Toml, false).expect("define");
    let err = match c.action("bad", DomainOp::Start) {
        Err(ferrovirt_api::client::ClientError::Api(e)) => e,
        other => panic!("the start should fail: {other:?}"),
    };
    let record = exit_json(&d, "bad");
    let record: serde_json::Value =
        serde_json::from_str(&record).unwrap_or_else(|e| panic!("no exit record ({e}): {record}"));
    assert_eq!(record["reason"], "error", "{record}");
    let message = record["message"].as_str().unwrap();
    assert!(
        err.message.contains(message),
        "the start error should carry ferrovmm's message {message:?}: {}",
        err.message
    );
    assert_eq!(c.get("bad").unwrap().state, DomainState::Shutoff);
}
