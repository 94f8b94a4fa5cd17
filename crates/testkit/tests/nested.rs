//! The nested harness: a real KVM host (Linux + kvm-amd) inside QEMU TCG.

use std::time::Duration;

use ferrovirt_testkit::{scratch_dir, Nested};

#[test]
fn payload_sees_kvm_and_extra_modules_runs_a_dynamic_binary_and_reads_packed_files() {
    let dir = scratch_dir("nested-files").unwrap();
    let host_file = dir.join("hello.txt");
    std::fs::write(&host_file, "packed from the host\n").unwrap();

    let out = Nested::new()
        .binary(env!("CARGO_BIN_EXE_kvm-api-version"), "/bin/kvm-api-version")
        .file(&host_file, "/data/hello.txt")
        .bytes("/data/inline.txt", 0o644, "inline bytes\n")
        .modules(&["tun"])
        .run("test -c /dev/kvm && echo kvm-is-a-char-device; test -c /dev/net/tun && echo tun-loaded; \
             kvm-api-version; cat /data/hello.txt /data/inline.txt")
        .expect("nested run");
    eprintln!(
        "nested: init after {:?}, payload after {:?}, total {:?}",
        out.time_to_init, out.time_to_payload, out.total
    );

    assert_eq!(out.status, 0, "output:\n{}", out.output);
    assert_eq!(
        out.output, "kvm-is-a-char-device\ntun-loaded\n12\npacked from the host\ninline bytes\n",
        "console:\n{}",
        out.console
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exit_status_and_output_of_the_payload_are_returned() {
    let out = Nested::new()
        .run("echo before-exit; exit 7")
        .expect("nested run");
    eprintln!("nested trivial run: total {:?}", out.total);
    assert_eq!(out.status, 7);
    assert_eq!(out.output, "before-exit\n");
}

#[test]
fn a_hanging_payload_times_out_with_the_console_so_far() {
    let err = Nested::new()
        .timeout(Duration::from_secs(600))
        .timeout_after_start(Duration::from_secs(5))
        .run("echo hanging; sleep 1000")
        .expect_err("must time out");
    assert!(err.message().contains("timed out"), "{err}");
    assert!(
        err.message().contains("@@FERROVIRT-INIT@@") && err.message().contains("hanging"),
        "console missing: {err}"
    );
}

#[test]
fn a_missing_host_file_is_a_clear_error() {
    let err = Nested::new()
        .file("/nonexistent/ferrovirt-file", "/data/x")
        .run("true")
        .expect_err("missing file");
    assert!(
        err.message()
            .contains("/nonexistent/ferrovirt-file does not exist"),
        "{err}"
    );
}
