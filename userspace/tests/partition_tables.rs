//! Volumes read from real GPT and MBR tables made by `sgdisk` and `sfdisk`,
//! checked against what `sfdisk --json` reads back from the same image.

use std::path::Path;
use std::process::Command;

use tern::granularity::{TableKind, read_volumes};

/// Runs a tool with a 30 s bound; panics with its output on failure.
fn tool(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("timeout");
    cmd.arg("30").args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("start a partitioning tool (apt: gdisk, fdisk)");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .expect("write the script");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("wait for the tool");
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(start, end)` bytes of every partition as sfdisk reads them.
fn sfdisk_view(image: &Path) -> Vec<(u64, u64)> {
    let json = tool(
        &["sfdisk", "--json", image.to_str().expect("utf-8 path")],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("sfdisk --json");
    let sector = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let mut parts: Vec<(u64, u64)> = v["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            let start = p["start"].as_u64().expect("start") * sector;
            (start, start + p["size"].as_u64().expect("size") * sector)
        })
        .collect();
    parts.sort_unstable();
    parts
}

fn image(dir: &Path, mib: u64) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).expect("create the image");
    f.set_len(mib << 20).expect("size the image");
    path
}

#[test]
fn gpt_partitions_made_by_sgdisk_are_read_as_sfdisk_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), 64);
    let p = img.to_str().expect("utf-8 path");
    tool(
        &[
            "sgdisk",
            "-n",
            "1:2048:+16M",
            "-c",
            "1:boot",
            "-n",
            "2:0:+20M",
            "-c",
            "2:data",
            "-n",
            "3:0:0",
            p,
        ],
        None,
    );
    let (kind, volumes) = read_volumes(&img).expect("read the GPT");
    assert_eq!(kind, TableKind::Gpt);
    let ours: Vec<(u64, u64)> = volumes.iter().map(|v| (v.start, v.end)).collect();
    assert_eq!(ours, sfdisk_view(&img));
    assert_eq!(ours[0], (1 << 20, 17 << 20));
    assert_eq!(volumes[0].name, "boot");
    assert_eq!(volumes[1].name, "data");
}

#[test]
fn mbr_partitions_made_by_sfdisk_are_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), 64);
    let p = img.to_str().expect("utf-8 path");
    tool(
        &["sfdisk", "--quiet", p],
        Some("label: dos\n2048,20480,83\n24576,40960,83\n"),
    );
    let (kind, volumes) = read_volumes(&img).expect("read the MBR");
    assert_eq!(kind, TableKind::Mbr);
    let ours: Vec<(u64, u64)> = volumes.iter().map(|v| (v.start, v.end)).collect();
    assert_eq!(ours, sfdisk_view(&img));
    assert_eq!(ours, vec![(1 << 20, 11 << 20), (12 << 20, 32 << 20)]);
}

#[test]
fn a_corrupted_gpt_header_is_an_error_not_silence() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), 16);
    let p = img.to_str().expect("utf-8 path");
    tool(&["sgdisk", "-n", "1:2048:0", p], None);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    // A byte of the disk GUID: the header CRC no longer matches.
    f.write_all_at(&[0x5a], 512 + 60).expect("corrupt");
    let e = read_volumes(&img).expect_err("a bad CRC must be reported");
    assert!(e.to_string().contains("CRC32"), "{e}");
}
