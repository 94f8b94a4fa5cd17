//! Fuzzing the definition parsers: libvirt domain and network XML, TOML, JSON.

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::definitions::*;

#[test]
fn domain_xml_fuzz() {
    run(&DOMAIN_XML, domain_xml);
}

#[test]
fn network_xml_fuzz() {
    run(&NETWORK_XML, network_xml);
}

#[test]
fn domain_toml_fuzz() {
    run(&DOMAIN_TOML, domain_toml);
}

#[test]
fn domain_json_fuzz() {
    run(&DOMAIN_JSON, domain_json);
}

#[test]
fn network_toml_json_fuzz() {
    run(&NETWORK_TOML, network_any);
}

#[test]
fn snapshot_xml_fuzz() {
    run(&SNAPSHOT_XML, snapshot_xml);
}
