//! A whole QEMU VM as one migration: its disks and its RAM file as QEMU
//! itself describes them over QMP, each replicated by its own migration,
//! all sharing one pause ([`crate::pause::PauseGroup`]).
//!
//! `query-block` names the guest's disks (every inserted medium attached to
//! a device) and their files; `query-memdev` and `qom-get mem-path` name
//! the RAM backend's file when it is a shared file (`memory-backend-file,
//! share=on`): then Tern replicates RAM too, and QEMU is told to leave
//! shared RAM out of its own stream (`x-ignore-shared`).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::pause::{PauseError, Qmp};

/// Errors describing a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] PauseError),
    /// A QMP reply without the fields every QEMU since 2.x sends.
    #[error("QEMU's {command} reply has no {field}: {reply}")]
    Reply {
        command: &'static str,
        field: &'static str,
        reply: String,
    },
    /// A disk whose image has a backing file: only the top layer would move.
    #[error(
        "disk {name} ({path}) has a backing file {backing}; Tern moves one file per disk: flatten it first (qemu-img rebase -b '' or a block-stream)"
    )]
    Backing {
        name: String,
        path: PathBuf,
        backing: String,
    },
    /// A disk that is not a local file or block device (NBD, iSCSI, …).
    #[error(
        "disk {name} is served by QEMU's {driver} driver, not a local file; Tern moves local files and block devices"
    )]
    NotLocal { name: String, driver: String },
    /// A qcow2 file that allocates clusters at its end as the guest writes.
    #[error(
        "disk {name} ({path}) is a qcow2 file of {file_bytes} bytes holding up to {virtual_bytes} virtual bytes: it grows as the guest writes, and Tern replicates a fixed size. Give it room with --grow-qcow2 (extends the file, sparse, past what qcow2 can use), preallocate it (qemu-img convert -O qcow2 -o preallocation=metadata), or use raw"
    )]
    Qcow2Grows {
        name: String,
        path: PathBuf,
        file_bytes: u64,
        virtual_bytes: u64,
    },
    /// Extending a qcow2 file (`--grow-qcow2`) failed.
    #[error("cannot give the qcow2 file {path} room (--grow-qcow2): {source}")]
    Room {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Nothing to move.
    #[error("the VM at {0} has no disk attached to a device")]
    NoDisks(PathBuf),
}

/// The most a qcow2 file holding `capacity` virtual bytes grows to (every
/// cluster allocated, with its L2 and refcount entries, down to 512-byte
/// clusters), with room to spare; internal snapshots aside.
pub fn qcow2_room(capacity: u64) -> u64 {
    let mib = 1 << 20;
    capacity
        .saturating_add(capacity / 32)
        .saturating_add(16 * mib)
        .div_ceil(mib)
        .saturating_mul(mib)
}

/// Gives a growing qcow2 file room (`--grow-qcow2`): extends it, sparse,
/// to [`qcow2_room`]. The tail is no cluster qcow2 references (QEMU finds
/// it free and allocates its new clusters there), so the file no longer
/// grows while Tern replicates a fixed size. Never shrinks; the new size.
pub fn make_room(path: &Path, capacity: u64) -> std::io::Result<u64> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let room = qcow2_room(capacity);
    if file.metadata()?.len() < room {
        file.set_len(room)?;
    }
    Ok(room.max(file.metadata()?.len()))
}

/// One of the guest's disks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmDisk {
    /// The device's id (`-device …,id=NAME`), or the drive's name.
    pub name: String,
    /// The file or block device QEMU has open.
    pub path: PathBuf,
    /// QEMU's format driver on it (`raw`, `qcow2`): the file moves as it is.
    pub format: String,
    pub read_only: bool,
}

/// Guest RAM in a shared file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmRam {
    /// The memory backend's id.
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
}

/// What a VM is made of, as Tern moves it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmLayout {
    pub disks: Vec<VmDisk>,
    /// `None`: RAM is anonymous (or not shared), and QEMU moves it.
    pub ram: Option<VmRam>,
}

/// Asks the QEMU at `socket` for its disks and RAM file. The connection is
/// closed on return (QEMU serves one QMP client at a time).
/// With `grow`, a qcow2 file that can grow is given room ([`make_room`])
/// instead of refused.
pub async fn describe(socket: &Path, grow: bool) -> Result<VmLayout, VmError> {
    let mut qmp = Qmp::connect(socket).await?;
    let blocks = qmp.execute("query-block", None).await?;
    let disks = disks_of(&blocks, grow)?;
    if disks.is_empty() {
        return Err(VmError::NoDisks(socket.to_path_buf()));
    }
    let memdevs = qmp.execute("query-memdev", None).await?;
    let mut files = Vec::new();
    for dev in memdevs.as_array().into_iter().flatten() {
        if dev["share"] != true {
            continue;
        }
        let id = field(dev, "id", "query-memdev")?.to_owned();
        let path = qmp
            .execute(
                "qom-get",
                Some(json!({ "path": format!("/objects/{id}"), "property": "mem-path" })),
            )
            .await;
        // A shared backend without a path (memfd) lives in no file Tern reads.
        if let Ok(Value::String(path)) = path {
            files.push(VmRam {
                id,
                path: PathBuf::from(path),
                size: dev["size"].as_u64().unwrap_or(0),
            });
        }
    }
    // One RAM file: Tern's. Several (NUMA nodes) are left to QEMU for now.
    let ram = (files.len() == 1).then(|| files.remove(0));
    Ok(VmLayout { disks, ram })
}

/// The guest's disks from a `query-block` reply.
fn disks_of(blocks: &Value, grow: bool) -> Result<Vec<VmDisk>, VmError> {
    let mut disks = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let (Some(inserted), Some(qdev)) = (b.get("inserted"), b["qdev"].as_str()) else {
            // An empty drive, or one attached to no device: not the guest's.
            continue;
        };
        let device = b["device"].as_str().unwrap_or_default();
        // The name an operator typed: the drive's, the device's id
        // (`/machine/peripheral/NAME/…`), else the block node's.
        let name = if device.is_empty() {
            qdev.strip_prefix("/machine/peripheral/")
                .and_then(|rest| rest.split('/').next())
                .or_else(|| inserted["node-name"].as_str())
                .unwrap_or(qdev)
                .to_owned()
        } else {
            device.to_owned()
        };
        let file = field(inserted, "file", "query-block")?;
        let image = &inserted["image"];
        if let Some(backing) = image["backing-filename"].as_str() {
            return Err(VmError::Backing {
                name,
                path: PathBuf::from(file),
                backing: backing.to_owned(),
            });
        }
        // `file` is a path for local protocols, a JSON/URI for the others.
        if !file.starts_with('/') {
            return Err(VmError::NotLocal {
                name,
                driver: file.split(':').next().unwrap_or(file).to_owned(),
            });
        }
        let format = field(inserted, "drv", "query-block")?;
        if format == "qcow2"
            && let Some(virtual_bytes) = image["virtual-size"].as_u64()
            && let Ok(md) = std::fs::metadata(file)
            && md.is_file()
            && md.len() < virtual_bytes
        {
            if grow {
                let room =
                    make_room(Path::new(file), virtual_bytes).map_err(|source| VmError::Room {
                        path: PathBuf::from(file),
                        source,
                    })?;
                tracing::info!(disk = name, file, room, "gave the growing qcow2 file room");
            } else {
                return Err(VmError::Qcow2Grows {
                    name,
                    path: PathBuf::from(file),
                    file_bytes: md.len(),
                    virtual_bytes,
                });
            }
        }
        disks.push(VmDisk {
            name,
            path: PathBuf::from(file),
            format: format.to_owned(),
            read_only: inserted["ro"] == true,
        });
    }
    Ok(disks)
}

fn field<'a>(v: &'a Value, name: &'static str, command: &'static str) -> Result<&'a str, VmError> {
    v[name].as_str().ok_or_else(|| VmError::Reply {
        command,
        field: name,
        reply: v.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_the_inserted_media_attached_to_devices() {
        // Trimmed from QEMU 10.0's reply for -blockdev disks, a -drive with
        // no device and an empty CD-ROM.
        let reply = json!([
            { "device": "legacy0", "inserted": { "file": "/tmp/a.img", "drv": "raw", "ro": false, "image": {} } },
            { "device": "ide2-cd0", "qdev": "/machine/unattached/device[15]" },
            { "device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
              "inserted": { "file": "/tmp/a.img", "drv": "raw", "ro": false, "image": {} } },
            { "device": "", "qdev": "/machine/peripheral/vd1/virtio-backend",
              "inserted": { "file": "/tmp/b.qcow2", "drv": "qcow2", "ro": true, "image": {} } },
        ]);
        let disks = disks_of(&reply, false).expect("disks");
        assert_eq!(
            disks,
            [
                VmDisk {
                    name: "vd0".into(),
                    path: "/tmp/a.img".into(),
                    format: "raw".into(),
                    read_only: false
                },
                VmDisk {
                    name: "vd1".into(),
                    path: "/tmp/b.qcow2".into(),
                    format: "qcow2".into(),
                    read_only: true
                },
            ]
        );
    }

    #[test]
    fn a_backing_chain_or_a_remote_disk_is_refused_by_name() {
        let backing = json!([{ "device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
            "inserted": { "file": "/tmp/top.qcow2", "drv": "qcow2",
                          "image": { "backing-filename": "/tmp/base.qcow2" } } }]);
        let e = disks_of(&backing, false).expect_err("backing").to_string();
        assert!(e.contains("vd0") && e.contains("base.qcow2"), "{e}");
        let remote = json!([{ "device": "virtio0", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
            "inserted": { "file": "nbd://10.0.0.1:10809/x", "drv": "raw", "image": {} } }]);
        let e = disks_of(&remote, false).expect_err("remote").to_string();
        assert!(e.contains("virtio0") && e.contains("nbd"), "{e}");
    }

    #[test]
    fn a_qcow2_file_that_can_grow_is_refused_and_a_preallocated_one_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("d.qcow2");
        std::fs::write(&file, vec![0u8; 4096]).expect("write");
        let reply = |virtual_size: u64| {
            json!([{ "device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
                "inserted": { "file": file.display().to_string(), "drv": "qcow2", "ro": false,
                              "image": { "virtual-size": virtual_size } } }])
        };
        let e = disks_of(&reply(1 << 20), false)
            .expect_err("grows")
            .to_string();
        assert!(e.contains("vd0") && e.contains("--grow-qcow2"), "{e}");
        assert_eq!(disks_of(&reply(4096), false).expect("fits").len(), 1);
        // Given room: extended (sparse) past what 1 MiB of clusters needs.
        assert_eq!(disks_of(&reply(1 << 20), true).expect("room").len(), 1);
        let len = std::fs::metadata(&file).expect("stat").len();
        assert_eq!(len, qcow2_room(1 << 20));
        assert!(len >= (1 << 20) + (1 << 20) / 32 + (16 << 20), "{len}");
        // Never shrunk.
        assert_eq!(make_room(&file, 4096).expect("again"), len);
    }
}
