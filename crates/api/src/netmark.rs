//! The ownership marks ferrovirtd puts on the host objects its networks make: an interface alias
//! on bridges (`ferrovirt:net:NETWORK:UUID8`) and TAPs (`ferrovirt:tap:DOMAIN[@NETWORK:UUID8]`),
//! and the nftables table name (`ferrovirt_NETWORK_UUID8`). UUID8 starts the network's uuid, so a
//! daemon tells its own objects from the host's and from those of another state folder; the CLI
//! (`host-validate`) reads the same marks to find leftovers.

pub const BRIDGE_ALIAS: &str = "ferrovirt:net:";
pub const TAP_ALIAS: &str = "ferrovirt:tap:";
pub const TABLE_PREFIX: &str = "ferrovirt_";

/// The network a marked object belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub network: String,
    pub uuid8: String,
}

impl Owner {
    /// Does this mark name the network `name` with this uuid?
    pub fn is(&self, name: &str, uuid: &str) -> bool {
        self.network == name && self.uuid8 == uuid8(uuid)
    }
}

/// The first 8 hex digits of a uuid: tells one daemon's objects from another's.
pub fn uuid8(uuid: &str) -> String {
    uuid.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect()
}

pub fn bridge_alias(network: &str, uuid: &str) -> String {
    format!("{BRIDGE_ALIAS}{network}:{}", uuid8(uuid))
}

pub fn table_name(network: &str, uuid: &str) -> String {
    format!("{TABLE_PREFIX}{network}_{}", uuid8(uuid))
}

/// `NETWORK:UUID8` (network names cannot hold ':'; see the definition checks).
fn owner_after(rest: &str, sep: char) -> Option<Owner> {
    let (network, uuid8) = rest.rsplit_once(sep)?;
    (!network.is_empty()).then(|| Owner {
        network: network.to_string(),
        uuid8: uuid8.to_string(),
    })
}

/// The network a bridge alias names, if it is one of ours.
pub fn bridge_owner(alias: &str) -> Option<Owner> {
    owner_after(alias.strip_prefix(BRIDGE_ALIAS)?, ':')
}

/// A TAP alias: the domain, and the network when the TAP was plugged into one.
pub fn tap_owner(alias: &str) -> Option<(String, Option<Owner>)> {
    let rest = alias.strip_prefix(TAP_ALIAS)?;
    Some(match rest.split_once('@') {
        Some((domain, net)) => (domain.to_string(), owner_after(net, ':')),
        None => (rest.to_string(), None),
    })
}

/// The network an nftables table (`ferrovirt_NETWORK_UUID8`) belongs to.
pub fn table_owner(table: &str) -> Option<Owner> {
    owner_after(table.strip_prefix(TABLE_PREFIX)?, '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0badf00d-1234-5678-9abc-def012345678";

    #[test]
    fn marks_round_trip() {
        let b = bridge_alias("default", UUID);
        assert_eq!(b, "ferrovirt:net:default:0badf00d");
        assert!(bridge_owner(&b).unwrap().is("default", UUID));
        let t = table_name("my_net", UUID);
        assert_eq!(t, "ferrovirt_my_net_0badf00d");
        assert!(table_owner(&t).unwrap().is("my_net", UUID));
        let (dom, owner) = tap_owner("ferrovirt:tap:vm1@default:0badf00d").unwrap();
        assert_eq!(dom, "vm1");
        assert!(owner.unwrap().is("default", UUID));
        assert_eq!(
            tap_owner("ferrovirt:tap:vm1").unwrap(),
            ("vm1".to_string(), None)
        );
    }

    #[test]
    fn foreign_names_are_not_ours() {
        assert_eq!(bridge_owner("docker bridge"), None);
        assert_eq!(bridge_owner("ferrovirt:net:"), None);
        assert_eq!(table_owner("filter"), None);
        assert_eq!(tap_owner("ferrovirt:net:x:1"), None);
        assert!(!bridge_owner("ferrovirt:net:default:deadbeef")
            .unwrap()
            .is("default", UUID));
    }
}
