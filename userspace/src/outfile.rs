//! Output files that appear only when complete: a command that fails half
//! way never truncates or replaces what was at its `--out` path.
//!
//! Written to a temporary file beside the target (same file system, so the
//! final rename is atomic), renamed over the target on [`OutFile::commit`],
//! removed if dropped uncommitted. A target that exists and is not a
//! regular file (`/dev/null`, a FIFO, a terminal) is written directly: a
//! rename would replace the device node itself with a file.

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
    /// A device or FIFO at the path could not be opened for writing.
    #[error("cannot open {path} for writing")]
    Open {
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
    to: Target,
}

#[derive(Debug)]
enum Target {
    /// A regular file (or none yet): written beside, renamed into place.
    Beside(tempfile::NamedTempFile),
    /// A device, FIFO or socket: written as it is.
    Direct(std::fs::File),
}

impl OutFile {
    /// Starts writing the file that will be `path`.
    pub fn create(path: &Path) -> Result<OutFile, OutFileError> {
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| OutFileError::Open {
                    path: path.to_path_buf(),
                    source,
                })?;
            return Ok(OutFile {
                path: path.to_path_buf(),
                to: Target::Direct(file),
            });
        }
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
            to: Target::Beside(tmp),
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
        match &mut self.to {
            Target::Direct(file) => return file.flush().map_err(err),
            Target::Beside(tmp) => tmp.flush().map_err(err)?,
        }
        let Target::Beside(tmp) = self.to else {
            return Ok(());
        };
        // Readable like a file made by `File::create` (tempfile makes it 0600).
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        tmp.as_file().set_permissions(mode).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(&path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

impl Write for OutFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.to {
            Target::Beside(tmp) => tmp.write(buf),
            Target::Direct(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.to {
            Target::Beside(tmp) => tmp.flush(),
            Target::Direct(file) => file.flush(),
        }
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

    /// `--out /dev/null` discards the output; the rename it used to make
    /// replaced the device node with a regular file (and broke every later
    /// reader of /dev/null on the host). A FIFO stands in for the device.
    #[test]
    fn a_device_or_fifo_is_written_as_it_is_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo (coreutils)");
        assert!(made.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).expect("read the fifo"))
        };
        let mut f = OutFile::create(&fifo).expect("create");
        f.write_all(b"through the pipe").expect("write");
        f.commit().expect("commit");
        assert_eq!(reader.join().expect("reader"), b"through the pipe");
        let kind = std::fs::symlink_metadata(&fifo).expect("stat").file_type();
        assert!(kind.is_fifo(), "still a FIFO: {kind:?}");
        let mut null = OutFile::create(Path::new("/dev/null")).expect("create");
        null.write_all(b"gone").expect("write");
        null.commit().expect("commit");
        let kind = std::fs::symlink_metadata("/dev/null")
            .expect("stat")
            .file_type();
        assert!(kind.is_char_device(), "/dev/null is still a device");
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = OutFile::create(Path::new("/nonexistent-dir/x.trace")).expect_err("no dir");
        assert!(err.to_string().contains("/nonexistent-dir"), "{err}");
    }
}
