//! A libvirt domain as Tern moves it, driven through `virsh`: its disks as
//! `virsh dumpxml --migratable` describes them, and the destination's
//! definition of the same domain with each disk on a Tern agent's NBD export
//! (libvirt then moves RAM and device state with its own migration; see
//! `pause::libvirt`).
//!
//! libvirt is driven through virsh ([`crate::pause::Virsh`], beside the
//! pause back end that migrates the domain).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::pause::{Virsh, VirshError};
use crate::rpc::NbdExport;
use crate::vm::VmDisk;

/// Errors of talking to libvirt and of reading a domain.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// virsh failed.
    #[error(transparent)]
    Virsh(#[from] VirshError),
    /// The domain is not running (Tern moves a running domain).
    #[error(
        "domain {name} is {state}, not running; start it first (a stopped domain moves with `virsh migrate --offline` and a copy of its files)"
    )]
    NotRunning { name: String, state: String },
    /// The domain's XML is not XML.
    #[error("the XML of domain {name} does not parse: {source}")]
    Xml {
        name: String,
        #[source]
        source: roxmltree::Error,
    },
    /// A disk element without what every libvirt since 1.x writes.
    #[error("disk {index} of domain {name} has no {what}")]
    DiskField {
        name: String,
        index: usize,
        what: &'static str,
    },
    /// A disk with a backing chain: only its top layer would move.
    #[error(
        "disk {target} ({path}) of domain {name} has a backing chain; Tern moves one file per disk: flatten it first (virsh blockpull {name} {target} --wait)"
    )]
    Backing {
        name: String,
        target: String,
        path: PathBuf,
    },
    /// A disk Tern cannot read locally (network, volume, …).
    #[error(
        "disk {target} of domain {name} is a type='{kind}' disk; Tern moves local files and block devices (type='file' or 'block')"
    )]
    NotLocal {
        name: String,
        target: String,
        kind: String,
    },
    /// A qcow2 file that allocates clusters at its end as the guest writes:
    /// it would grow past the size Tern replicates.
    #[error(
        "disk {target} of domain {name} is a qcow2 file of {physical} bytes holding up to {capacity} virtual bytes: it grows as the guest writes, and Tern replicates a fixed size. Give it room with --grow-qcow2 (extends the file, sparse, past what qcow2 can use), preallocate it (a copy with qemu-img convert -O qcow2 -o preallocation=metadata, or virsh blockcopy to one), or use raw"
    )]
    Qcow2Grows {
        name: String,
        target: String,
        physical: u64,
        capacity: u64,
    },
    /// Extending a qcow2 file (`--grow-qcow2`) failed.
    #[error("cannot give disk {target}'s qcow2 file {} room (--grow-qcow2): {source}", path.display())]
    Room {
        target: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `virsh domblkinfo` without a figure every libvirt since 1.x prints.
    #[error("`virsh domblkinfo {name} {target}` has no {key} in bytes: {info}")]
    BlockInfo {
        name: String,
        target: String,
        key: &'static str,
        info: String,
    },
    /// Nothing to move.
    #[error("domain {0} has no local disk to move")]
    NoDisks(String),
    /// A disk the destination definition must point somewhere, and no agent
    /// export was given for it.
    #[error("disk {0} has no NBD export on the destination (its agent needs --nbd)")]
    NoExport(String),
    /// An NBD address that is neither `HOST:PORT` nor a socket path.
    #[error("the agent's NBD address {0:?} is neither HOST:PORT nor a unix socket path")]
    BadAddress(String),
}

/// A running libvirt domain, as Tern moves it.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    /// `virsh dumpxml --migratable`: what the destination is defined from.
    pub xml: String,
    /// The local disks, each by its target (`vda`).
    pub disks: Vec<VmDisk>,
    /// The domain is defined (not transient) on the source.
    pub persistent: bool,
}

/// Reads the running domain `name` over `virsh`.
/// With `grow`, a qcow2 file that can grow is given room
/// ([`crate::vm::make_room`]) instead of refused.
pub async fn describe(virsh: &Virsh, name: &str, grow: bool) -> Result<Domain, LibvirtError> {
    let state = virsh.state(name).await?;
    if state != "running" {
        return Err(LibvirtError::NotRunning {
            name: name.to_owned(),
            state,
        });
    }
    let xml = virsh.run(&["dumpxml", "--migratable", name]).await?;
    let disks = disks_of(name, &xml)?;
    if disks.is_empty() {
        return Err(LibvirtError::NoDisks(name.to_owned()));
    }
    for disk in disks.iter().filter(|d| d.format == "qcow2") {
        let info = virsh.run(&["domblkinfo", name, &disk.name]).await?;
        let bytes = |key: &'static str| {
            info_bytes(&info, key).ok_or_else(|| LibvirtError::BlockInfo {
                name: name.to_owned(),
                target: disk.name.clone(),
                key,
                info: info.trim().to_owned(),
            })
        };
        let (capacity, physical) = (bytes("Capacity")?, bytes("Physical")?);
        if physical < capacity && grow {
            let room = crate::vm::make_room(&disk.path, capacity).map_err(|source| {
                LibvirtError::Room {
                    target: disk.name.clone(),
                    path: disk.path.clone(),
                    source,
                }
            })?;
            tracing::info!(disk = disk.name, room, "gave the growing qcow2 file room");
        } else if physical < capacity {
            return Err(LibvirtError::Qcow2Grows {
                name: name.to_owned(),
                target: disk.name.clone(),
                physical,
                capacity,
            });
        }
    }
    let info = virsh.run(&["dominfo", name]).await?;
    let persistent = info.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim() == "Persistent" && v.trim() == "yes")
    });
    Ok(Domain {
        name: name.to_owned(),
        xml,
        disks,
        persistent,
    })
}

/// A `Key: N` line of `virsh domblkinfo`.
fn info_bytes(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// The disks Tern moves: every `<disk device='disk'|'lun'>`. Media
/// (`cdrom`, `floppy`) stay where they are: the destination host needs them
/// at the same path, as for any libvirt migration.
fn disks_of(name: &str, xml: &str) -> Result<Vec<VmDisk>, LibvirtError> {
    let doc = parse(name, xml)?;
    let mut disks = Vec::new();
    for (index, disk) in disk_elements(&doc).enumerate() {
        let device = disk.attribute("device").unwrap_or("disk");
        if !matches!(device, "disk" | "lun") {
            continue;
        }
        let field = |what| LibvirtError::DiskField {
            name: name.to_owned(),
            index,
            what,
        };
        let target = child(disk, "target")
            .and_then(|t| t.attribute("dev"))
            .ok_or_else(|| field("<target dev=…>"))?
            .to_owned();
        let kind = disk.attribute("type").ok_or_else(|| field("type"))?;
        let source = child(disk, "source");
        let path = match kind {
            "file" => source.and_then(|s| s.attribute("file")),
            "block" => source.and_then(|s| s.attribute("dev")),
            other => {
                return Err(LibvirtError::NotLocal {
                    name: name.to_owned(),
                    target,
                    kind: other.to_owned(),
                });
            }
        }
        .map(PathBuf::from)
        .ok_or_else(|| field("<source file|dev=…>"))?;
        // `--migratable` writes `<backingStore/>` for "none"; a chain has a
        // `<source>` in it.
        if child(disk, "backingStore").is_some_and(|b| child(b, "source").is_some()) {
            return Err(LibvirtError::Backing {
                name: name.to_owned(),
                target,
                path,
            });
        }
        disks.push(VmDisk {
            name: target,
            path,
            format: child(disk, "driver")
                .and_then(|d| d.attribute("type"))
                .unwrap_or("raw")
                .to_owned(),
            read_only: child(disk, "readonly").is_some(),
        });
    }
    Ok(disks)
}

/// The destination's definition: the domain's XML with each disk in
/// `exports` (by target) turned into a `type='network'` NBD disk on that
/// export, and nothing else changed (byte for byte).
pub fn destination_xml(
    name: &str,
    xml: &str,
    exports: &BTreeMap<String, NbdExport>,
) -> Result<String, LibvirtError> {
    let doc = parse(name, xml)?;
    // Edits as (byte range, replacement), applied from the end.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for (index, disk) in disk_elements(&doc).enumerate() {
        let Some(target) = child(disk, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let Some(export) = exports.get(target) else {
            continue;
        };
        let field = |what| LibvirtError::DiskField {
            name: name.to_owned(),
            index,
            what,
        };
        let kind = disk.attribute_node("type").ok_or_else(|| field("type"))?;
        edits.push((kind.range_value(), "network".to_owned()));
        let source = nbd_source(export)?;
        match child(disk, "source") {
            Some(old) => edits.push((old.range(), source)),
            None => return Err(field("<source>")),
        }
    }
    for target in exports.keys() {
        if !disk_elements(&doc)
            .any(|d| child(d, "target").and_then(|t| t.attribute("dev")) == Some(target.as_str()))
        {
            return Err(LibvirtError::NoExport(target.clone()));
        }
    }
    edits.sort_by_key(|(range, _)| std::cmp::Reverse(range.start));
    let mut out = xml.to_owned();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// `<source protocol='nbd' …>` for an agent's export.
fn nbd_source(export: &NbdExport) -> Result<String, LibvirtError> {
    let mut s = format!("<source protocol='nbd' name='{}'", escape(&export.name));
    if export.tls {
        s.push_str(" tls='yes'");
    }
    s.push('>');
    if export.address.starts_with('/') {
        let _ = write!(
            s,
            "<host transport='unix' socket='{}'/>",
            escape(&export.address)
        );
    } else {
        let (host, port) = export
            .address
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .ok_or_else(|| LibvirtError::BadAddress(export.address.clone()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let _ = write!(s, "<host name='{}' port='{port}'/>", escape(host));
    }
    s.push_str("</source>");
    Ok(s)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn parse<'a>(name: &str, xml: &'a str) -> Result<roxmltree::Document<'a>, LibvirtError> {
    roxmltree::Document::parse(xml).map_err(|source| LibvirtError::Xml {
        name: name.to_owned(),
        source,
    })
}

/// `/domain/devices/disk`.
fn disk_elements<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    child(doc.root_element(), "devices")
        .into_iter()
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("disk"))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from libvirt 9.0's `dumpxml --migratable` of a TCG domain.
    const XML: &str = r"<domain type='qemu'>
  <name>web</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web.raw'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source dev='/dev/vg0/web-data'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
  </devices>
</domain>
";

    #[test]
    fn the_disks_are_the_local_disks_by_target_and_media_stay() {
        let disks = disks_of("web", XML).expect("disks");
        assert_eq!(
            disks,
            [
                VmDisk {
                    name: "vda".into(),
                    path: "/var/lib/libvirt/images/web.raw".into(),
                    format: "raw".into(),
                    read_only: false,
                },
                VmDisk {
                    name: "vdb".into(),
                    path: "/dev/vg0/web-data".into(),
                    format: "qcow2".into(),
                    read_only: true,
                },
            ]
        );
    }

    #[test]
    fn a_chain_or_a_network_disk_is_refused_by_target() {
        let chain = XML.replacen(
            "<backingStore/>",
            "<backingStore type='file'><format type='qcow2'/><source file='/b.qcow2'/></backingStore>",
            1,
        );
        let e = disks_of("web", &chain).expect_err("chain").to_string();
        assert!(e.contains("vda") && e.contains("blockpull"), "{e}");
        let net = XML.replacen("type='block'", "type='network'", 1);
        let e = disks_of("web", &net).expect_err("network").to_string();
        assert!(e.contains("vdb") && e.contains("type='network'"), "{e}");
        let e = disks_of("web", "<domain>")
            .expect_err("not XML")
            .to_string();
        assert!(e.contains("web"), "{e}");
    }

    #[test]
    fn the_destination_points_each_disk_at_its_export_and_keeps_the_rest() {
        let exports = BTreeMap::from([
            (
                "vda".to_owned(),
                NbdExport {
                    address: "127.0.0.1:10809".into(),
                    name: "tern".into(),
                    tls: false,
                    advertised_writable: true,
                },
            ),
            (
                "vdb".to_owned(),
                NbdExport {
                    address: "/run/tern/b'.sock".into(),
                    name: "data".into(),
                    tls: true,
                    advertised_writable: true,
                },
            ),
        ]);
        let dest = destination_xml("web", XML, &exports).expect("destination XML");
        let doc = roxmltree::Document::parse(&dest).expect("the result parses");
        let disks: Vec<_> = disk_elements(&doc).collect();
        assert_eq!(disks[0].attribute("type"), Some("network"));
        let src = child(disks[0], "source").expect("source");
        assert_eq!(
            (src.attribute("protocol"), src.attribute("name")),
            (Some("nbd"), Some("tern"))
        );
        let host = child(src, "host").expect("host");
        assert_eq!(
            (host.attribute("name"), host.attribute("port")),
            (Some("127.0.0.1"), Some("10809"))
        );
        let src = child(disks[1], "source").expect("source");
        assert_eq!(src.attribute("tls"), Some("yes"));
        let host = child(src, "host").expect("host");
        assert_eq!(
            (host.attribute("transport"), host.attribute("socket")),
            (Some("unix"), Some("/run/tern/b'.sock"))
        );
        // The media and everything around the disks are as they were.
        assert_eq!(disks[2].attribute("type"), Some("file"));
        assert!(dest.starts_with("<domain type='qemu'>\n  <name>web</name>"));
        assert!(dest.contains("<target dev='vdb' bus='virtio'/>\n      <readonly/>"));
        assert!(!dest.contains("web.raw"));
    }

    #[test]
    fn a_missing_export_or_a_bad_address_is_refused() {
        let unknown = BTreeMap::from([(
            "vdz".to_owned(),
            NbdExport {
                address: "127.0.0.1:1".into(),
                name: "x".into(),
                tls: false,
                advertised_writable: true,
            },
        )]);
        let e = destination_xml("web", XML, &unknown)
            .expect_err("no vdz")
            .to_string();
        assert!(e.contains("vdz"), "{e}");
        let bad = BTreeMap::from([(
            "vda".to_owned(),
            NbdExport {
                address: "localhost".into(),
                name: "x".into(),
                tls: false,
                advertised_writable: true,
            },
        )]);
        let e = destination_xml("web", XML, &bad)
            .expect_err("no port")
            .to_string();
        assert!(e.contains("localhost"), "{e}");
        let v6 = BTreeMap::from([(
            "vda".to_owned(),
            NbdExport {
                address: "[::1]:10809".into(),
                name: "x".into(),
                tls: false,
                advertised_writable: true,
            },
        )]);
        let dest = destination_xml("web", XML, &v6).expect("IPv6");
        assert!(dest.contains("<host name='::1' port='10809'/>"), "{dest}");
    }
}
