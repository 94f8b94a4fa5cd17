//! Files and access: private state on disk, VNC on loopback unless allowed (then with a
//! password), and "in use" decided on canonical paths. Against the real daemon.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Daemon;
use ferrovirt_api::client::{ClientError, DefFormat};
use ferrovirt_api::msg::{CloudInitRequest, VolumeCreateRequest};
use ferrovirt_api::{ApiError, DomainOp, ErrorCode};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn api_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ApiError {
    match r {
        Err(ClientError::Api(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn kernel(d: &Daemon) -> String {
    d.file("vmlinuz", "not a kernel: the test driver does not boot it")
        .display()
        .to_string()
}

#[test]
fn state_and_run_folders_and_files_with_guest_data_are_private() {
    let d = Daemon::start();
    let c = d.client();
    let def = format!(
        "name = \"p\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n",
        kernel(&d)
    );
    c.define(&def, DefFormat::Toml, false).unwrap();
    c.action("p", DomainOp::Start).unwrap();
    let vol = c
        .create_volume(&VolumeCreateRequest {
            name: "guest.qcow2".into(),
            capacity_bytes: 1 << 30,
            format: "qcow2".into(),
        })
        .unwrap();
    let seed = c
        .create_cloud_init(&CloudInitRequest {
            name: "p-cidata.iso".into(),
            user_data: "#cloud-config\npassword: hunter2\n".into(),
            meta_data: "instance-id: p\n".into(),
        })
        .unwrap();
    let state = d.state_dir();
    let run = d.run_dir();
    for dir in [
        state.clone(),
        state.join("images"),
        state.join("logs"),
        state.join("networks"),
        run.join("vms"),
        run.join("vms/p"),
        run.join("networks"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    // The run folder: the socket's group may reach the socket (0660), nobody else anything.
    assert_eq!(mode(&run), 0o710);
    assert_eq!(mode(&d.socket()), 0o660);
    let db = state.join("ferrovirt.db");
    for file in [
        db.clone(),
        state.join("ferrovirt.db-wal"),
        state.join("ferrovirt.db-shm"),
        state.join("ferrovirtd.lock"),
        Path::new(&vol.path).to_path_buf(),
        Path::new(&seed.path).to_path_buf(),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn an_older_state_dir_left_world_readable_is_tightened_at_start() {
    let mut d = Daemon::start();
    let state = d.state_dir();
    d.kill9();
    for dir in [state.clone(), state.join("images"), state.join("logs")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let db = state.join("ferrovirt.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Files and folders as a version without a umask made them: world-readable.
    let vm_dir = d.run_dir().join("vms/old");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let old_files = [
        state.join("logs/old.log"),
        state.join("images/old.qcow2"),
        state.join("images/old-cidata.iso"),
        vm_dir.join("launch.json"),
    ];
    for f in &old_files {
        std::fs::write(f, "guest data").unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&vm_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.spawn();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("images")), 0o700);
    assert_eq!(mode(&vm_dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    for f in &old_files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // The run folder keeps the mode that lets the socket's group reach the socket.
    assert_eq!(mode(&d.run_dir()), 0o710);
    assert_eq!(mode(&d.socket()), 0o660);
}

/// A test domain with VNC graphics in the three input formats.
fn vnc_defs(
    d: &Daemon,
    name: &str,
    listen: &str,
    passwd: Option<&str>,
) -> [(DefFormat, String); 4] {
    let k = kernel(d);
    let toml_pw = passwd
        .map(|p| format!("passwd = \"{p}\"\n"))
        .unwrap_or_default();
    let xml_pw = passwd.map(|p| format!(" passwd='{p}'")).unwrap_or_default();
    let json_pw = passwd
        .map(|p| format!(",\"passwd\":\"{p}\""))
        .unwrap_or_default();
    [
        (
            DefFormat::Toml,
            format!("name = \"{name}-t\"\ntype = \"test\"\n[os]\nkernel = \"{k}\"\n[graphics]\ntype = \"vnc\"\nlisten = \"{listen}\"\n{toml_pw}"),
        ),
        (
            DefFormat::Json,
            format!("{{\"name\":\"{name}-j\",\"type\":\"test\",\"os\":{{\"kernel\":\"{k}\"}},\"graphics\":{{\"type\":\"vnc\",\"listen\":\"{listen}\"{json_pw}}}}}"),
        ),
        (
            DefFormat::Xml,
            format!("<domain type='test'><name>{name}-x</name><os><type>hvm</type><kernel>{k}</kernel></os><devices><graphics type='vnc' listen='{listen}'{xml_pw}/></devices></domain>"),
        ),
        (
            DefFormat::Xml,
            format!("<domain type='test'><name>{name}-l</name><os><type>hvm</type><kernel>{k}</kernel></os><devices><graphics type='vnc'{xml_pw}><listen type='address' address='{listen}'/></graphics></devices></domain>"),
        ),
    ]
}

#[test]
fn vnc_beyond_loopback_is_refused_in_every_format_unless_allowed_and_then_needs_a_password() {
    let d = Daemon::start();
    let c = d.client();
    for (format, text) in vnc_defs(&d, "open", "0.0.0.0", None) {
        let e = api_error(c.define(&text, format, false));
        assert_eq!(e.code, ErrorCode::InvalidDefinition, "{}", e.message);
        assert!(
            e.message.contains("'0.0.0.0' is not loopback")
                && e.message.contains("--allow-remote-vnc"),
            "{}",
            e.message
        );
    }
    // A password does not change the default: loopback only.
    for (format, text) in vnc_defs(&d, "pw", "192.0.2.1", Some("s3cret")) {
        let e = api_error(c.define(&text, format, false));
        assert!(e.message.contains("--allow-remote-vnc"), "{}", e.message);
    }
    for (format, text) in vnc_defs(&d, "lo", "::1", None) {
        c.define(&text, format, false).expect("loopback is fine");
    }
    assert_eq!(c.list(true).unwrap().len(), 4);

    let allowed = Daemon::start_with(&["--allow-remote-vnc"]);
    let c = allowed.client();
    for (format, text) in vnc_defs(&allowed, "nopw", "0.0.0.0", None) {
        let e = api_error(c.define(&text, format, false));
        assert!(e.message.contains("needs a password"), "{}", e.message);
    }
    for (format, text) in vnc_defs(&allowed, "ok", "0.0.0.0", Some("s3cret")) {
        c.define(&text, format, false)
            .expect("allowed with a password");
    }
    let e = api_error(c.define(
        &vnc_defs(&allowed, "long", "0.0.0.0", Some("longer-than-8"))[0].1,
        DefFormat::Toml,
        false,
    ));
    assert!(e.message.contains("1 to 8"), "{}", e.message);
    // The password is not shown by dumpxml (as libvirt without --security-info).
    let xml = c.xml("ok-x").unwrap();
    assert!(
        xml.contains("listen='0.0.0.0'") && !xml.contains("s3cret"),
        "{xml}"
    );
}

#[test]
fn a_volume_in_use_through_dot_dot_or_a_symlink_is_not_deleted() {
    let d = Daemon::start();
    let c = d.client();
    for name in ["v1", "v2", "free"] {
        c.create_volume(&VolumeCreateRequest {
            name: name.into(),
            capacity_bytes: 1 << 20,
            format: "raw".into(),
        })
        .unwrap();
    }
    let images = d.state_dir().join("images");
    // /…/state/../state/images/v1
    let dotted = d.state_dir().join("../state/images/v1");
    let link = d.dir.join("disk-link");
    std::os::unix::fs::symlink(images.join("v2"), &link).unwrap();
    for (name, disk) in [("dots", dotted), ("linked", link)] {
        let def = format!(
            "name = \"{name}\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n[[disk]]\npath = \"{}\"\n",
            kernel(&d),
            disk.display()
        );
        c.define(&def, DefFormat::Toml, false).unwrap();
        c.action(name, DomainOp::Start).unwrap();
    }
    for (volume, user) in [("v1", "dots"), ("v2", "linked")] {
        let e = api_error(c.delete_volume(volume));
        assert_eq!(e.code, ErrorCode::StorageError, "{}", e.message);
        assert!(
            e.message.contains(&format!("used by domain '{user}'")),
            "{}",
            e.message
        );
        assert!(images.join(volume).exists());
    }
    c.delete_volume("free")
        .expect("an unused volume is deleted");
    assert!(!images.join("free").exists());
}
