//! Request and response bodies of the /v1 API (see docs/api/openapi.yaml).

use serde::{Deserialize, Serialize};

use crate::state::DomainInfo;

/// `GET /v1/version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub daemon: String,
    pub api: String,
    /// Driver used when a definition has no type.
    pub default_driver: String,
    /// Why that driver is the default (e.g. "kvm_pvm loaded: nested PVM cannot boot Linux").
    pub default_reason: String,
    pub drivers: Vec<String>,
    /// The default storage pool's folder (state-dir/images).
    pub images_dir: String,
}

/// Answer of define/create: the domain plus warnings about unsupported input that was ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefineResponse {
    pub domain: DomainInfo,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// `PUT /v1/domains/{name}/autostart`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutostartRequest {
    pub autostart: bool,
}

/// `PUT /v1/domains/{name}/memory`. Only `config: true` (the persistent definition) is supported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRequest {
    /// The new memory size in KiB, kept exactly.
    pub memory_kib: u64,
    #[serde(default)]
    pub config: bool,
}

/// `PUT /v1/domains/{name}/vcpus`. Only `config: true` is supported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpusRequest {
    pub vcpus: u32,
    #[serde(default)]
    pub config: bool,
}

/// `GET /v1/domains/{name}/display`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisplayInfo {
    /// e.g. "vnc://127.0.0.1:5900"; None when the domain has no display.
    pub uri: Option<String>,
}

/// `POST /v1/pools/default/volumes`: create a thin disk image in state-dir/images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeCreateRequest {
    pub name: String,
    pub capacity_bytes: u64,
    #[serde(default = "qcow2")]
    pub format: String,
}

fn qcow2() -> String {
    "qcow2".to_string()
}

/// Answer of volume creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub path: String,
    pub format: String,
    pub capacity_bytes: u64,
}

/// Answer of an operation on a domain (start, destroy, ...): the domain afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainResponse {
    pub domain: DomainInfo,
}

/// `POST /v1/pools/default/cloud-init`: make a NoCloud seed ISO (volume label "cidata").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloudInitRequest {
    /// Volume name, e.g. "web1-cidata.iso".
    pub name: String,
    pub user_data: String,
    pub meta_data: String,
}
