//! Fuzzing the servers with raw bytes: a real ferrovirtd, a real ferrovmm, a real NBD server.

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::http::*;

#[test]
fn ferrovirtd_http_fuzz() {
    let mut t = DaemonTarget::start();
    run(&FERROVIRTD_RAW, |input| t.one(input));
}

#[test]
fn ferrovmm_api_fuzz() {
    let mut t = VmmTarget::start();
    run(&FERROVMM_RAW, |input| t.one(input));
}

#[test]
fn ferrovirtd_json_fuzz() {
    let mut t = DaemonTarget::start();
    run(&FERROVIRTD_JSON, |input| t.json(input));
}

#[test]
fn nbd_fuzz() {
    let mut t = ferrovirt_fuzz::targets::nbd::NbdTarget::start();
    run(&ferrovirt_fuzz::targets::nbd::NBD, |input| t.one(input));
}
