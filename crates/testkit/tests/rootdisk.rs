//! guest/mk-rootdisk.sh through make_root_disk: a clean ext4 image with busybox and an init.

use std::process::Command;

use ferrovirt_testkit::{make_root_disk, scratch_dir};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

fn debugfs(image: &std::path::Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output_within(TOOL_TIMEOUT)
        .expect("debugfs (e2fsprogs) is needed for this test");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn root_disk_is_a_clean_ext4_with_busybox_and_the_given_init() {
    let dir = scratch_dir("rootdisk").unwrap();
    let init = dir.join("init.sh");
    std::fs::write(&init, "#!/bin/sh\necho custom-init\n").unwrap();
    let image = make_root_disk(&dir.join("root.img"), 24, Some(&init)).expect("root disk");

    assert_eq!(std::fs::metadata(&image).unwrap().len(), 24 << 20);
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output_within(TOOL_TIMEOUT)
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        debugfs(&image, "cat /sbin/init"),
        "#!/bin/sh\necho custom-init\n"
    );
    assert!(
        debugfs(&image, "stat /bin/busybox").contains("Size: "),
        "no /bin/busybox"
    );
    assert!(debugfs(&image, "stat /bin/sh").contains("Fast link dest: \"/bin/busybox\""));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_arguments_are_refused_without_creating_an_image() {
    let dir = scratch_dir("rootdisk-bad").unwrap();
    let out = dir.join("root.img");
    let err = make_root_disk(&out, 1, None).unwrap_err();
    assert!(
        err.message()
            .contains("SIZE_MIB must be a whole number >= 8"),
        "{err}"
    );
    let err = make_root_disk(&out, 16, Some(&dir.join("no-such-init"))).unwrap_err();
    assert!(err.message().contains("does not exist"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
