//! Resolves kernel module names to files, dependencies first, using `modules.dep`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

/// Module name as the kernel sees it: `virtio-rng` and `virtio_rng` are the same module.
fn canonical_name(name: &str) -> String {
    name.trim_end_matches(".xz")
        .trim_end_matches(".zst")
        .trim_end_matches(".gz")
        .trim_end_matches(".ko")
        .replace('-', "_")
}

/// The parsed `modules.dep` of one kernel.
pub struct ModuleIndex {
    dir: PathBuf,
    /// canonical name -> (path relative to dir, dependency paths)
    entries: HashMap<String, (String, Vec<String>)>,
}

impl ModuleIndex {
    pub fn load(modules_dir: &Path) -> Result<Self> {
        let dep_file = modules_dir.join("modules.dep");
        let text = std::fs::read_to_string(&dep_file)
            .context(|| format!("cannot read {}", dep_file.display()))?;
        let mut entries = HashMap::new();
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else {
                continue;
            };
            let file_name = Path::new(module)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(module);
            entries.insert(
                canonical_name(file_name),
                (
                    module.to_owned(),
                    deps.split_whitespace().map(str::to_owned).collect(),
                ),
            );
        }
        Ok(ModuleIndex {
            dir: modules_dir.to_path_buf(),
            entries,
        })
    }

    /// Absolute paths of the modules and all their dependencies, each once,
    /// every module after the modules it needs (the order to insmod them).
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut order = Vec::new();
        for name in names {
            let key = canonical_name(name);
            let (path, _) = self.entries.get(&key).ok_or_else(|| {
                Error::new(format!(
                    "kernel module {name:?} is not in {}/modules.dep (built into the kernel, or misspelt?)",
                    self.dir.display()
                ))
            })?;
            self.visit(path, &mut order, 0)?;
        }
        Ok(order.into_iter().map(|rel| self.dir.join(rel)).collect())
    }

    fn visit(&self, rel: &str, order: &mut Vec<String>, depth: usize) -> Result<()> {
        if order.iter().any(|done| done == rel) {
            return Ok(());
        }
        if depth > 64 {
            return Err(Error::new(format!("module dependency loop at {rel}")));
        }
        let file_name = Path::new(rel)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(rel);
        if let Some((_, deps)) = self.entries.get(&canonical_name(file_name)) {
            for dep in deps {
                self.visit(dep, order, depth + 1)?;
            }
        }
        order.push(rel.to_owned());
        Ok(())
    }
}

/// A module file's contents, decompressed when it is `.ko.xz` (busybox insmod
/// cannot load compressed modules).
pub fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko.xz") {
        let output = std::process::Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context(|| format!("cannot run xz to unpack {name} (apt-get install xz-utils)"))?;
        if !output.status.success() {
            return Err(Error::new(format!(
                "xz -dc {name} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output.stdout)
    } else if name.ends_with(".ko") {
        std::fs::read(path).context(|| format!("cannot read {name}"))
    } else {
        Err(Error::new(format!(
            "{name}: unsupported module format (only .ko and .ko.xz are handled)"
        )))
    }
}

/// `virtio_blk.ko.xz` -> `virtio_blk.ko`: the name a module gets in an initramfs.
pub fn packed_file_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".xz").map(str::to_owned).unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(text: &str) -> ModuleIndex {
        let dir = std::env::temp_dir().join(format!(
            "ferrovirt-moddep-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("modules.dep"), text).unwrap();
        let index = ModuleIndex::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        index
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let idx = index(
            "kernel/virtio.ko:\n\
             kernel/virtio_ring.ko:\n\
             kernel/failover.ko:\n\
             kernel/net_failover.ko: kernel/failover.ko\n\
             kernel/virtio_net.ko: kernel/virtio.ko kernel/virtio_ring.ko kernel/net_failover.ko kernel/failover.ko\n\
             kernel/virtio_blk.ko: kernel/virtio.ko kernel/virtio_ring.ko\n\
             kernel/virtio-rng.ko: kernel/virtio.ko kernel/virtio_ring.ko\n",
        );
        let order = idx
            .load_order(&["virtio_net", "virtio_blk", "virtio_rng"])
            .unwrap();
        let names: Vec<_> = order.iter().map(|p| packed_file_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio.ko",
                "virtio_ring.ko",
                "failover.ko",
                "net_failover.ko",
                "virtio_net.ko",
                "virtio_blk.ko",
                "virtio-rng.ko"
            ]
        );
    }

    #[test]
    fn xz_compressed_modules_are_unpacked() {
        let dir = std::env::temp_dir().join(format!("ferrovirt-modxz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("fake.ko");
        std::fs::write(&plain, b"\x7fELF fake module").unwrap();
        let status = std::process::Command::new("xz")
            .arg("-k")
            .arg(&plain)
            .status()
            .expect("xz is needed for this test (apt-get install xz-utils)");
        assert!(status.success());
        let packed = dir.join("fake.ko.xz");
        assert_eq!(module_bytes(&packed).unwrap(), b"\x7fELF fake module");
        assert_eq!(packed_file_name(&packed), "fake.ko");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_module_is_a_clear_error() {
        let idx = index("kernel/virtio.ko:\n");
        let err = idx.load_order(&["virtio_nope"]).unwrap_err();
        assert!(err.message().contains("\"virtio_nope\" is not in"), "{err}");
    }
}
