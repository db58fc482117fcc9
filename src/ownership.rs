//! Who may have written the files keyward trusts: OpenSSH's StrictModes for the state
//! directory, the socket directory, key files and the databases.
//!
//! keyward refuses to start when another local user could have planted or could replace what
//! it reads: a master key, a sealed store, an audit trail or the directory a socket lives in.
//! The rules (README "Deployment checklist"):
//! - a trusted directory is owned by keyward's uid or root and is not writable by group or
//!   others; every directory above it is owned by keyward's uid or root and, if group- or
//!   world-writable, sticky (like `/tmp`);
//! - every entry in the state directory is a regular file (no symlinks) owned by keyward's uid
//!   or root, not writable by group or others;
//! - a key file is opened with `O_NOFOLLOW`, owned by keyward's uid (then readable by nobody
//!   else) or by root (then not readable by others and writable by nobody else).
//!
//! `ownership` only inspects metadata and opens files; it never changes a mode or an owner, so
//! a directory another user owns is never "fixed" into one keyward would then trust.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A path keyward will not trust, and why. The message names the path and the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnershipError {
    /// The path is owned by another user.
    #[error(
        "{what} {path} is owned by uid {owner}, not by keyward's uid {own} or root: another \
         user could have planted or could replace it; use a path that keyward's user created \
         (e.g. `install -d -m 0700 DIR` as that user) or `chown {own} {path}` if it is yours"
    )]
    ForeignOwner {
        /// What the path is for ("state directory", "key file", …).
        what: &'static str,
        /// The path.
        path: String,
        /// Its owner uid.
        owner: u32,
        /// keyward's effective uid.
        own: u32,
    },
    /// The path is writable by group or others.
    #[error(
        "{what} {path} has mode {mode:04o}: it is writable by {who}, who could replace what \
         keyward reads there; run `chmod go-w {path}`{hint}"
    )]
    Writable {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// "group", "others" or "group and others".
        who: &'static str,
        /// An extra hint for a shared directory such as /tmp.
        hint: &'static str,
    },
    /// A key file is readable by other users.
    #[error(
        "{what} {path} has mode {mode:04o}: other users can read it; run `chmod {fix:o} {path}`"
    )]
    Readable {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// The mode to set.
        fix: u32,
    },
    /// A symlink where a regular file was expected.
    #[error(
        "{what} {path} is a symbolic link; keyward opens it only as a regular file (O_NOFOLLOW) \
         so that nobody can point it elsewhere: give the path of the file itself"
    )]
    Symlink {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
    },
    /// Not a regular file (or not a directory where one was expected).
    #[error("{what} {path} is not a {expected}; remove it or choose another path")]
    WrongType {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// "regular file" or "directory".
        expected: &'static str,
    },
    /// The path could not be inspected or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OwnershipError {
    let path = path.display().to_string();
    move |source| OwnershipError::Io { what, path, source }
}

fn check_owner(what: &'static str, path: &Path, meta: &Metadata) -> Result<(), OwnershipError> {
    let (owner, own) = (meta.uid(), own_uid());
    if owner == own || owner == 0 {
        Ok(())
    } else {
        Err(OwnershipError::ForeignOwner {
            what,
            path: path.display().to_string(),
            owner,
            own,
        })
    }
}

fn check_not_writable(
    what: &'static str,
    path: &Path,
    meta: &Metadata,
    hint: &'static str,
) -> Result<(), OwnershipError> {
    let mode = meta.mode() & 0o7777;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "group",
        (false, true) => "others",
        (true, true) => "group and others",
    };
    Err(OwnershipError::Writable {
        what,
        path: path.display().to_string(),
        mode,
        who,
        hint,
    })
}

/// Checks a directory keyward keeps secrets or sockets in: `dir` itself must be owned by
/// keyward's uid or root and not writable by group or others (sticky or not), and each
/// directory above it owned by keyward's uid or root; one of keyward's own (not root's) must
/// also be closed to group and others unless sticky. Symlinks in the path are resolved first,
/// so the checks apply to what is really there.
///
/// # Errors
/// [`OwnershipError`] naming the first path that fails and the fix.
pub fn check_private_dir(what: &'static str, dir: &Path) -> Result<(), OwnershipError> {
    let real = dir.canonicalize().map_err(io_error(what, dir))?;
    let meta = std::fs::metadata(&real).map_err(io_error(what, &real))?;
    if !meta.is_dir() {
        return Err(OwnershipError::WrongType {
            what,
            path: real.display().to_string(),
            expected: "directory",
        });
    }
    check_owner(what, &real, &meta)?;
    check_not_writable(
        what,
        &real,
        &meta,
        " (a shared directory such as /tmp is never a place for keyward's files: use a \
         directory only keyward's user can write)",
    )?;
    let mut above: Option<PathBuf> = real.parent().map(Path::to_path_buf);
    while let Some(parent) = above {
        let meta = std::fs::metadata(&parent).map_err(io_error("parent directory", &parent))?;
        check_owner("parent directory", &parent, &meta)?;
        // A root-owned parent is the system's or the container runtime's (a Kubernetes emptyDir
        // is root-owned 0777): whoever may write there is decided outside keyward. A parent of
        // keyward's own must be as closed as the directory itself, or sticky like /tmp.
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.uid() != 0 && !sticky {
            check_not_writable("parent directory", &parent, &meta, "")?;
        }
        above = parent.parent().map(Path::to_path_buf);
    }
    Ok(())
}

/// Checks every entry of the state directory: a regular file or directory (never a symlink)
/// owned by keyward's uid or root and not writable by group or others. Sockets are left to
/// the binding code, which replaces only stale ones. Run before anything in
/// it is opened, so a database, journal or key file planted by another user is refused.
///
/// # Errors
/// [`OwnershipError`] naming the first entry that fails and the fix.
pub fn check_state_entries(dir: &Path) -> Result<(), OwnershipError> {
    let what = "state file";
    for entry in std::fs::read_dir(dir).map_err(io_error("state directory", dir))? {
        let entry = entry.map_err(io_error("state directory", dir))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io_error(what, &path))?;
        if meta.file_type().is_symlink() {
            return Err(OwnershipError::Symlink {
                what,
                path: path.display().to_string(),
            });
        }
        // A socket left by an earlier run is 0660 by design; binding checks or replaces it.
        if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            continue;
        }
        check_owner(what, &path, &meta)?;
        check_not_writable(what, &path, &meta, "")?;
    }
    Ok(())
}

/// Opens a key file (`O_NOFOLLOW`) and checks, on the opened file itself, that it is a regular
/// file owned by keyward's uid and readable by nobody else (mode `0600` or `0400`), or owned by
/// root, writable only by root and not readable by others (e.g. `root:keyward 0640`).
///
/// # Errors
/// [`OwnershipError`] naming the file and the fix; a symlink is refused as such.
pub fn open_key_file(what: &'static str, path: &Path) -> Result<File, OwnershipError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                OwnershipError::Symlink {
                    what,
                    path: path.display().to_string(),
                }
            } else {
                io_error(what, path)(e)
            }
        })?;
    let meta = file.metadata().map_err(io_error(what, path))?;
    if !meta.is_file() {
        return Err(OwnershipError::WrongType {
            what,
            path: path.display().to_string(),
            expected: "regular file",
        });
    }
    check_owner(what, path, &meta)?;
    check_not_writable(what, path, &meta, "")?;
    let mode = meta.mode() & 0o7777;
    let (open_to, fix) = if meta.uid() == own_uid() {
        (0o077, 0o600)
    } else {
        (0o007, 0o640)
    };
    if mode & open_to != 0 {
        return Err(OwnershipError::Readable {
            what,
            path: path.display().to_string(),
            mode,
            fix,
        });
    }
    Ok(file)
}

/// Reads a whole key file after [`open_key_file`]'s checks, into memory that is wiped on drop.
///
/// # Errors
/// As [`open_key_file`], plus read errors.
pub fn read_key_file(
    what: &'static str,
    path: &Path,
) -> Result<Zeroizing<Vec<u8>>, OwnershipError> {
    let mut file = open_key_file(what, path)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(128));
    file.read_to_end(&mut bytes).map_err(io_error(what, path))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_directory_passes_and_a_group_writable_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o700);
        check_private_dir("state directory", dir.path()).unwrap();
        chmod(dir.path(), 0o770);
        let e = check_private_dir("state directory", dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by group") && e.contains("chmod go-w"),
            "{e}"
        );
        chmod(dir.path(), 0o1777);
        let e = check_private_dir("state directory", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("group and others") && e.contains("/tmp"), "{e}");
    }

    #[test]
    fn a_parent_owned_by_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            // Making a directory another user's needs root; the CI suite runs as root, and
            // tests/local_trust.rs covers the same rule through the binary.
            assert!(
                std::env::var("CI").is_err(),
                "CI must run this test as root"
            );
            return;
        }
        let outer = tempfile::tempdir().unwrap();
        let inner = outer.path().join("kw");
        std::fs::create_dir(&inner).unwrap();
        chmod(&inner, 0o700);
        // Root-owned and world-writable, as a Kubernetes emptyDir is: trusted.
        chmod(outer.path(), 0o777);
        check_private_dir("state directory", &inner).unwrap();
        nix::unistd::chown(outer.path(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = check_private_dir("state directory", &inner)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("parent directory") && e.contains("owned by uid 65534"),
            "{e}"
        );
    }

    #[test]
    fn key_files_must_not_be_readable_by_others_nor_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        std::fs::write(&key, b"k").unwrap();
        chmod(&key, 0o600);
        assert_eq!(&read_key_file("key file", &key).unwrap()[..], b"k");
        chmod(&key, 0o644);
        let e = read_key_file("key file", &key).unwrap_err().to_string();
        assert!(
            e.contains("other users can read it") && e.contains("chmod 600"),
            "{e}"
        );
        chmod(&key, 0o600);
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let e = read_key_file("key file", &link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_symlink_in_the_state_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("keyward.db")).unwrap();
        let e = check_state_entries(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("keyward.db") && e.contains("symbolic link"),
            "{e}"
        );
    }
}
