//! Fuzzing the HTTP APIs with raw request bytes: a real ferrovirtd and a real ferrovmm.

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
