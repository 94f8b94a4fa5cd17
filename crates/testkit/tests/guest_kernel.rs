//! The guest kernel fetched into the cache: a bzImage, an ELF vmlinux with a PVH entry, modules.

use std::io::Read;

use ferrovirt_testkit::{elf_notes, guest_kernel, pvh_entry, XEN_ELFNOTE_PHYS32_ENTRY};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

#[test]
fn bzimage_has_a_linux_boot_header() {
    let kernel = guest_kernel().expect("guest kernel");
    let mut header = [0u8; 0x210];
    std::fs::File::open(&kernel.bzimage)
        .and_then(|mut f| f.read_exact(&mut header))
        .expect("read bzImage header");
    assert_eq!(
        &header[0x202..0x206],
        b"HdrS",
        "{} lacks the HdrS magic",
        kernel.bzimage.display()
    );
    assert_eq!(u16::from_le_bytes([header[0x1fe], header[0x1ff]]), 0xaa55);
}

#[test]
fn vmlinux_is_an_elf_with_a_pvh_entry_note() {
    let kernel = guest_kernel().expect("guest kernel");
    let notes = elf_notes(&kernel.vmlinux).expect("ELF notes");
    assert!(
        notes
            .iter()
            .any(|n| n.name == "Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY),
        "no XEN_ELFNOTE_PHYS32_ENTRY note in {}: {notes:?}",
        kernel.vmlinux.display()
    );
    let entry = pvh_entry(&kernel.vmlinux).unwrap().unwrap();
    assert!(
        entry > 0 && entry < 1 << 32,
        "PVH entry {entry:#x} is not a 32-bit physical address"
    );
}

#[test]
fn modules_of_that_kernel_are_present_with_their_index() {
    let kernel = guest_kernel().expect("guest kernel");
    assert!(
        kernel.modules_dir.ends_with(&kernel.version),
        "{:?}",
        kernel.modules_dir
    );
    let dep = std::fs::read_to_string(kernel.modules_dir.join("modules.dep")).unwrap();
    for module in [
        "kvm-amd.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
        "virtio_pci.ko",
    ] {
        assert!(
            dep.contains(&format!("/{module}")),
            "{module} missing from modules.dep"
        );
    }
}

#[test]
fn fetching_again_reuses_the_cache() {
    let first = guest_kernel().expect("guest kernel");
    let status = std::process::Command::new("bash")
        .arg(ferrovirt_testkit::repo_root().join("guest/fetch-kernel.sh"))
        .env("FERROVIRT_GUEST_CACHE", ferrovirt_testkit::cache_dir())
        .output_within(TOOL_TIMEOUT)
        .expect("run fetch-kernel.sh");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains(&format!("vmlinux={}", first.vmlinux.display())),
        "{stdout}"
    );
    assert!(
        status.stderr.is_empty(),
        "a cached fetch should be silent: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn parallel_fetches_into_an_empty_cache_download_once() {
    // The .debs come from the warm cache's archive, so this runs without the network once the
    // cache is warm; "fetching" still marks the one fetch that unpacks into the empty cache.
    guest_kernel().expect("warm guest kernel cache");
    let archive = ferrovirt_testkit::cache_dir().join("debs");
    let cache = ferrovirt_testkit::scratch_dir("fresh-cache").unwrap();
    let script = ferrovirt_testkit::repo_root().join("guest/fetch-kernel.sh");
    let spawn = || {
        std::process::Command::new("bash")
            .arg(&script)
            .env("FERROVIRT_GUEST_CACHE", &cache)
            .env("FERROVIRT_DEB_ARCHIVE", &archive)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run fetch-kernel.sh")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for out in [&a, &b] {
        assert!(
            out.status.success(),
            "fetch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        a.stdout, b.stdout,
        "both fetches must report the same kernel"
    );
    let downloads = [&a, &b]
        .iter()
        .filter(|out| String::from_utf8_lossy(&out.stderr).contains("fetching "))
        .count();
    assert_eq!(
        downloads, 1,
        "exactly one of two parallel fetches may download"
    );
    let stdout = String::from_utf8_lossy(&a.stdout);
    let vmlinux = stdout
        .lines()
        .find_map(|l| l.strip_prefix("vmlinux="))
        .unwrap();
    assert!(pvh_entry(std::path::Path::new(vmlinux)).unwrap().is_some());
    std::fs::remove_dir_all(&cache).unwrap();
}
