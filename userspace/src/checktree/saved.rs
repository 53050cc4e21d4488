//! A checksum tree kept on disk beside its image (`<image>.tern-tree`), so a
//! later run need not read the image whole to know its hashes.
//!
//! A saved tree is never believed blindly: it carries the image's identity
//! at the moment it was saved and is used only if the image still has it.
//! - A file: device, inode, size and ctime. Every write, truncate or
//!   `fallocate` moves ctime, which no process can set back; since Linux
//!   6.13 (multigrain timestamps) a write right after the ctime was read
//!   gets a distinct ctime even within one clock tick.
//! - A block device: its size, the kernel's count of write and discard
//!   requests it completed (`/sys/dev/block/M:m/stat`) and the boot it was
//!   counted in. Writes that bypass the device (to a loop device's backing
//!   file directly) are not counted; keep such images as files.
//!
//! The file ends with a blake3 of everything before it, so a torn or
//! damaged file is refused, and it is replaced atomically (rename).

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use super::{CheckTree, CheckTreeError, HASH_LEN, Hash, MAX_LEAVES, Shape};

/// Suffix of the file beside an image that holds its saved tree.
pub const SAVED_TREE_SUFFIX: &str = ".tern-tree";

const MAGIC: &[u8; 8] = b"TERNTREE";
/// The file's version is the tree's hash scheme: a tree hashed another way
/// must be hashed again, never believed.
const VERSION: u32 = super::HASH_SCHEME;
/// magic, version, kind, dev, ino, size, ctime s/ns, writes, discards,
/// boot id, region size, image size, leaf count.
const HEADER_LEN: usize = 8 + 4 + 4 + 8 * 7 + 16 + 8 * 3;

const KIND_FILE: u32 = 1;
const KIND_DEVICE: u32 = 2;

/// Errors of a saved tree. Loading errors mean "hash the image again",
/// never a reason to stop.
#[derive(Debug, thiserror::Error)]
pub enum SavedTreeError {
    #[error("no saved tree at {}", path.display())]
    Missing { path: PathBuf },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the saved tree {} is damaged ({what}); the image will be hashed again", path.display())]
    Corrupt { path: PathBuf, what: &'static str },
    #[error(
        "the image changed since its tree {} was saved ({what}); the image will be hashed again",
        path.display()
    )]
    Changed { path: PathBuf, what: &'static str },
    #[error("the saved tree {} does not fit the image: {source}", path.display())]
    Shape {
        path: PathBuf,
        #[source]
        source: CheckTreeError,
    },
}

/// What identifies an image's contents without reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    kind: u32,
    dev: u64,
    ino: u64,
    size: u64,
    ctime_sec: i64,
    ctime_nsec: i64,
    writes: u64,
    discards: u64,
    boot_id: [u8; 16],
}

impl Identity {
    /// The identity of the image at `path`, `size` bytes long (a block
    /// device's size is not in its metadata).
    pub fn of(path: &Path, size: u64) -> Result<Identity, SavedTreeError> {
        let io_err = |action| {
            move |source| SavedTreeError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let meta = fs::metadata(path).map_err(io_err("stat"))?;
        if meta.file_type().is_block_device() {
            let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
            let stat_path = crate::trace::device::sysfs_dir(major, minor).join("stat");
            let stat =
                fs::read_to_string(&stat_path).map_err(io_err("read the device's counters for"))?;
            let (writes, discards) = crate::trace::device::completed_writes_and_discards(&stat)
                .ok_or_else(|| SavedTreeError::Corrupt {
                    path: stat_path.clone(),
                    what: "a counter is not a number",
                })?;
            let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map_err(io_err("read the boot id for"))?;
            Ok(Identity {
                kind: KIND_DEVICE,
                dev: meta.rdev(),
                ino: meta.ino(),
                size,
                ctime_sec: 0,
                ctime_nsec: 0,
                writes,
                discards,
                boot_id: parse_boot_id(&boot),
            })
        } else {
            Ok(Identity {
                kind: KIND_FILE,
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                ctime_sec: meta.ctime(),
                ctime_nsec: meta.ctime_nsec(),
                writes: 0,
                discards: 0,
                boot_id: [0; 16],
            })
        }
    }

    /// Why `self` (saved) is not `now`, if it is not.
    fn differs_from(&self, now: &Identity) -> Option<&'static str> {
        if self.kind != now.kind || self.dev != now.dev || self.ino != now.ino {
            Some("it is another file or device")
        } else if self.size != now.size {
            Some("its size differs")
        } else if self.boot_id != now.boot_id {
            Some("the machine restarted: the device's write counters began again")
        } else if (self.ctime_sec, self.ctime_nsec) != (now.ctime_sec, now.ctime_nsec) {
            Some("its ctime moved: it was written, truncated or its metadata changed")
        } else if (self.writes, self.discards) != (now.writes, now.discards) {
            Some("the device completed writes or discards since")
        } else {
            None
        }
    }
}

fn parse_boot_id(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text.trim().bytes().filter(u8::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    for (byte, pair) in id.iter_mut().zip(hex.chunks(2)) {
        let digit = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => c - b'A' + 10,
        };
        *byte = pair
            .iter()
            .fold(0u8, |acc, &c| acc.wrapping_shl(4) | digit(c));
    }
    id
}

/// Where the tree of the image at `image` is saved.
pub fn path_for(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(SAVED_TREE_SUFFIX);
    PathBuf::from(name)
}

/// Saves `tree`, the image's hashes when it had `identity`, at `path`
/// (written beside it and renamed over it, then synced).
///
/// The caller must make sure nothing wrote the image between taking
/// `identity` and reading the regions `tree` holds, or wrote it only in a
/// way that moves the identity (every write completed before the identity
/// was taken; writes still running then would not move it again).
pub fn save(path: &Path, tree: &CheckTree, identity: &Identity) -> Result<(), SavedTreeError> {
    let io_err = |action| {
        move |source| SavedTreeError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let leaves = tree.level(0).map_err(|source| SavedTreeError::Shape {
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + leaves.len() * HASH_LEN + HASH_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&identity.kind.to_le_bytes());
    for v in [identity.dev, identity.ino, identity.size] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&identity.ctime_sec.to_le_bytes());
    bytes.extend_from_slice(&identity.ctime_nsec.to_le_bytes());
    for v in [identity.writes, identity.discards] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&identity.boot_id);
    let shape = tree.shape();
    for v in [shape.region_size(), shape.image_size(), shape.leaf_count()] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(bytes.len(), HEADER_LEN);
    for leaf in leaves {
        bytes.extend_from_slice(leaf);
    }
    let seal = *blake3::hash(&bytes).as_bytes();
    bytes.extend_from_slice(&seal);

    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(io_err("create"))?;
    file.write_all(&bytes).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("sync"))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename into place"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync the directory of"))?;
    }
    Ok(())
}

/// Loads the tree saved at `path` if it is whole and the image still has
/// the identity it was saved with (`now`).
pub fn load(path: &Path, now: &Identity) -> Result<CheckTree, SavedTreeError> {
    let corrupt = |what| SavedTreeError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SavedTreeError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(SavedTreeError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if bytes.len() < HEADER_LEN + HASH_LEN {
        return Err(corrupt("shorter than its header"));
    }
    let (body, seal) = bytes.split_at(bytes.len() - HASH_LEN);
    if blake3::hash(body).as_bytes() != seal {
        return Err(corrupt("its checksum does not match"));
    }
    let mut r = Reader { bytes: body, at: 0 };
    if r.take(8) != MAGIC {
        return Err(corrupt("not a tern tree file"));
    }
    if r.u32() != VERSION {
        return Err(corrupt(
            "another version (a tree hashed another way, by another tern release)",
        ));
    }
    let saved = Identity {
        kind: r.u32(),
        dev: r.u64(),
        ino: r.u64(),
        size: r.u64(),
        ctime_sec: r.i64(),
        ctime_nsec: r.i64(),
        writes: r.u64(),
        discards: r.u64(),
        boot_id: r.take(16).try_into().expect("took 16 bytes"),
    };
    let (saved_region, image_size, leaf_count) = (r.u64(), r.u64(), r.u64());
    if let Some(what) = saved.differs_from(now) {
        return Err(SavedTreeError::Changed {
            path: path.to_path_buf(),
            what,
        });
    }
    let shape = Shape::new(image_size, saved_region).map_err(|source| SavedTreeError::Shape {
        path: path.to_path_buf(),
        source,
    })?;
    if leaf_count != shape.leaf_count() || leaf_count > MAX_LEAVES {
        return Err(corrupt("its leaf count does not fit its shape"));
    }
    let leaves_len = usize::try_from(leaf_count).expect("at most MAX_LEAVES (2^24)") * HASH_LEN;
    if body.len() - HEADER_LEN != leaves_len {
        return Err(corrupt("its length does not fit its leaf count"));
    }
    let leaves: Vec<Hash> = body[HEADER_LEN..]
        .chunks_exact(HASH_LEN)
        .map(|c| c.try_into().expect("chunks of HASH_LEN"))
        .collect();
    CheckTree::from_leaves(shape, leaves).map_err(|source| SavedTreeError::Shape {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes the tree saved at `path`, if any.
pub fn remove(path: &Path) -> Result<(), SavedTreeError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SavedTreeError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads fixed-size little-endian fields; the caller checked the length.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().expect("took 4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().expect("took 8 bytes"))
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take(8).try_into().expect("took 8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt as _;

    use super::*;

    fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
        let path = dir.join("img");
        let data: Vec<u8> = (0..(1u32 << 20) + 4096)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();
        fs::write(&path, &data).expect("write the image");
        (path, data)
    }

    /// An image in `dir`, its bytes, its tree, where the tree is saved, and its identity.
    fn saved_fixture(dir: &Path) -> (PathBuf, Vec<u8>, CheckTree, PathBuf, Identity) {
        let (img, data) = image(dir);
        let tree = CheckTree::from_bytes(&data, 65536).expect("tree");
        let at = path_for(&img);
        let id = Identity::of(&img, data.len() as u64).expect("identity");
        (img, data, tree, at, id)
    }

    #[test]
    fn a_saved_tree_is_loaded_while_the_image_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, data, tree, at, id) = saved_fixture(dir.path());
        save(&at, &tree, &id).expect("save");
        let again = Identity::of(&img, data.len() as u64).expect("identity");
        assert_eq!(load(&at, &again).expect("load"), tree);
    }

    #[test]
    fn a_write_behind_the_trees_back_makes_it_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, data, tree, at, id) = saved_fixture(dir.path());
        save(&at, &tree, &id).expect("save");
        // The same byte written back: the contents are the same, the ctime
        // is not, and the tree must not be believed.
        let file = fs::OpenOptions::new().write(true).open(&img).expect("open");
        file.write_all_at(&data[..1], 0).expect("write");
        let now = Identity::of(&img, data.len() as u64).expect("identity");
        let err = load(&at, &now).expect_err("the image was written");
        assert!(matches!(err, SavedTreeError::Changed { .. }), "{err}");
    }

    #[test]
    fn a_damaged_or_missing_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, _, tree, at, id) = saved_fixture(dir.path());
        assert!(matches!(
            load(&at, &id),
            Err(SavedTreeError::Missing { .. })
        ));
        save(&at, &tree, &id).expect("save");
        let mut bytes = fs::read(&at).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        fs::write(&at, &bytes).expect("damage");
        assert!(matches!(
            load(&at, &id),
            Err(SavedTreeError::Corrupt { .. })
        ));
        fs::write(&at, &bytes[..bytes.len() - 100]).expect("tear");
        assert!(matches!(
            load(&at, &id),
            Err(SavedTreeError::Corrupt { .. })
        ));
        remove(&at).expect("remove");
        remove(&at).expect("removing twice is fine");
    }

    #[test]
    fn boot_ids_parse_as_their_sixteen_bytes() {
        let id = parse_boot_id("01234567-89ab-cdef-0123-456789ABCDEF\n");
        assert_eq!(id[0], 0x01);
        assert_eq!(id[5], 0xab);
        assert_eq!(id[15], 0xef);
    }
}
