//! Builds initramfs images: busybox, an `/init` script, files, binaries with their
//! libraries and kernel modules, packed as newc cpio (optionally gzip-compressed).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::error::{Context, Error, Result};
use crate::kernel::{busybox, busybox_applets, guest_kernel, GuestKernel};
use crate::libs::shared_libraries;
use crate::modules::{module_bytes, packed_file_name, ModuleIndex};

/// Where packed modules live inside the image.
const MODULE_DIR: &str = "lib/modules/ferrovirt";

/// Generated script that insmods the packed modules, dependencies first; exits 1 on the
/// first failure. Present in every image (a no-op without modules), so an /init can run it.
pub const LOAD_MODULES_COMMAND: &str = "/bin/ferrovirt-load-modules";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain cpio: fastest to write and for the guest kernel to unpack (best under TCG).
    None,
    /// gzip (fast level): smaller images.
    Gzip,
}

#[derive(Debug, Clone)]
enum Entry {
    HostFile {
        host: PathBuf,
        guest: String,
    },
    Bytes {
        guest: String,
        mode: u32,
        data: Vec<u8>,
    },
    BinaryWithLibs {
        host: PathBuf,
        guest: String,
    },
}

/// Builder for an initramfs holding busybox (all applets linked into /bin, /sbin, ...),
/// `/dev/console`, the caller's `/init` and whatever else the caller adds.
#[derive(Debug, Clone)]
pub struct Initramfs {
    init: Option<String>,
    entries: Vec<Entry>,
    modules: Vec<String>,
    kernel: Option<GuestKernel>,
    compression: Compression,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
enum Node {
    Dir(u32),
    HostFile(PathBuf),
    Bytes(u32, Vec<u8>),
    Symlink(String),
    CharDevice(u32, u32),
}

impl Initramfs {
    pub fn new() -> Self {
        Initramfs {
            init: None,
            entries: Vec::new(),
            modules: Vec::new(),
            kernel: None,
            compression: Compression::Gzip,
        }
    }

    /// The `/init` script (PID 1), e.g. starting with `#!/bin/sh`.
    pub fn init_script(mut self, script: &str) -> Self {
        self.init = Some(script.to_owned());
        self
    }

    /// Copies the host file `host` to `guest_path` (absolute), keeping its permission bits.
    pub fn file(mut self, host: impl AsRef<Path>, guest_path: &str) -> Self {
        self.entries.push(Entry::HostFile {
            host: host.as_ref().to_path_buf(),
            guest: guest_path.to_owned(),
        });
        self
    }

    /// A file with the given contents and permission bits (e.g. 0o755 for a script).
    pub fn bytes(mut self, guest_path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.entries.push(Entry::Bytes {
            guest: guest_path.to_owned(),
            mode,
            data: data.into(),
        });
        self
    }

    /// Copies an executable plus the shared libraries and loader `ldd` finds for it
    /// (at the same absolute paths as on the host).
    pub fn binary_with_libs(mut self, host: impl AsRef<Path>, guest_path: &str) -> Self {
        self.entries.push(Entry::BinaryWithLibs {
            host: host.as_ref().to_path_buf(),
            guest: guest_path.to_owned(),
        });
        self
    }

    /// Kernel modules to pack (names as in `modinfo`, `-` or `_`), with their dependencies;
    /// `/bin/ferrovirt-load-modules` loads them in order.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| (*n).to_owned()));
        self
    }

    /// The kernel whose modules are packed (default: [`guest_kernel()`]).
    pub fn kernel(mut self, kernel: &GuestKernel) -> Self {
        self.kernel = Some(kernel.clone());
        self
    }

    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Writes the image to `out` (atomically: a partial image never appears there).
    pub fn build(&self, out: impl AsRef<Path>) -> Result<PathBuf> {
        let out = out.as_ref();
        let tree = self.tree()?;
        let mut tmp = out.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let result = write_image(&tree, &tmp, self.compression);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, out)
            .context(|| format!("cannot move the image to {}", out.display()))?;
        Ok(out.to_path_buf())
    }

    fn tree(&self) -> Result<BTreeMap<String, Node>> {
        let init = self
            .init
            .as_ref()
            .ok_or_else(|| Error::new("Initramfs: no init script set (call .init_script(...))"))?;
        let mut tree = Tree::default();
        for dir in [
            "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "etc", "root", "run", "mnt",
        ] {
            tree.insert(dir, Node::Dir(0o755));
        }
        tree.insert("tmp", Node::Dir(0o1777));
        tree.insert("dev/console", Node::CharDevice(5, 1));
        tree.insert("dev/null", Node::CharDevice(1, 3));
        tree.insert("bin/busybox", Node::HostFile(busybox()?));
        for applet in busybox_applets()? {
            tree.insert(&applet, Node::Symlink("/bin/busybox".into()));
        }
        tree.insert(
            "etc/passwd",
            Node::Bytes(0o644, b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
        );
        tree.insert("init", Node::Bytes(0o755, init.as_bytes().to_vec()));
        self.add_modules(&mut tree)?;
        for entry in &self.entries {
            match entry {
                Entry::HostFile { host, guest } => {
                    check_host_file(host)?;
                    tree.insert(&guest_path(guest)?, Node::HostFile(host.clone()));
                }
                Entry::Bytes { guest, mode, data } => {
                    tree.insert(&guest_path(guest)?, Node::Bytes(*mode, data.clone()));
                }
                Entry::BinaryWithLibs { host, guest } => {
                    check_host_file(host)?;
                    tree.insert(&guest_path(guest)?, Node::HostFile(host.clone()));
                    for lib in shared_libraries(host)? {
                        tree.insert(&guest_path(&lib.to_string_lossy())?, Node::HostFile(lib));
                    }
                }
            }
        }
        Ok(tree.nodes)
    }

    fn add_modules(&self, tree: &mut Tree) -> Result<()> {
        let mut script = String::from("#!/bin/sh\n# Generated by ferrovirt-testkit: loads the packed modules, dependencies first.\n");
        if !self.modules.is_empty() {
            let kernel = match &self.kernel {
                Some(kernel) => kernel.clone(),
                None => guest_kernel()?,
            };
            let names: Vec<&str> = self.modules.iter().map(String::as_str).collect();
            for path in ModuleIndex::load(&kernel.modules_dir)?.load_order(&names)? {
                let name = packed_file_name(&path);
                tree.insert(
                    &format!("{MODULE_DIR}/{name}"),
                    Node::Bytes(0o644, module_bytes(&path)?),
                );
                script.push_str(&format!(
                    "insmod /{MODULE_DIR}/{name} || {{ echo \"ferrovirt-load-modules: insmod {name} failed\" >&2; exit 1; }}\n"
                ));
            }
        }
        script.push_str("exit 0\n");
        tree.insert(
            LOAD_MODULES_COMMAND.trim_start_matches('/'),
            Node::Bytes(0o755, script.into_bytes()),
        );
        Ok(())
    }
}

/// The image's entries by path; inserting creates missing parent directories,
/// and a later entry replaces an earlier one at the same path.
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn insert(&mut self, path: &str, node: Node) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.and_then(Path::to_str).filter(|d| !d.is_empty()) {
            self.nodes.entry(dir.to_owned()).or_insert(Node::Dir(0o755));
            parent = Path::new(dir).parent();
        }
        self.nodes.insert(path.to_owned(), node);
    }
}

/// `/usr/bin/x` -> `usr/bin/x`; rejects relative paths and `..`.
fn guest_path(path: &str) -> Result<String> {
    let p = Path::new(path);
    let bad = || {
        Error::new(format!(
            "guest path {path:?} must be absolute, without '..', and not '/'"
        ))
    };
    if !p.is_absolute() {
        return Err(bad());
    }
    let mut parts = Vec::new();
    for component in p.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => parts.push(part.to_str().ok_or_else(bad)?),
            _ => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

fn check_host_file(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::new(format!(
            "host file {} does not exist (or is not a regular file); cannot pack it",
            path.display()
        )))
    }
}

fn write_image(tree: &BTreeMap<String, Node>, out: &Path, compression: Compression) -> Result<()> {
    let file = File::create(out).context(|| format!("cannot create {}", out.display()))?;
    let buffered = BufWriter::with_capacity(1 << 20, file);
    let what = || format!("cannot write {}", out.display());
    match compression {
        Compression::None => {
            let buffered = write_cpio(tree, buffered)?;
            finish(buffered).context(what)
        }
        Compression::Gzip => {
            let encoder = flate2::write::GzEncoder::new(buffered, flate2::Compression::fast());
            let encoder = write_cpio(tree, encoder)?;
            finish(encoder.finish().context(what)?).context(what)
        }
    }
}

fn finish(mut w: BufWriter<File>) -> std::io::Result<()> {
    w.flush()
}

fn write_cpio<W: Write>(tree: &BTreeMap<String, Node>, out: W) -> Result<W> {
    let mut cpio = CpioWriter::new(out);
    for (path, node) in tree {
        let what = || format!("cannot pack {path}");
        match node {
            Node::Dir(mode) => cpio.directory(path, *mode).context(what)?,
            Node::Bytes(mode, data) => cpio.file_bytes(path, *mode, data).context(what)?,
            Node::Symlink(target) => cpio.symlink(path, target).context(what)?,
            Node::CharDevice(major, minor) => cpio
                .char_device(path, 0o600, *major, *minor)
                .context(what)?,
            Node::HostFile(host) => {
                let mut file =
                    File::open(host).context(|| format!("cannot open {}", host.display()))?;
                let meta = file
                    .metadata()
                    .context(|| format!("cannot stat {}", host.display()))?;
                cpio.file_from(path, meta.permissions().mode(), meta.len(), &mut file)
                    .context(|| format!("cannot pack {} as /{path}", host.display()))?;
            }
        }
    }
    cpio.finish()
        .context(|| "cannot finish the cpio archive".to_owned())
}

/// An initramfs for a Linux guest (e.g. under ferrovmm) whose `/init` mounts proc, sysfs
/// and devtmpfs, loads any packed modules, prints `marker` on its own line to
/// `/dev/console` from user space and powers off (`poweroff -f`, i.e. through ACPI).
pub fn linux_guest_initramfs(marker: &str) -> Initramfs {
    linux_guest_script(&format!("echo {}\n", shell_quote(marker)))
}

/// An initramfs whose `/init` mounts proc, sysfs and devtmpfs, loads the packed modules
/// (a failure is printed, and `body` still runs), runs the shell `body` with its output on
/// `/dev/console`, then powers off.
pub fn linux_guest_script(body: &str) -> Initramfs {
    Initramfs::new().init_script(&format!(
        "#!/bin/sh\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         exec >/dev/console 2>&1 </dev/console\n\
         {LOAD_MODULES_COMMAND}\n\
         {body}\n\
         poweroff -f\n"
    ))
}

/// Quotes a string for /bin/sh (single quotes, with embedded ones escaped).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_normalised_and_checked() {
        assert_eq!(guest_path("/usr/bin/x").unwrap(), "usr/bin/x");
        assert_eq!(guest_path("//a/./b").unwrap(), "a/b");
        assert!(guest_path("relative").is_err());
        assert!(guest_path("/a/../b").is_err());
        assert!(guest_path("/").is_err());
    }

    #[test]
    fn parents_are_created_and_sorted_first() {
        let mut tree = Tree::default();
        tree.insert("a/b/c", Node::Bytes(0o644, vec![]));
        let paths: Vec<_> = tree.nodes.keys().cloned().collect();
        assert_eq!(paths, ["a", "a/b", "a/b/c"]);
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn missing_init_is_a_clear_error() {
        let err = Initramfs::new().build("/nonexistent/x").unwrap_err();
        assert!(err.message().contains("no init script"), "{err}");
    }
}
