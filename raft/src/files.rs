//! Writing secrets to disk: the cluster CA and member keys here, the token key and the
//! first admin's password in the node.
//!
//! A key must never be readable by others, not even for the moment between creating a
//! file and changing its mode, and a crash while it is written must not leave a file
//! that looks whole but is cut short (a node would then refuse to start, or, worse,
//! start with a weaker key). So a file is created under a fresh name with mode 0600 from
//! its first byte, written, fsynced, renamed over the target, and the folder fsynced so
//! the rename itself survives a power cut.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path`, readable and writable by the owner only, replacing any
/// file there. After a crash `path` holds either its old content or all of `bytes`.
/// Errors name the file they concern.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (temp, mut file) = create_temp(&dir, path).map_err(named)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&temp, path)) {
        // The half-written copy is useless and holds part of a secret: best effort.
        let _ = std::fs::remove_file(&temp);
        return Err(named(e));
    }
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(named)
}

/// Creates a file no other process can have opened: a name of our own (process id and a
/// counter) opened with `create_new`, so a leftover from an earlier crash or a
/// concurrent writer of the same target is never reused with its old mode or content.
fn create_temp(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    loop {
        let temp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(&temp) {
            Ok(file) => return Ok((temp, file)),
            // Left by an earlier process that had our id; take the next number.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn writes_the_exact_bytes_owner_only_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let bytes: Vec<u8> = (0..=255u8).collect();
        write_private(&path, &bytes).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "mode is {mode:o}");
        }
        assert_eq!(names(dir.path()), vec!["token.key"]);
    }

    #[test]
    fn replaces_a_readable_file_with_a_private_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        std::fs::write(&path, b"an older and much longer content").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "mode is {mode:o}");
        }
        assert_eq!(names(dir.path()), vec!["ca.key"]);
    }

    #[test]
    fn an_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-folder").join("token.key");
        let error = write_private(&path, b"secret").unwrap_err();
        assert!(error.to_string().contains("token.key"), "{error}");
    }
}
