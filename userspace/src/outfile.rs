//! Output files that appear only when complete: a command that fails half
//! way never truncates or replaces what was at its `--out` path.
//!
//! Written to a temporary file beside the target (same file system, so the
//! final rename is atomic), renamed over the target on [`OutFile::commit`],
//! removed if dropped uncommitted.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Errors from writing an output file.
#[derive(Debug, thiserror::Error)]
pub enum OutFileError {
    /// The temporary file beside the target could not be made.
    #[error(
        "cannot create a file in {dir} for {path}; check that the directory exists and is writable"
    )]
    Create {
        dir: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing, syncing or renaming into place failed.
    #[error("cannot finish {path}")]
    Commit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A file being written to `path`; `path` itself is untouched until [`commit`](Self::commit).
#[derive(Debug)]
pub struct OutFile {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl OutFile {
    /// Starts writing the file that will be `path`.
    pub fn create(path: &Path) -> Result<OutFile, OutFileError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempfile_in(&dir)
            .map_err(|source| OutFileError::Create {
                dir,
                path: path.to_path_buf(),
                source,
            })?;
        Ok(OutFile {
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// The path the file will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the finished file in place of whatever was at its path.
    pub fn commit(mut self) -> Result<(), OutFileError> {
        let path = self.path;
        let err = |source| OutFileError::Commit {
            path: path.clone(),
            source,
        };
        self.tmp.flush().map_err(err)?;
        // Readable like a file made by `File::create` (tempfile makes it 0600).
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        self.tmp.as_file().set_permissions(mode).map_err(err)?;
        self.tmp.as_file().sync_all().map_err(err)?;
        self.tmp.persist(&path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

impl Write for OutFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_file_replaces_the_old_one_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.trace");
        std::fs::write(&path, b"old").expect("seed");
        let mut f = OutFile::create(&path).expect("create");
        f.write_all(b"new contents").expect("write");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"old",
            "untouched until commit"
        );
        f.commit().expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"new contents");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn an_uncommitted_file_leaves_the_old_one_and_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.trace");
        std::fs::write(&path, b"old").expect("seed");
        let mut f = OutFile::create(&path).expect("create");
        f.write_all(b"half").expect("write");
        drop(f);
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = OutFile::create(Path::new("/nonexistent-dir/x.trace")).expect_err("no dir");
        assert!(err.to_string().contains("/nonexistent-dir"), "{err}");
    }
}
