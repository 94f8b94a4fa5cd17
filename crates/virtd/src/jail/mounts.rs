//! The mounts that make a jail's root, prepared in the daemon (paths as C strings, folders in
//! order) and made in the VM's process between fork and exec, where only plain syscalls are
//! safe: no allocation, no locks.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

enum Step {
    /// A folder inside the root (a mount point or a parent of one).
    Dir(CString),
    /// An empty file inside the root, to bind a file over.
    File(CString),
    Bind {
        source: CString,
        target: CString,
        read_only: bool,
    },
    /// A character device node owned by the VM's uid (mode 0600).
    Device { path: CString, dev: libc::dev_t },
}

pub struct Mounts {
    root: PathBuf,
    root_c: CString,
    id: u32,
    dirs: Vec<PathBuf>,
    steps: Vec<Step>,
    /// Descriptors the process keeps across exec (TAPs), at their own numbers.
    pass: Vec<OwnedFd>,
}

fn cstr(p: &Path) -> CString {
    // Paths with a NUL were refused by LaunchConfig::validate before a jail is prepared.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Mounts {
    pub fn new(root: &Path, id: u32) -> Self {
        Mounts {
            root: root.to_path_buf(),
            root_c: cstr(root),
            id,
            dirs: Vec::new(),
            steps: Vec::new(),
            pass: Vec::new(),
        }
    }

    /// `path` (absolute) as seen inside the root, with every missing parent folder made first.
    fn inside(&mut self, path: &Path) -> PathBuf {
        let mut at = self.root.clone();
        let parts: Vec<_> = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            if i + 1 < parts.len() && !self.dirs.contains(&at) {
                self.dirs.push(at.clone());
                self.steps.push(Step::Dir(cstr(&at)));
            }
        }
        at
    }

    /// Binds `source` (a file, or a folder with `dir`) at the same path inside the root.
    pub fn bind(&mut self, source: &Path, read_only: bool, dir: bool) {
        let target = self.inside(source);
        if self.dirs.contains(&target) && dir {
            return;
        }
        if dir {
            self.dirs.push(target.clone());
            self.steps.push(Step::Dir(cstr(&target)));
        } else {
            self.steps.push(Step::File(cstr(&target)));
        }
        self.steps.push(Step::Bind {
            source: cstr(source),
            target: cstr(&target),
            read_only,
        });
    }

    /// Keeps `fd` open in the VM's process (under the same number).
    pub fn pass(&mut self, fd: OwnedFd) {
        self.pass.push(fd);
    }

    pub fn device(&mut self, path: &str, dev: libc::dev_t) {
        let target = self.inside(Path::new(path));
        self.steps.push(Step::Device {
            path: cstr(&target),
            dev,
        });
    }

    /// In the VM's process, before exec: the passed descriptors kept open, new mount, IPC and
    /// network namespaces, the root's tmpfs with
    /// its binds and devices, then the tmpfs made read-only.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: only syscalls on C strings prepared before the fork.
        unsafe {
            // The daemon's umask (077) would make the root's folders untraversable for the VM.
            libc::umask(0o022);
            for fd in &self.pass {
                check(libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0))?;
            }
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET,
            ))?;
            // Nothing mounted from here on reaches the host's namespace.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root_c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=256k".as_ptr().cast(),
            ))?;
            for step in &self.steps {
                match step {
                    Step::Dir(p) => {
                        if libc::mkdir(p.as_ptr(), 0o755) != 0
                            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Step::File(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        if fd < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                    Step::Bind {
                        source,
                        target,
                        read_only,
                    } => {
                        check(libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ))?;
                        let mut flags =
                            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
                        if *read_only {
                            flags |= libc::MS_RDONLY;
                        }
                        check(libc::mount(
                            std::ptr::null(),
                            target.as_ptr(),
                            std::ptr::null(),
                            flags,
                            std::ptr::null(),
                        ))?;
                    }
                    Step::Device { path, dev } => {
                        check(libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *dev))?;
                        check(libc::chown(path.as_ptr(), self.id, self.id))?;
                    }
                }
            }
            check(libc::mount(
                std::ptr::null(),
                self.root_c.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ))?;
            libc::umask(0o077);
        }
        Ok(())
    }
}
