//! Least privilege on disk: the daemon's folders are 0700 and its files (database, console logs,
//! volumes, cloud-init seeds with passwords, VM run folders) 0600.
//!
//! ferrovirtd sets its umask to 077 first thing ([`restrict_umask`]), so whatever it or the
//! processes it starts (QEMU, ferrovmm, dnsmasq, genisoimage, SQLite's -wal/-shm) create is
//! private; the functions here also make the modes explicit where the daemon creates files, and
//! tighten folders and files left more open by older versions.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the daemon's folders.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the run folder that holds the API socket: its group (the group that may manage VMs)
/// may reach the 0660 socket by name, but not list the folder.
pub const SOCKET_DIR_MODE: u32 = 0o710;
/// Mode of files with guest data or secrets.
pub const FILE_MODE: u32 = 0o600;

/// Files and folders created from now on are private to the daemon's user.
pub fn restrict_umask() {
    // SAFETY: umask(2) only changes the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Create `dir` (and missing parents) with `mode`, and set `mode` on it if it existed.
pub fn dir_with_mode(dir: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    fs::set_permissions(dir, Permissions::from_mode(mode))
}

/// A private folder (0700), created or tightened; errors name the folder.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    dir_with_mode(dir, DIR_MODE).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Create (or truncate) a private file (0600).
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Open a private file (0600) for appending, creating it if needed.
pub fn append_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Write a private file (0600) whole.
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) -> io::Result<()> {
    use std::io::Write;
    let mut f = create_private(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(data.as_ref())
}

/// Set 0600 on a file if it exists (files made by other programs, or by older versions).
pub fn make_private(path: &Path) -> io::Result<()> {
    match fs::set_permissions(path, Permissions::from_mode(FILE_MODE)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Drop the group and other bits of every folder and regular file under `dir` (and of `dir`):
/// what an older version created 0755/0644 (console logs, volumes, seeds, VM run folders)
/// becomes 0700/0600. Symlinks are not followed; sockets and the like are left alone (they
/// sit in folders nobody else can enter).
pub fn tighten_tree(dir: &Path) -> io::Result<()> {
    /// Deeper than anything the daemon creates; a bound on the walk all the same.
    const MAX_DEPTH: usize = 16;
    fn walk(path: &Path, depth: usize) -> io::Result<()> {
        let meta = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let kind = meta.file_type();
        if !(kind.is_dir() || kind.is_file()) {
            return Ok(());
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            fs::set_permissions(path, Permissions::from_mode(mode & 0o700))?;
        }
        if kind.is_dir() && depth < MAX_DEPTH {
            for entry in fs::read_dir(path)? {
                walk(&entry?.path(), depth + 1)?;
            }
        }
        Ok(())
    }
    walk(dir, 0)
}

/// `path` with `.` and `..` resolved lexically (for a path that does not exist).
fn normalize(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Whether two paths name the same file: after resolving `.`, `..` and symlinks, or as the same
/// inode (a hard link). Decides "in use", where a literal comparison is fooled by
/// `/state/../state/images/v` or a symlink.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| normalize(p));
    if canon(a) == canon(b) {
        return true;
    }
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_sees_through_dot_dot_symlinks_and_hard_links() {
        let base = std::env::temp_dir().join(format!("ferrovirt-same-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("images")).unwrap();
        let v = base.join("images/v");
        fs::write(&v, "disk").unwrap();
        assert!(same_file(&v, &base.join("images/../images/./v")));
        std::os::unix::fs::symlink(&v, base.join("link")).unwrap();
        assert!(same_file(&v, &base.join("link")));
        fs::hard_link(&v, base.join("hard")).unwrap();
        assert!(same_file(&v, &base.join("hard")));
        assert!(same_file(&base.join("gone"), &base.join("images/../gone")));
        fs::write(base.join("w"), "other").unwrap();
        assert!(!same_file(&v, &base.join("w")));
        let _ = fs::remove_dir_all(&base);
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn folders_and_files_get_private_modes_even_when_they_existed() {
        let base = std::env::temp_dir().join(format!("ferrovirt-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let open = base.join("open");
        fs::create_dir_all(&open).unwrap();
        fs::set_permissions(&open, Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
        private_dir(&base.join("a/b")).unwrap();
        assert_eq!(mode(&base.join("a/b")), 0o700);
        let f = open.join("f");
        fs::write(&f, "x").unwrap();
        fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        write_private(&f, "secret").unwrap();
        assert_eq!(mode(&f), 0o600);
        let log = open.join("log");
        append_private(&log).unwrap();
        assert_eq!(mode(&log), 0o600);
        make_private(&open.join("absent")).unwrap();
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_tree_left_open_by_an_older_version_is_tightened_without_following_links() {
        let base = std::env::temp_dir().join(format!("ferrovirt-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let outside = base.join("outside");
        let state = base.join("state");
        fs::create_dir_all(state.join("logs/deep/er")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let files = [
            state.join("logs/vm.log"),
            state.join("logs/deep/er/seed.iso"),
        ];
        for f in &files {
            fs::write(f, "guest data").unwrap();
            fs::set_permissions(f, Permissions::from_mode(0o644)).unwrap();
        }
        let exe = state.join("logs/hook");
        fs::write(&exe, "#!/bin/sh").unwrap();
        fs::set_permissions(&exe, Permissions::from_mode(0o755)).unwrap();
        for d in [
            &state,
            &state.join("logs"),
            &state.join("logs/deep"),
            &outside,
        ] {
            fs::set_permissions(d, Permissions::from_mode(0o755)).unwrap();
        }
        let target = outside.join("not-ours");
        fs::write(&target, "x").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, state.join("link-to-dir")).unwrap();
        std::os::unix::fs::symlink(&target, state.join("link-to-file")).unwrap();

        tighten_tree(&state).unwrap();
        for d in [&state, &state.join("logs"), &state.join("logs/deep/er")] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        for f in &files {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        assert_eq!(mode(&exe), 0o700);
        assert_eq!(
            mode(&outside),
            0o755,
            "a symlinked folder is not ours to change"
        );
        assert_eq!(
            mode(&target),
            0o644,
            "a symlinked file is not ours to change"
        );
        tighten_tree(&base.join("absent")).unwrap();
        let _ = fs::remove_dir_all(&base);
    }
}
