//! Snapshots and the drivers without live snapshots (test here; kvm answers the same way): a
//! running VM gets one clear not_supported error and nothing changes; once shut off, its disks
//! are snapshotted with the disk library, whatever the driver.

mod common;

use common::{code, Daemon};
use ferrovirt_api::client::DefFormat;
use ferrovirt_api::snapshot::{SnapshotRequest, SnapshotState};
use ferrovirt_api::{DomainOp, ErrorCode};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

#[test]
fn a_running_vm_of_a_driver_without_live_snapshots_is_refused_clearly() {
    let d = Daemon::start();
    let c = d.client();
    let kernel = d.file("kernel", "not a kernel: the test driver boots nothing");
    let disk = d.dir.join("t.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    assert!(out.status.success());
    let def = format!(
        "name = \"t\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n",
        kernel.display(),
        disk.display()
    );
    c.define(&def, DefFormat::Toml, false).unwrap();
    c.action("t", DomainOp::Start).unwrap();
    let req = SnapshotRequest {
        name: Some("s".into()),
        ..Default::default()
    };
    let err = match c.snapshot_create("t", &req) {
        Err(ferrovirt_api::client::ClientError::Api(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(err.code, ErrorCode::NotSupported, "{err}");
    assert!(
        err.message.contains("not supported by the test driver yet"),
        "{err}"
    );
    assert!(c.snapshot_list("t").unwrap().is_empty());
    let files: Vec<_> = std::fs::read_dir(&d.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !files.iter().any(|f| f.to_string_lossy().contains(".s.")),
        "{files:?}"
    );
    c.action("t", DomainOp::Destroy).unwrap();
    let r = c.snapshot_create("t", &req).unwrap();
    assert_eq!(r.snapshot.unwrap().state, SnapshotState::Shutoff);
    assert_eq!(code(c.snapshot_get("t", "other")), ErrorCode::NoSnapshot);
}

/// Metadata left under a name (by a transient domain that ended) is not a new domain's.
#[test]
fn a_new_domain_does_not_inherit_snapshot_metadata_left_under_its_name() {
    let mut d = Daemon::start();
    d.kill9();
    let db = rusqlite::Connection::open(d.state_dir().join("ferrovirt.db")).unwrap();
    let old = ferrovirtd::snapshot::store::Stored {
        info: ferrovirt_api::snapshot::SnapshotInfo {
            name: "old".into(),
            domain: "t".into(),
            parent: None,
            created_ms: 1,
            state: SnapshotState::Shutoff,
            description: None,
            memory_file: None,
            disks: Vec::new(),
            current: false,
            children: Vec::new(),
            descendants: 0,
            domain_xml: None,
        },
        def: ferrovirt_api::DomainDef::new("t"),
    };
    db.execute(
        "INSERT INTO snapshots (domain, name, meta) VALUES ('t', 'old', ?1)",
        [serde_json::to_string(&old).unwrap()],
    )
    .unwrap();
    db.execute(
        "INSERT INTO snapshot_domains (domain, current, owned) VALUES ('t', 'old', '[]')",
        [],
    )
    .unwrap();
    drop(db);
    d.spawn();
    let c = d.client();
    let kernel = d.file("kernel", "not a kernel: the test driver boots nothing");
    let def = format!(
        "name = \"t\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    c.define(&def, DefFormat::Toml, false).unwrap();
    assert!(c.snapshot_list("t").unwrap().is_empty());
    assert_eq!(code(c.snapshot_current("t")), ErrorCode::NoSnapshot);
    c.undefine("t").unwrap();
}
