//! Domain lifecycle operations: one typed enum from the CLI through the API route to the manager,
//! instead of verb strings compared on both sides.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An operation on a domain: `POST /v1/domains/{name}/{op}` with `op` its URL verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainOp {
    /// Boot the VM.
    Start,
    /// Press the ACPI power button.
    Shutdown,
    /// Pull the plug: the VM process goes at once.
    Destroy,
    /// Ask the guest to reboot (power button, then a restart when it powers off).
    Reboot,
    /// Press the reset button.
    Reset,
    /// Pause the vCPUs.
    Suspend,
    /// Continue a paused domain.
    Resume,
}

impl DomainOp {
    pub const ALL: [DomainOp; 7] = [
        DomainOp::Start,
        DomainOp::Shutdown,
        DomainOp::Destroy,
        DomainOp::Reboot,
        DomainOp::Reset,
        DomainOp::Suspend,
        DomainOp::Resume,
    ];

    /// The URL verb (and the CLI command's name).
    pub fn as_str(self) -> &'static str {
        match self {
            DomainOp::Start => "start",
            DomainOp::Shutdown => "shutdown",
            DomainOp::Destroy => "destroy",
            DomainOp::Reboot => "reboot",
            DomainOp::Reset => "reset",
            DomainOp::Suspend => "suspend",
            DomainOp::Resume => "resume",
        }
    }

    pub fn from_verb(verb: &str) -> Option<DomainOp> {
        Self::ALL.into_iter().find(|op| op.as_str() == verb)
    }
}

impl fmt::Display for DomainOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DomainOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_verb(s).ok_or_else(|| {
            let verbs: Vec<&str> = Self::ALL.iter().map(|o| o.as_str()).collect();
            format!(
                "unknown domain operation '{s}' (one of {})",
                verbs.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_serde_and_parse_agree() {
        for op in DomainOp::ALL {
            assert_eq!(op.as_str().parse::<DomainOp>(), Ok(op));
            assert_eq!(
                serde_json::to_string(&op).unwrap(),
                format!("\"{}\"", op.as_str())
            );
        }
        let err = "explode".parse::<DomainOp>().unwrap_err();
        assert!(err.contains("explode") && err.contains("shutdown"), "{err}");
    }
}
