//! Volumes in the default pool (state-dir/images), created thin.

use std::path::Path;
use std::process::Command;

use ferrovirt_disk::{CreateOptions, Format, Preallocation};

use crate::files;

use ferrovirt_api::def::validate_name;
use ferrovirt_api::msg::{CloudInitRequest, VolumeCreateRequest, VolumeInfo};
use ferrovirt_api::{ApiError, ErrorCode};

/// Create a thin image: a qcow2 of any virtual size takes a few hundred KiB until written.
pub fn create(pool: &Path, req: &VolumeCreateRequest) -> Result<VolumeInfo, ApiError> {
    validate_name(&req.name).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            e.message.replace("domain name", "volume name"),
        )
    })?;
    if req.format != "qcow2" && req.format != "raw" {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("volume format '{}' is not qcow2 or raw", req.format),
        ));
    }
    if req.capacity_bytes == 0 {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            "volume size must be more than 0",
        ));
    }
    let path = pool.join(&req.name);
    if path.exists() {
        return Err(ApiError::new(
            ErrorCode::StorageError,
            format!(
                "volume '{}' already exists at {}; remove it or pick another name",
                req.name,
                path.display()
            ),
        ));
    }
    create_image(&path, &req.format, req.capacity_bytes)?;
    // The image's own virtual size (sizes are rounded up to whole sectors), not the request.
    let capacity_bytes = ferrovirt_disk::info(&path, false)
        .ok()
        .and_then(|i| i.first().map(|i| i.virtual_size))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::StorageError,
                format!("cannot read back the size of {}", path.display()),
            )
        })?;
    Ok(VolumeInfo {
        name: req.name.clone(),
        path: path.to_string_lossy().into_owned(),
        format: req.format.clone(),
        capacity_bytes,
    })
}

/// A NoCloud seed: an ISO 9660 image (Rock Ridge + Joliet names) labelled "cidata" holding
/// `user-data` and `meta-data`, made with genisoimage (or xorriso's mkisofs mode).
pub fn create_cloud_init(pool: &Path, req: &CloudInitRequest) -> Result<VolumeInfo, ApiError> {
    validate_name(&req.name).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            e.message.replace("domain name", "volume name"),
        )
    })?;
    let path = pool.join(&req.name);
    if path.exists() {
        return Err(ApiError::new(
            ErrorCode::StorageError,
            format!(
                "volume '{}' already exists at {}; remove it or pick another name",
                req.name,
                path.display()
            ),
        ));
    }
    let staging = pool.join(format!(".{}.staging", req.name));
    let _ = std::fs::remove_dir_all(&staging);
    let io = |e: std::io::Error| {
        ApiError::new(
            ErrorCode::StorageError,
            format!("{}: {e}", staging.display()),
        )
    };
    // user-data may hold passwords and keys: private staging, private seed.
    files::dir_with_mode(&staging, files::DIR_MODE).map_err(io)?;
    files::write_private(&staging.join("user-data"), &req.user_data).map_err(io)?;
    files::write_private(&staging.join("meta-data"), &req.meta_data).map_err(io)?;
    let mut result = Err(ApiError::new(
        ErrorCode::StorageError,
        "making a cloud-init seed ISO needs genisoimage or xorriso: apt-get install genisoimage",
    ));
    for (tool, prefix) in [
        ("genisoimage", &[][..]),
        ("xorriso", &["-as", "mkisofs"][..]),
    ] {
        let out = Command::new(tool)
            .args(prefix)
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&path)
            .arg(staging.join("user-data"))
            .arg(staging.join("meta-data"))
            .output();
        match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                result = Err(ApiError::new(
                    ErrorCode::StorageError,
                    format!("cannot run {tool}: {e}"),
                ));
                break;
            }
            Ok(o) if o.status.success() => {
                result = Ok(());
                break;
            }
            Ok(o) => {
                let _ = std::fs::remove_file(&path);
                result = Err(ApiError::new(
                    ErrorCode::StorageError,
                    format!(
                        "{tool} failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                ));
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    files::make_private(&path).map_err(|e| {
        ApiError::new(
            ErrorCode::StorageError,
            format!("cannot chmod {}: {e}", path.display()),
        )
    })?;
    let capacity_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(VolumeInfo {
        name: req.name.clone(),
        path: path.to_string_lossy().into_owned(),
        format: "raw".into(),
        capacity_bytes,
    })
}

pub fn delete(pool: &Path, name: &str) -> Result<(), ApiError> {
    validate_name(name).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            e.message.replace("domain name", "volume name"),
        )
    })?;
    let path = pool.join(name);
    std::fs::remove_file(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ApiError::new(
            ErrorCode::NotFound,
            format!("volume '{name}' not found in {}", pool.display()),
        ),
        _ => ApiError::new(
            ErrorCode::StorageError,
            format!("cannot delete {}: {e}", path.display()),
        ),
    })
}

/// Thin: a qcow2 takes a few hundred KiB until the guest writes; a raw file is sparse.
fn create_image(path: &Path, format: &str, size: u64) -> Result<(), ApiError> {
    let format = match format {
        "qcow2" => Format::Qcow2,
        _ => Format::Raw,
    };
    let opts = CreateOptions {
        format,
        size,
        cluster_size: None,
        preallocation: Preallocation::Off,
        backing: None,
    };
    // Guest data: 0600 (the umask already makes it so; explicit for the record).
    ferrovirt_disk::create(path, &opts)
        .map_err(|e| e.to_string())
        .and_then(|()| files::make_private(path).map_err(|e| e.to_string()))
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            ApiError::new(
                ErrorCode::StorageError,
                format!("cannot create {}: {e}", path.display()),
            )
        })
}
