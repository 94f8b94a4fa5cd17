//! ferrovmm's command line (`ferrovmm_api::LaunchConfig` through clap and the `FromStr` impls
//! of crates/vmm-api): the input is argv, NUL-separated. No argv may panic; an accepted one
//! that validates must survive `to_args()` -> parse and JSON (what `GET /vm` serves) unchanged.

use ferrovmm_api::LaunchConfig;

use crate::engine::{Outcome, Target};

pub const LAUNCH_ARGS: Target = Target {
    name: "launch_args",
    dict: &[
        b"\0--name\0",
        b"\0--kernel\0",
        b"\0--initrd=",
        b"\0--cmdline=",
        b"\0--memory=",
        b"\0--vcpus=",
        b"\0--serial=",
        b"\0--console=",
        b"\0--disk=path=",
        b",format=qcow2",
        b",format=raw",
        b",readonly=on",
        b",readonly=off",
        b",serial=",
        b",cache=none",
        b",cache=writeback",
        b"\0--net=tap=",
        b"\0--net=fd=",
        b",mac=52:54:00:12:34:56",
        b"\0--rng",
        b"\0--api-socket=",
        b"\0--exit-file=",
        b"\0--log-level=",
        b"stdio",
        b"file=",
        b"socket=",
        b"none",
        b"off",
        b"trace",
        b",,",
        b"==",
        b"\0--",
        b"\0-",
    ],
    max_len: 4096,
};

pub fn launch_args(input: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(input);
    let mut argv = vec!["ferrovmm".to_string()];
    argv.extend(text.split('\0').map(str::to_string));
    let Ok(cfg) = ferrovmm::config::parse(&argv) else {
        return Outcome::Rejected;
    };
    let json = serde_json::to_string(&cfg).expect("a launch config serializes");
    let again: LaunchConfig = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("emitted JSON does not parse: {e}\n{json}"));
    assert_eq!(again, cfg, "JSON round trip changed it\n{json}");
    let Ok(args) = cfg.to_args() else {
        // ferrovmm refuses it after parsing (validate), with one clear error.
        return Outcome::Rejected;
    };
    let mut argv = vec!["ferrovmm".to_string()];
    argv.extend(args.iter().cloned());
    let again = ferrovmm::config::parse(&argv)
        .unwrap_or_else(|e| panic!("to_args() output does not parse: {e}\n{args:?}"));
    assert_eq!(again, cfg, "argv round trip changed it\n{args:?}");
    Outcome::Accepted
}
