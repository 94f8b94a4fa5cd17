//! Domain snapshots as the API shows them (`/v1/domains/{name}/snapshots`, the `snapshot-*`
//! verbs): the create request (virsh's snapshot-create-as flags, or libvirt's `<domainsnapshot>`
//! XML), a snapshot's metadata, and its XML for snapshot-dumpxml.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientError};
use crate::http::percent_encode;
use crate::state::DomainInfo;
use crate::xml::esc;
use crate::ApiError;

/// Longest description kept (libvirt has no limit; ours keeps the store small).
pub const MAX_DESCRIPTION: usize = 4096;

/// Where a disk's (or the memory's) snapshot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// Inside the qcow2 image (qcow2 only).
    Internal,
    /// A new overlay file on top of the image, which from then on holds the snapshot's state.
    #[default]
    External,
    /// Not part of the snapshot.
    No,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Internal => "internal",
            Location::External => "external",
            Location::No => "no",
        }
    }
    pub fn parse(s: &str) -> Result<Location, ApiError> {
        match s {
            "internal" => Ok(Location::Internal),
            "external" => Ok(Location::External),
            "no" => Ok(Location::No),
            other => Err(ApiError::new(
                crate::ErrorCode::InvalidArgument,
                format!("snapshot location '{other}' is not internal, external or no"),
            )),
        }
    }
}

/// `--diskspec vda,snapshot=external,file=/path`: what to do with one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The guest device name (vda ...).
    pub target: String,
    #[serde(default)]
    pub snapshot: Location,
    /// External: the new overlay's path (default: beside the image, named after the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl DiskSpec {
    /// virsh's `--diskspec` syntax: `vda[,snapshot=internal|external|no][,file=PATH]`.
    pub fn parse(spec: &str) -> Result<DiskSpec, String> {
        let mut parts = spec.split(',');
        let target = parts.next().unwrap_or("").trim().to_string();
        if target.is_empty() {
            return Err(format!("--diskspec '{spec}' names no disk"));
        }
        let mut d = DiskSpec {
            target,
            snapshot: Location::External,
            file: None,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("snapshot", v)) => d.snapshot = Location::parse(v).map_err(|e| e.message)?,
                Some(("file", v)) if !v.is_empty() => d.file = Some(v.into()),
                Some(("driver", _)) | Some(("stype", _)) => {}
                _ => {
                    return Err(format!(
                        "--diskspec '{spec}': '{p}' is not snapshot=… or file=…"
                    ))
                }
            }
        }
        Ok(d)
    }
}

/// `POST /v1/domains/{name}/snapshots` (JSON; libvirt's XML is accepted too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Default: the creation time in seconds, as virsh names them.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Disks only, no memory (crash-consistent for a running VM).
    #[serde(default)]
    pub disk_only: bool,
    /// Accepted (virsh --live); the VM is paused only while its memory is written.
    #[serde(default)]
    pub live: bool,
    /// Accepted (virsh --atomic): every snapshot is atomic, all disks or none.
    #[serde(default)]
    pub atomic: bool,
    /// `--memspec file=PATH`: where a running VM's memory goes (default: the daemon's state folder).
    #[serde(default)]
    pub memory_file: Option<PathBuf>,
    /// `--memspec snapshot=no` (same as disk_only for a running VM).
    #[serde(default)]
    pub memory: Option<Location>,
    /// Disks not listed get an external snapshot (readonly disks and CD-ROMs none).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Take the snapshot but keep no metadata (virsh --no-metadata).
    #[serde(default)]
    pub no_metadata: bool,
    /// Freeze guest file systems through a guest agent (none is supported yet: a clear error).
    #[serde(default)]
    pub quiesce: bool,
}

/// The domain's state a snapshot captured (libvirt's snapshot states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    /// Full snapshot of a running VM: disks and memory.
    Running,
    /// Full snapshot of a paused VM.
    Paused,
    /// Snapshot of a shut-off domain (disks).
    Shutoff,
    /// Disk-only snapshot of an active VM.
    DiskSnapshot,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Running => "running",
            SnapshotState::Paused => "paused",
            SnapshotState::Shutoff => "shutoff",
            SnapshotState::DiskSnapshot => "disk-snapshot",
        }
    }
    /// Whether the snapshot holds memory (revert resumes the VM where it was).
    pub fn has_memory(self) -> bool {
        matches!(self, SnapshotState::Running | SnapshotState::Paused)
    }
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub target: String,
    pub snapshot: Location,
    /// External: the overlay created by the snapshot (libvirt's `<source file>`); internal: the
    /// qcow2 image holding the internal snapshot.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// External: the image that holds the disk as it was at the snapshot (the overlay's
    /// backing file, never written again while a snapshot or the current state needs it).
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// The format of `base` (internal: of `file`).
    #[serde(default)]
    pub format: Option<String>,
}

/// A snapshot's metadata (`snapshot-info`, `snapshot-list`, `--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub domain: String,
    #[serde(default)]
    pub parent: Option<String>,
    pub created_ms: u64,
    pub state: SnapshotState,
    #[serde(default)]
    pub description: Option<String>,
    /// Where the memory is (full snapshots of an active VM).
    #[serde(default)]
    pub memory_file: Option<PathBuf>,
    pub disks: Vec<SnapshotDisk>,
    /// Filled in answers: whether this is the domain's current snapshot, and the tree around it.
    #[serde(default)]
    pub current: bool,
    #[serde(default)]
    pub children: Vec<String>,
    #[serde(default)]
    pub descendants: u32,
    /// The domain's definition at the snapshot (libvirt XML), for snapshot-dumpxml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
}

impl SnapshotInfo {
    /// internal, external, or mixed (disks and memory together).
    pub fn location(&self) -> &'static str {
        let mut kinds = self
            .disks
            .iter()
            .map(|d| d.snapshot)
            .filter(|l| *l != Location::No);
        let first = kinds.next();
        if kinds.any(|k| Some(k) != first) {
            return "mixed";
        }
        match (first, self.memory_file.is_some()) {
            (Some(Location::Internal), true) => "mixed",
            (Some(Location::Internal), false) => "internal",
            _ => "external",
        }
    }

    /// libvirt's `<domainsnapshot>` document.
    pub fn to_xml(&self) -> String {
        let mut x = String::from("<domainsnapshot>\n");
        let _ = writeln!(x, "  <name>{}</name>", esc(&self.name));
        if let Some(d) = &self.description {
            let _ = writeln!(x, "  <description>{}</description>", esc(d));
        }
        let _ = writeln!(x, "  <state>{}</state>", self.state.as_str());
        if let Some(p) = &self.parent {
            let _ = writeln!(x, "  <parent>\n    <name>{}</name>\n  </parent>", esc(p));
        }
        let _ = writeln!(
            x,
            "  <creationTime>{}</creationTime>",
            self.created_ms / 1000
        );
        match &self.memory_file {
            Some(f) => {
                let _ = writeln!(
                    x,
                    "  <memory snapshot='external' file='{}'/>",
                    esc(&f.to_string_lossy())
                );
            }
            None => x.push_str("  <memory snapshot='no'/>\n"),
        }
        x.push_str("  <disks>\n");
        for d in &self.disks {
            match (&d.file, d.snapshot) {
                (Some(f), Location::External) => {
                    let _ = writeln!(
                        x,
                        "    <disk name='{}' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>",
                        esc(&d.target),
                        esc(&f.to_string_lossy())
                    );
                }
                _ => {
                    let _ = writeln!(
                        x,
                        "    <disk name='{}' snapshot='{}'/>",
                        esc(&d.target),
                        d.snapshot.as_str()
                    );
                }
            }
        }
        x.push_str("  </disks>\n");
        if let Some(dom) = &self.domain_xml {
            for line in dom.lines() {
                let _ = writeln!(x, "  {line}");
            }
        }
        let _ = writeln!(x, "  <active>{}</active>", u8::from(self.current));
        x.push_str("</domainsnapshot>\n");
        x
    }
}

/// Parse libvirt's `<domainsnapshot>` (snapshot-create NAME XMLFILE) into a request. Elements
/// the daemon decides itself (state, parent, creationTime, domain) are ignored, as libvirt does.
pub fn parse_xml(text: &str) -> Result<SnapshotRequest, ApiError> {
    let doc = crate::xml_limits::parse(text)?;
    let root = doc.root_element();
    if root.tag_name().name() != "domainsnapshot" {
        return Err(ApiError::malformed(format!(
            "the root element is <{}>, not <domainsnapshot>",
            root.tag_name().name()
        )));
    }
    let child_text = |name: &str| {
        root.children()
            .find(|n| n.has_tag_name(name))
            .map(|n| n.text().unwrap_or("").trim().to_string())
    };
    let mut req = SnapshotRequest {
        name: child_text("name").filter(|n| !n.is_empty()),
        description: child_text("description"),
        ..Default::default()
    };
    if let Some(mem) = root.children().find(|n| n.has_tag_name("memory")) {
        if let Some(s) = mem.attribute("snapshot") {
            req.memory = Some(Location::parse(s)?);
        }
        req.memory_file = mem.attribute("file").map(PathBuf::from);
        if req.memory == Some(Location::No) {
            req.disk_only = true;
        }
    }
    if let Some(disks) = root.children().find(|n| n.has_tag_name("disks")) {
        for disk in disks.children().filter(|n| n.has_tag_name("disk")) {
            let target = disk
                .attribute("name")
                .ok_or_else(|| ApiError::malformed("a <disk> of <disks> has no name attribute"))?;
            let snapshot = match disk.attribute("snapshot") {
                Some(s) => Location::parse(s)?,
                None => Location::External,
            };
            let file = disk
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|s| s.attribute("file"))
                .map(PathBuf::from);
            req.disks.push(DiskSpec {
                target: target.to_string(),
                snapshot,
                file,
            });
        }
    }
    Ok(req)
}

/// `POST /v1/domains/{name}/snapshots/{snap}/revert`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// Run the VM after the revert (a disk-only or shut-off snapshot boots from its disks).
    #[serde(default)]
    pub running: bool,
    /// Leave the VM paused after the revert.
    #[serde(default)]
    pub paused: bool,
    /// Accepted (virsh --force): reverts that libvirt calls risky are always allowed here.
    #[serde(default)]
    pub force: bool,
}

/// `PUT /v1/domains/{name}/snapshots/{snap}`: snapshot-edit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    #[serde(default)]
    pub description: Option<String>,
    /// Make this the current snapshot.
    #[serde(default)]
    pub current: bool,
}

/// A snapshot operation's answer: the snapshot and the domain after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotResponse {
    pub snapshot: Option<SnapshotInfo>,
    pub domain: DomainInfo,
}

impl Client {
    fn snaps(domain: &str) -> String {
        format!("/v1/domains/{}/snapshots", percent_encode(domain))
    }
    fn snap(domain: &str, snap: &str) -> String {
        format!("{}/{}", Self::snaps(domain), percent_encode(snap))
    }

    pub fn snapshot_create(
        &self,
        domain: &str,
        req: &SnapshotRequest,
    ) -> Result<SnapshotResponse, ClientError> {
        let body = serde_json::to_string(req).unwrap_or_default();
        self.json("POST", &Self::snaps(domain), Some(body))
    }

    /// snapshot-create NAME XMLFILE: the daemon parses the XML; `disk_only` adds --disk-only.
    pub fn snapshot_create_xml(
        &self,
        domain: &str,
        xml: &str,
        disk_only: bool,
    ) -> Result<SnapshotResponse, ClientError> {
        let q = if disk_only { "?disk_only=true" } else { "" };
        let resp = self.raw(
            "POST",
            &format!("{}{q}", Self::snaps(domain)),
            Some("application/xml"),
            xml.as_bytes(),
        )?;
        serde_json::from_slice(&resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.json("GET", &Self::snaps(domain), None)
    }

    pub fn snapshot_get(&self, domain: &str, snap: &str) -> Result<SnapshotInfo, ClientError> {
        self.json("GET", &Self::snap(domain, snap), None)
    }

    pub fn snapshot_xml(&self, domain: &str, snap: &str) -> Result<String, ClientError> {
        let resp = self.raw(
            "GET",
            &format!("{}/xml", Self::snap(domain, snap)),
            None,
            b"",
        )?;
        String::from_utf8(resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn snapshot_current(&self, domain: &str) -> Result<SnapshotInfo, ClientError> {
        self.json(
            "GET",
            &format!("/v1/domains/{}/snapshot-current", percent_encode(domain)),
            None,
        )
    }

    pub fn snapshot_revert(
        &self,
        domain: &str,
        snap: &str,
        req: &RevertRequest,
    ) -> Result<SnapshotResponse, ClientError> {
        let body = serde_json::to_string(req).unwrap_or_default();
        self.json(
            "POST",
            &format!("{}/revert", Self::snap(domain, snap)),
            Some(body),
        )
    }

    /// snapshot-delete: `children` deletes its descendants too, `children_only` only them,
    /// `metadata_only` keeps every image and file.
    pub fn snapshot_delete(
        &self,
        domain: &str,
        snap: &str,
        children: bool,
        children_only: bool,
        metadata_only: bool,
    ) -> Result<(), ClientError> {
        let path = format!(
            "{}?children={children}&children_only={children_only}&metadata={metadata_only}",
            Self::snap(domain, snap)
        );
        self.raw("DELETE", &path, None, b"").map(|_| ())
    }

    pub fn snapshot_edit(
        &self,
        domain: &str,
        snap: &str,
        req: &EditRequest,
    ) -> Result<SnapshotInfo, ClientError> {
        let body = serde_json::to_string(req).unwrap_or_default();
        self.json("PUT", &Self::snap(domain, snap), Some(body))
    }

    /// undefine with virsh's --snapshots-metadata (a domain with snapshots needs it).
    pub fn undefine_with_snapshots(&self, name: &str) -> Result<(), ClientError> {
        self.raw(
            "DELETE",
            &format!(
                "/v1/domains/{}?snapshots_metadata=true",
                percent_encode(name)
            ),
            None,
            b"",
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diskspec_parses_virsh_syntax_and_refuses_junk() {
        let d = DiskSpec::parse("vda,snapshot=internal").unwrap();
        assert_eq!((d.target.as_str(), d.snapshot), ("vda", Location::Internal));
        let d = DiskSpec::parse("vdb,snapshot=external,file=/x/y.qcow2").unwrap();
        assert_eq!(d.file.as_deref(), Some(std::path::Path::new("/x/y.qcow2")));
        assert!(DiskSpec::parse("vda,snapshot=sideways").is_err());
        assert!(DiskSpec::parse(",file=/x").is_err());
        assert!(DiskSpec::parse("vda,bogus").is_err());
    }

    #[test]
    fn libvirt_snapshot_xml_becomes_a_request() {
        let r = parse_xml(
            "<domainsnapshot><name>s1</name><description>before upgrade</description>\
             <memory snapshot='no'/><disks><disk name='vda' snapshot='external'>\
             <source file='/t/o.qcow2'/></disk><disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("s1"));
        assert_eq!(r.description.as_deref(), Some("before upgrade"));
        assert!(r.disk_only);
        assert_eq!(r.disks.len(), 2);
        assert_eq!(r.disks[1].snapshot, Location::No);
        assert!(parse_xml("<domain/>").is_err());
        assert!(parse_xml("<domainsnapshot><disks><disk/></disks></domainsnapshot>").is_err());
    }

    #[test]
    fn dumpxml_parses_back_to_the_same_disks() {
        let info = SnapshotInfo {
            name: "a<b".into(),
            domain: "d".into(),
            parent: Some("p".into()),
            created_ms: 5000,
            state: SnapshotState::DiskSnapshot,
            description: Some("x & y".into()),
            memory_file: None,
            disks: vec![SnapshotDisk {
                target: "vda".into(),
                snapshot: Location::External,
                file: Some("/o.qcow2".into()),
                base: Some("/b.qcow2".into()),
                format: Some("qcow2".into()),
            }],
            current: true,
            children: vec![],
            descendants: 0,
            domain_xml: None,
        };
        let r = parse_xml(&info.to_xml()).unwrap();
        assert_eq!(r.name.as_deref(), Some("a<b"));
        assert_eq!(r.description.as_deref(), Some("x & y"));
        assert_eq!(
            r.disks[0].file.as_deref(),
            Some(std::path::Path::new("/o.qcow2"))
        );
    }
}
