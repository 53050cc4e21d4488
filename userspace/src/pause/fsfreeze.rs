//! The `fsfreeze:MOUNT` back end: `FIFREEZE` on the file system mounted at a
//! directory, which also flushes its dirty data to the block device, and
//! `FITHAW` to resume.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{Hold, PauseError, Paused, io_err};

/// `FIFREEZE` = `_IOWR('X', 119, int)` from `<linux/fs.h>`.
const FIFREEZE: libc::Ioctl = iowr_int(b'X', 119);
/// `FITHAW` = `_IOWR('X', 120, int)` from `<linux/fs.h>`.
const FITHAW: libc::Ioctl = iowr_int(b'X', 120);

/// The generic `_IOWR(type, nr, int)` encoding: direction bits 30–31
/// (read|write = 3), argument size bits 16–29, type bits 8–15, number bits 0–7.
const fn iowr_int(ty: u8, nr: u8) -> libc::Ioctl {
    (3 << 30)
        | ((size_of::<libc::c_int>() as libc::Ioctl) << 16)
        | ((ty as libc::Ioctl) << 8)
        | nr as libc::Ioctl
}

/// Freezes the file system mounted at `mount`.
pub(super) async fn freeze(mount: &Path) -> Result<Paused, PauseError> {
    let mount = mount.to_path_buf();
    // FIFREEZE writes back the file system's dirty data first, so it
    // blocks for as long as that takes. The guard is built inside the
    // closure: if this future is dropped meanwhile, tokio drops the
    // closure's result and the guard thaws.
    tokio::task::spawn_blocking(move || freeze_blocking(&mount))
        .await
        .expect("the fsfreeze task does not panic")
}

fn freeze_blocking(mount: &Path) -> Result<Paused, PauseError> {
    let mount = std::fs::canonicalize(mount).map_err(io_err("resolve", mount))?;
    if !is_mount_point(&mount)? {
        return Err(PauseError::NotMountPoint(mount));
    }
    let dir = File::open(&mount).map_err(io_err("open", &mount))?;
    // SAFETY: `dir` is an open descriptor for the whole call; FIFREEZE takes
    // no argument memory (the int argument is ignored by the kernel).
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(PauseError::AlreadyFrozen(mount));
        }
        return Err(PauseError::Io {
            action: "freeze (FIFREEZE) the file system at",
            path: mount,
            source: e,
        });
    }
    Ok(Paused::new(Hold::Fsfreeze { mount, dir }))
}

/// Thaws the file system at `mount` through `dir`, its open mount point.
pub(super) fn thaw(mount: &Path, dir: &File) -> Result<(), PauseError> {
    // SAFETY: `dir` is an open descriptor for the whole call; FITHAW takes no
    // argument memory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
    if rc != 0 {
        return Err(PauseError::Io {
            action: "thaw (FITHAW) the file system at",
            path: mount.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `path` (canonical) is listed as a mount point in our mount namespace.
fn is_mount_point(path: &Path) -> Result<bool, PauseError> {
    let table = Path::new("/proc/self/mountinfo");
    let info = std::fs::read_to_string(table).map_err(io_err("read", table))?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| Path::new(&unescape_mountinfo(field)) == path))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // Three octal digits that make a byte (the kernel escapes bytes, so \377 at most).
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
            && let Ok(n) = u8::try_from(
                bytes[i + 1..=i + 3]
                    .iter()
                    .fold(0u32, |n, b| n * 8 + u32::from(b - b'0')),
            )
        {
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pause::PauseTarget;

    #[test]
    fn ioctl_numbers_match_linux_fs_h() {
        assert_eq!(FIFREEZE, 0xC004_5877);
        assert_eq!(FITHAW, 0xC004_5878);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo(r"/x\\y"), r"/x\\y");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn root_is_a_mount_point_and_proc_self_is_not() {
        assert!(is_mount_point(Path::new("/")).expect("mountinfo readable"));
        assert!(!is_mount_point(Path::new("/proc/self")).expect("mountinfo readable"));
    }

    #[tokio::test]
    async fn fsfreeze_refuses_a_directory_that_is_not_a_mount_point() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = PauseTarget::Fsfreeze(dir.path().into())
            .pause()
            .await
            .expect_err("not a mount point");
        assert!(matches!(e, PauseError::NotMountPoint(_)), "{e}");
    }
}
