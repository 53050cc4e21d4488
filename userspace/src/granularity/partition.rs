//! Volumes of a disk: the partitions of its GPT or MBR table, read from the
//! image or device itself, so that "whole volume" can be a replication unit.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use super::GranularityError;

/// One partition, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    pub start: u64,
    pub end: u64,
    pub name: String,
}

/// Which table the volumes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TableKind {
    Gpt,
    Mbr,
    None,
}

/// Reads the partition table at the start of `path` (an image or a device).
pub fn read_volumes(path: &Path) -> Result<(TableKind, Vec<Volume>), GranularityError> {
    let err = |source: std::io::Error| GranularityError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut head = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]).map_err(err)? {
            0 => break,
            n => got += n,
        }
    }
    head.truncate(got);
    parse(&head, |offset, buf| {
        file.read_exact_at(buf, offset).map_err(err)
    })
}

/// Parses the table from the disk's first bytes; `read_at` fetches entry
/// arrays that lie further in.
pub fn parse(
    head: &[u8],
    mut read_at: impl FnMut(u64, &mut [u8]) -> Result<(), GranularityError>,
) -> Result<(TableKind, Vec<Volume>), GranularityError> {
    if head.len() < 512 || head[510] != 0x55 || head[511] != 0xAA {
        return Ok((TableKind::None, Vec::new()));
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &head[446 + 16 * i..462 + 16 * i]).collect();
    if entries.iter().any(|e| e[4] == 0xEE) {
        for sector in [512u16, 4096] {
            if let Some(v) = gpt(head, sector, &mut read_at)? {
                return Ok((TableKind::Gpt, v));
            }
        }
        return Err(GranularityError::Table {
            what: "a protective MBR but no valid GPT header at LBA 1".into(),
        });
    }
    let mut volumes = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let kind = e[4];
        let start = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]])) * 512;
        let len = u64::from(u32::from_le_bytes([e[12], e[13], e[14], e[15]])) * 512;
        if kind == 0 || len == 0 {
            continue;
        }
        volumes.push(Volume {
            start,
            end: start + len,
            name: format!("mbr{} type {kind:#04x}", i + 1),
        });
    }
    volumes.sort_by_key(|v| v.start);
    Ok((TableKind::Mbr, volumes))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

/// The GPT at LBA 1 for `sector`-byte sectors, if its header checks out.
fn gpt(
    head: &[u8],
    sector: u16,
    read_at: &mut impl FnMut(u64, &mut [u8]) -> Result<(), GranularityError>,
) -> Result<Option<Vec<Volume>>, GranularityError> {
    let at = usize::from(sector);
    let sector = u64::from(sector);
    if head.len() < at + 92 || &head[at..at + 8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = le32(head, at + 12) as usize;
    if !(92..=at).contains(&hsize) || head.len() < at + hsize {
        return Ok(None);
    }
    let mut h = head[at..at + hsize].to_vec();
    let want = le32(&h, 16);
    h[16..20].fill(0);
    if crc32(&h) != want {
        return Err(GranularityError::Table {
            what: "the GPT header's CRC32 does not match".into(),
        });
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80) as usize;
    let esize = le32(&h, 84) as usize;
    if !(128..=4096).contains(&esize) || count > 16_384 {
        return Err(GranularityError::Table {
            what: format!("{count} GPT entries of {esize} bytes is not a valid table"),
        });
    }
    let mut array = vec![0u8; count * esize];
    read_at(entries_lba * sector, &mut array)?;
    if crc32(&array) != le32(&h, 88) {
        return Err(GranularityError::Table {
            what: "the GPT partition array's CRC32 does not match".into(),
        });
    }
    let mut volumes = Vec::new();
    for (i, e) in array.chunks_exact(esize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        if last < first {
            continue;
        }
        let name: String = char::decode_utf16(
            e[56..128.min(esize)]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0),
        )
        .map(|c| c.unwrap_or('?'))
        .collect();
        volumes.push(Volume {
            start: first * sector,
            end: (last + 1) * sector,
            name: if name.is_empty() {
                format!("gpt{}", i + 1)
            } else {
                name
            },
        });
    }
    volumes.sort_by_key(|v| v.start);
    Ok(Some(volumes))
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn no_signature_means_no_table() {
        let (kind, v) = parse(&[0u8; 1024], |_, _| Ok(())).expect("parse");
        assert_eq!(kind, TableKind::None);
        assert!(v.is_empty());
    }

    #[test]
    fn an_mbr_entry_is_read_in_sectors() {
        let mut head = vec![0u8; 1024];
        head[510] = 0x55;
        head[511] = 0xAA;
        let e = &mut head[446..462];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&2048u32.to_le_bytes());
        e[12..16].copy_from_slice(&4096u32.to_le_bytes());
        let (kind, v) = parse(&head, |_, _| Ok(())).expect("parse");
        assert_eq!(kind, TableKind::Mbr);
        assert_eq!(
            v,
            vec![Volume {
                start: 1 << 20,
                end: 3 << 20,
                name: "mbr1 type 0x83".into()
            }]
        );
    }
}
