//! Virtual networks: definitions (native TOML, libvirt network XML), their validation, the API's
//! network bodies, and the client calls for them.
//!
//! Native format:
//! ```toml
//! name = "default"
//! bridge = "fvbr0"
//! forward = "nat"          # nat | isolated | bridge
//! [ip]
//! address = "192.168.123.1"
//! prefix = 24
//! dhcp_start = "192.168.123.2"
//! dhcp_end = "192.168.123.254"
//! ```

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use roxmltree::Node;
use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientError, DefFormat};
use crate::def::is_uuid;
use crate::error::ApiError;
use crate::http::percent_encode;

/// How a network reaches the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// Own bridge, DHCP/DNS, masquerade to the host's uplink.
    #[default]
    Nat,
    /// Own bridge, DHCP/DNS, no forwarding at all.
    Isolated,
    /// An existing host bridge; ferrovirt only attaches TAPs to it.
    Bridge,
}

impl ForwardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardMode::Nat => "nat",
            ForwardMode::Isolated => "isolated",
            ForwardMode::Bridge => "bridge",
        }
    }
}

/// The host side of a routed network: the bridge's address and the DHCP range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpDef {
    pub address: Ipv4Addr,
    pub prefix: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_start: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_end: Option<Ipv4Addr>,
}

impl IpDef {
    pub fn mask(&self) -> u32 {
        prefix_mask(self.prefix)
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.mask())
    }
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.network())
    }
    /// e.g. 192.168.123.0/24
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix)
    }
}

pub fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// A network definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Bridge device; chosen by the daemon (fvbrN) when absent, required for forward = "bridge".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default)]
    pub forward: ForwardMode,
    /// Required for nat and isolated networks, not allowed for bridge networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpDef>,
}

/// Linux interface names: 1..15 bytes of letters, digits, '_' and '-'.
/// ('.' is refused too: names also become nftables table names.)
pub fn validate_ifname(what: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 15 {
        return Err(ApiError::invalid(format!(
            "{what} name '{name}' must be 1 to 15 characters long (a Linux interface name)"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        || name.starts_with('-')
    {
        return Err(ApiError::invalid(format!(
            "{what} name '{name}' may only use letters, digits, '_' and '-' (and not start with '-')"
        )));
    }
    Ok(())
}

impl NetworkDef {
    pub fn from_toml(text: &str) -> Result<Self, ApiError> {
        toml::from_str(text).map_err(|e| {
            ApiError::malformed(format!("invalid TOML network definition: {}", e.message()))
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Parse a definition in libvirt network XML, native TOML or JSON (sniffed by first character).
    pub fn parse_any(text: &str) -> Result<(Self, Vec<String>), ApiError> {
        match text.trim_start().as_bytes().first() {
            None => Err(ApiError::malformed(
                "the network definition is empty (send TOML or libvirt network XML)",
            )),
            Some(b'<') => from_xml(text),
            Some(b'{') => serde_json::from_str(text)
                .map(|d| (d, Vec::new()))
                .map_err(|e| ApiError::malformed(format!("invalid JSON network definition: {e}"))),
            _ => Self::from_toml(text).map(|d| (d, Vec::new())),
        }
    }

    /// Checks that need no host access.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_net_name(&self.name)?;
        if let Some(uuid) = &self.uuid {
            if !is_uuid(uuid) {
                return Err(ApiError::invalid(format!(
                    "uuid '{uuid}' is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
                )));
            }
        }
        if let Some(br) = &self.bridge {
            validate_ifname("bridge", br)?;
        }
        match (self.forward, &self.ip) {
            (ForwardMode::Bridge, Some(_)) => {
                return Err(ApiError::invalid(
                    "a network with forward = \"bridge\" uses an existing host bridge and takes no [ip] section",
                ))
            }
            (ForwardMode::Bridge, None) if self.bridge.is_none() => {
                return Err(ApiError::invalid(
                    "a network with forward = \"bridge\" needs bridge = \"NAME\" (an existing host bridge)",
                ))
            }
            (ForwardMode::Nat | ForwardMode::Isolated, None) => {
                return Err(ApiError::invalid(format!(
                    "a {} network needs an [ip] section (address, prefix, dhcp_start, dhcp_end)",
                    self.forward.as_str()
                )))
            }
            _ => {}
        }
        if let Some(ip) = &self.ip {
            validate_ip(ip)?;
        }
        Ok(())
    }
}

fn validate_net_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "network name '{name}' must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

fn validate_ip(ip: &IpDef) -> Result<(), ApiError> {
    if !(8..=30).contains(&ip.prefix) {
        return Err(ApiError::invalid(format!(
            "ip prefix /{} is not usable: give 8 to 30",
            ip.prefix
        )));
    }
    let host = u32::from(ip.address) & !ip.mask();
    if host == 0 || host == !ip.mask() {
        return Err(ApiError::invalid(format!(
            "ip address {} is the network or broadcast address of {}; give a host address such as {}",
            ip.address,
            ip.cidr(),
            Ipv4Addr::from(u32::from(ip.network()) + 1)
        )));
    }
    let a = ip.address.octets()[0];
    if ip.address.is_loopback() || ip.address.is_multicast() || a == 0 || a >= 240 {
        return Err(ApiError::invalid(format!(
            "ip address {} is not a unicast address",
            ip.address
        )));
    }
    match (ip.dhcp_start, ip.dhcp_end) {
        (None, None) => {}
        (Some(s), Some(e)) => {
            for x in [s, e] {
                if !ip.contains(x) {
                    return Err(ApiError::invalid(format!(
                        "DHCP range address {x} is outside the network {}",
                        ip.cidr()
                    )));
                }
            }
            if u32::from(s) > u32::from(e) {
                return Err(ApiError::invalid(format!(
                    "DHCP range start {s} is after its end {e}"
                )));
            }
            if (u32::from(s)..=u32::from(e)).contains(&u32::from(ip.address)) {
                return Err(ApiError::invalid(format!(
                    "DHCP range {s}-{e} contains the bridge's own address {}",
                    ip.address
                )));
            }
            let bcast = u32::from(ip.network()) | !ip.mask();
            if u32::from(s) == u32::from(ip.network()) || u32::from(e) == bcast {
                return Err(ApiError::invalid(format!(
                    "DHCP range {s}-{e} includes the network or broadcast address"
                )));
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "give both dhcp_start and dhcp_end, or neither (no DHCP)",
            ))
        }
    }
    Ok(())
}

fn elements<'a, 'i>(node: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children().filter(|n| n.is_element())
}

fn parse_addr(what: &str, v: &str) -> Result<Ipv4Addr, ApiError> {
    v.trim()
        .parse()
        .map_err(|_| ApiError::malformed(format!("{what} '{v}' is not an IPv4 address")))
}

fn netmask_prefix(mask: Ipv4Addr) -> Result<u8, ApiError> {
    let m = u32::from(mask);
    let p = m.leading_ones();
    if m.checked_shl(p).unwrap_or(0) != 0 {
        return Err(ApiError::malformed(format!(
            "netmask {mask} is not contiguous"
        )));
    }
    Ok(p as u8)
}

/// Parse libvirt network XML. Unsupported elements are reported as warnings, never dropped silently.
pub fn from_xml(text: &str) -> Result<(NetworkDef, Vec<String>), ApiError> {
    let doc = crate::xml_limits::parse(text)?;
    let root = doc.root_element();
    if root.tag_name().name() != "network" {
        return Err(ApiError::malformed(format!(
            "the XML root element is <{}>, expected <network>",
            root.tag_name().name()
        )));
    }
    let mut warnings = Vec::new();
    let mut def = NetworkDef {
        name: String::new(),
        uuid: None,
        bridge: None,
        // libvirt: no <forward> element means an isolated network.
        forward: ForwardMode::Isolated,
        ip: None,
    };
    for child in elements(root) {
        match child.tag_name().name() {
            "name" => def.name = child.text().unwrap_or("").trim().to_string(),
            "uuid" => def.uuid = Some(child.text().unwrap_or("").trim().to_string()),
            "forward" => {
                def.forward = match child.attribute("mode").unwrap_or("nat") {
                    "nat" => ForwardMode::Nat,
                    "bridge" => ForwardMode::Bridge,
                    other => {
                        return Err(ApiError::malformed(format!(
                            "<forward mode='{other}'> is not supported (nat, bridge, or no <forward> for isolated)"
                        )))
                    }
                };
                for sub in elements(child) {
                    warnings.push(format!(
                        "element <{}> (network/forward) is not supported by ferrovirt and was ignored",
                        sub.tag_name().name()
                    ));
                }
            }
            "bridge" => def.bridge = child.attribute("name").map(str::to_string),
            "ip" => {
                if child.attribute("family").is_some_and(|f| f != "ipv4") {
                    warnings.push(
                        "an IPv6 <ip> element was ignored: ferrovirt networks are IPv4 only".into(),
                    );
                    continue;
                }
                if def.ip.is_some() {
                    warnings.push(
                        "a second IPv4 <ip> element was ignored: one address per network".into(),
                    );
                    continue;
                }
                let address = parse_addr(
                    "ip address",
                    child
                        .attribute("address")
                        .ok_or_else(|| ApiError::malformed("<ip> needs an address attribute"))?,
                )?;
                let prefix = match (child.attribute("prefix"), child.attribute("netmask")) {
                    (Some(p), _) => p.trim().parse().map_err(|_| {
                        ApiError::malformed(format!("<ip prefix='{p}'> is not a number"))
                    })?,
                    (None, Some(m)) => netmask_prefix(parse_addr("netmask", m)?)?,
                    (None, None) => 24,
                };
                let mut ip = IpDef {
                    address,
                    prefix,
                    dhcp_start: None,
                    dhcp_end: None,
                };
                for sub in elements(child) {
                    if sub.tag_name().name() != "dhcp" {
                        warnings.push(format!(
                            "element <{}> (network/ip) is not supported by ferrovirt and was ignored",
                            sub.tag_name().name()
                        ));
                        continue;
                    }
                    for d in elements(sub) {
                        match d.tag_name().name() {
                            "range" if ip.dhcp_start.is_none() => {
                                ip.dhcp_start = Some(parse_addr(
                                    "DHCP range start",
                                    d.attribute("start").unwrap_or(""),
                                )?);
                                ip.dhcp_end = Some(parse_addr(
                                    "DHCP range end",
                                    d.attribute("end").unwrap_or(""),
                                )?);
                            }
                            other => warnings.push(format!(
                                "element <{other}> (network/ip/dhcp) is not supported by ferrovirt and was ignored"
                            )),
                        }
                    }
                }
                def.ip = Some(ip);
            }
            // Attributes of the bridge device we choose ourselves.
            "mac" | "domain" | "dns" => warnings.push(format!(
                "element <{}> (network) is not supported by ferrovirt and was ignored",
                child.tag_name().name()
            )),
            other => warnings.push(format!(
                "element <{other}> (network) is not supported by ferrovirt and was ignored"
            )),
        }
    }
    if def.name.is_empty() {
        return Err(ApiError::malformed("the network XML has no <name>"));
    }
    // A document can hold thousands of ignored elements: name the first ones, count the rest.
    const MAX_WARNINGS: usize = 100;
    if warnings.len() > MAX_WARNINGS {
        let more = warnings.len() - MAX_WARNINGS;
        warnings.truncate(MAX_WARNINGS);
        warnings.push(format!(
            "... and {more} more items not supported by ferrovirt were ignored (only the first {MAX_WARNINGS} are named)"
        ));
    }
    Ok((def, warnings))
}

/// libvirt network XML for `net-dumpxml`.
pub fn to_xml(def: &NetworkDef) -> String {
    let mut x = String::from("<network>\n");
    let _ = writeln!(x, "  <name>{}</name>", esc(&def.name));
    if let Some(u) = &def.uuid {
        let _ = writeln!(x, "  <uuid>{u}</uuid>");
    }
    match def.forward {
        ForwardMode::Nat => x.push_str("  <forward mode='nat'/>\n"),
        ForwardMode::Bridge => x.push_str("  <forward mode='bridge'/>\n"),
        ForwardMode::Isolated => {}
    }
    if let Some(b) = &def.bridge {
        let _ = writeln!(x, "  <bridge name='{}'/>", esc(b));
    }
    if let Some(ip) = &def.ip {
        let _ = write!(
            x,
            "  <ip address='{}' netmask='{}'",
            ip.address,
            ip.netmask()
        );
        if let (Some(s), Some(e)) = (ip.dhcp_start, ip.dhcp_end) {
            let _ = write!(
                x,
                ">\n    <dhcp>\n      <range start='{s}' end='{e}'/>\n    </dhcp>\n  </ip>\n"
            );
        } else {
            x.push_str("/>\n");
        }
    }
    x.push_str("</network>\n");
    x
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

/// `GET /v1/networks[/{name}]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub uuid: String,
    pub active: bool,
    pub persistent: bool,
    pub autostart: bool,
    pub bridge: String,
    pub forward: ForwardMode,
    /// e.g. "192.168.123.1/24"; absent for bridge networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// Answer of net-define: the network plus warnings about ignored input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetDefineResponse {
    pub network: NetworkInfo,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One DHCP lease handed out by the network's dnsmasq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DhcpLease {
    /// Unix seconds; 0 for an infinite lease.
    pub expiry: u64,
    pub mac: String,
    /// With prefix, e.g. 192.168.123.57/24.
    pub address: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub client_id: String,
}

/// One row of `domiflist`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomInterface {
    /// The host-side TAP device while the domain runs, "-" otherwise.
    pub interface: String,
    /// network or bridge.
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub model: String,
    pub mac: String,
}

/// One row of `domifaddr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomIfAddr {
    pub interface: String,
    pub mac: String,
    pub protocol: String,
    pub address: String,
}

/// `PUT /v1/networks/{name}/autostart`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetAutostartRequest {
    pub autostart: bool,
}

fn net(name: &str) -> String {
    format!("/v1/networks/{}", percent_encode(name))
}

impl Client {
    pub fn net_list(&self, all: bool) -> Result<Vec<NetworkInfo>, ClientError> {
        self.json(
            "GET",
            if all {
                "/v1/networks?all=true"
            } else {
                "/v1/networks"
            },
            None,
        )
    }

    pub fn net_get(&self, name: &str) -> Result<NetworkInfo, ClientError> {
        self.json("GET", &net(name), None)
    }

    pub fn net_define(&self, text: &str) -> Result<NetDefineResponse, ClientError> {
        let ct = match DefFormat::sniff(text) {
            DefFormat::Xml => "application/xml",
            DefFormat::Json => "application/json",
            DefFormat::Toml => "application/toml",
        };
        let resp = self.raw("POST", "/v1/networks", Some(ct), text.as_bytes())?;
        serde_json::from_slice(&resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn net_undefine(&self, name: &str) -> Result<(), ClientError> {
        self.raw("DELETE", &net(name), None, b"").map(|_| ())
    }

    /// start or destroy.
    pub fn net_action(&self, name: &str, verb: &str) -> Result<NetworkInfo, ClientError> {
        self.json(
            "POST",
            &format!("{}/{verb}", net(name)),
            Some(String::new()),
        )
    }

    pub fn net_set_autostart(
        &self,
        name: &str,
        autostart: bool,
    ) -> Result<NetworkInfo, ClientError> {
        let body = serde_json::to_string(&NetAutostartRequest { autostart }).unwrap_or_default();
        self.json("PUT", &format!("{}/autostart", net(name)), Some(body))
    }

    pub fn net_xml(&self, name: &str) -> Result<String, ClientError> {
        let resp = self.raw("GET", &format!("{}/xml", net(name)), None, b"")?;
        String::from_utf8(resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn net_toml(&self, name: &str) -> Result<String, ClientError> {
        let resp = self.raw(
            "GET",
            &format!("{}/definition?format=toml", net(name)),
            None,
            b"",
        )?;
        String::from_utf8(resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn net_leases(&self, name: &str) -> Result<Vec<DhcpLease>, ClientError> {
        self.json("GET", &format!("{}/leases", net(name)), None)
    }

    pub fn dom_interfaces(&self, domain: &str) -> Result<Vec<DomInterface>, ClientError> {
        self.json(
            "GET",
            &format!("/v1/domains/{}/interfaces", percent_encode(domain)),
            None,
        )
    }

    pub fn dom_addresses(&self, domain: &str) -> Result<Vec<DomIfAddr>, ClientError> {
        self.json(
            "GET",
            &format!("/v1/domains/{}/addresses", percent_encode(domain)),
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBVIRT_DEFAULT: &str = "<network>
  <name>default</name>
  <uuid>9a05da11-e96b-47f3-8253-a3a482e445f5</uuid>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='on' delay='0'/>
  <mac address='52:54:00:0a:cd:21'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'/>
    </dhcp>
  </ip>
</network>";

    #[test]
    fn libvirt_default_network_xml_parses_and_round_trips() {
        let (def, warnings) = NetworkDef::parse_any(LIBVIRT_DEFAULT).unwrap();
        assert_eq!(def.forward, ForwardMode::Nat);
        assert_eq!(def.bridge.as_deref(), Some("virbr0"));
        let ip = def.ip.clone().unwrap();
        assert_eq!(ip.prefix, 24);
        assert_eq!(ip.cidr(), "192.168.122.0/24");
        assert_eq!(ip.dhcp_end, Some(Ipv4Addr::new(192, 168, 122, 254)));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("<mac>"));
        def.validate().unwrap();
        let (again, w) = from_xml(&to_xml(&def)).unwrap();
        assert_eq!(again, def);
        assert!(w.is_empty());
        assert_eq!(NetworkDef::from_toml(&def.to_toml()).unwrap(), def);
    }

    #[test]
    fn no_forward_element_means_isolated() {
        let (def, _) =
            from_xml("<network><name>iso</name><ip address='10.9.0.1' prefix='24'/></network>")
                .unwrap();
        assert_eq!(def.forward, ForwardMode::Isolated);
        assert!(def.ip.unwrap().dhcp_start.is_none());
    }

    #[test]
    fn bad_definitions_are_refused_with_a_reason() {
        let cases = [
            ("name = \"a b\"\n[ip]\naddress = \"10.0.0.1\"\nprefix = 24", "network name"),
            ("name = \"n\"\nbridge = \"averyveryverylongbr\"\n[ip]\naddress = \"10.0.0.1\"\nprefix = 24", "15 characters"),
            ("name = \"n\"\nbridge = \"br/0\"\n[ip]\naddress = \"10.0.0.1\"\nprefix = 24", "letters, digits"),
            ("name = \"n\"", "needs an [ip] section"),
            ("name = \"n\"\nforward = \"bridge\"", "needs bridge"),
            ("name = \"n\"\n[ip]\naddress = \"10.0.0.0\"\nprefix = 24", "network or broadcast"),
            ("name = \"n\"\n[ip]\naddress = \"10.0.0.1\"\nprefix = 31", "prefix"),
            ("name = \"n\"\n[ip]\naddress = \"10.0.0.1\"\nprefix = 24\ndhcp_start = \"10.0.1.2\"\ndhcp_end = \"10.0.1.9\"", "outside"),
            ("name = \"n\"\n[ip]\naddress = \"10.0.0.5\"\nprefix = 24\ndhcp_start = \"10.0.0.2\"\ndhcp_end = \"10.0.0.9\"", "own address"),
        ];
        for (toml, want) in cases {
            let err = NetworkDef::from_toml(toml)
                .and_then(|d| d.validate())
                .unwrap_err();
            assert!(err.message.contains(want), "{toml}: {}", err.message);
        }
    }

    #[test]
    fn unknown_toml_key_and_bad_xml_mode_are_malformed() {
        assert!(NetworkDef::from_toml("name = \"n\"\nfoward = \"nat\"")
            .unwrap_err()
            .message
            .contains("foward"));
        let err = from_xml("<network><name>x</name><forward mode='route'/></network>").unwrap_err();
        assert!(err.message.contains("route"));
        assert!(from_xml("<domain/>")
            .unwrap_err()
            .message
            .contains("<network>"));
        assert!(from_xml(
            "<network><ip address='10.0.0.1' netmask='255.0.255.0'/><name>x</name></network>"
        )
        .unwrap_err()
        .message
        .contains("contiguous"));
    }

    #[test]
    fn deep_or_attribute_heavy_network_xml_is_refused_naming_the_limit() {
        let deep = format!(
            "<network><name>n</name>{}{}</network>",
            "<x>".repeat(4000),
            "</x>".repeat(4000)
        );
        let err = from_xml(&deep).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::MalformedBody);
        assert!(err.message.contains("limit 64"), "{}", err.message);
        let mut wide = String::from("<network");
        for i in 0..200_000 {
            wide.push_str(&format!(" a{i}='1'"));
        }
        wide.push_str("><name>n</name></network>");
        let err = from_xml(&wide).unwrap_err();
        assert!(
            err.message
                .contains("<network> has more than 64 attributes"),
            "{}",
            err.message
        );
    }
}
