//! The packaged files: the agents' systemd units pass `systemd-analyze
//! verify` (with the built binary in place of /usr/local/bin/tern), and
//! each unit's command line, with the example settings file it names, runs
//! past every check of its flags to the first resource this machine lacks.

use std::path::{Path, PathBuf};
use std::process::Command;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// The unit's `ExecStart=` words.
fn exec_start(unit: &str) -> Vec<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_agents_units_verify_and_run_tern_as_their_settings_say() {
    let tern = env!("CARGO_BIN_EXE_tern");
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, instance, example, first_lack) in [
        (
            "tern-destination.service",
            "tern-destination.service",
            "destination.toml",
            "cannot read /etc/tern/pki/dst/ca.pem",
        ),
        (
            "tern-source@.service",
            "tern-source@vdb.service",
            "source-vdb.toml",
            "could not open the image /dev/vdb",
        ),
    ] {
        let text =
            std::fs::read_to_string(packaging().join("systemd").join(file)).expect("read the unit");
        let words = exec_start(&text);
        assert_eq!(words[0], "/usr/local/bin/tern", "{file}");
        let unit = dir.path().join(instance);
        std::fs::write(&unit, text.replace("/usr/local/bin/tern", tern)).expect("write");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze (Debian's systemd package; cargo xtask setup installs it)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{file}: {err}"
        );

        // The same command with the example settings in place of /etc/tern's.
        let config = words
            .iter()
            .position(|w| w == "--config")
            .expect("the unit names its settings file");
        let named = words[config + 1].replace("%i", "vdb");
        assert_eq!(
            Path::new(&named).file_name().and_then(|n| n.to_str()),
            Some(example),
            "{file} reads {named}"
        );
        let mut args: Vec<String> = words[1..].to_vec();
        args[config] = packaging().join(example).display().to_string();
        // Run for real: past the settings and the role's checks, it stops at
        // the first thing this machine lacks (the example's disk, or its
        // certificates), which says the whole command line was accepted.
        if file.starts_with("tern-source") {
            // Its status file away from /run/tern (a source's flag only).
            args.push("--state-dir".into());
            args.push(dir.path().join("state").display().to_string());
        }
        let out = Command::new(tern).args(&args).output().expect("run tern");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} with {example} ran: {err}");
        assert!(err.contains(first_lack), "{file} with {example}: {err}");
    }
}
