//! The settings file through the real binary: a command takes its table's
//! flags, the command line overrides them, a wrong key stops the command.

use std::path::Path;
use std::process::Command;

fn tern(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run tern")
}

#[test]
fn a_command_takes_its_settings_and_the_command_line_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, "[certs.init]\nhost = [\"src\", \"dst\"]\n").expect("write");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("a UTF-8 path");
    let out = tern(&config, &["certs", "init", pki]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for host in ["src", "dst"] {
        assert!(
            Path::new(pki).join(host).join("cert.pem").exists(),
            "{host}"
        );
    }
    // --host on the command line replaces the file's list.
    let other = dir.path().join("other");
    let other = other.to_str().expect("a UTF-8 path");
    let out = tern(&config, &["certs", "init", other, "--host", "solo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Path::new(other).join("solo").exists());
    assert!(!Path::new(other).join("src").exists());

    std::fs::write(&config, "[certs.init]\nhosts = [\"src\"]\n").expect("write");
    let out = tern(&config, &["certs", "init", pki]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[certs.init] sets hosts, which `tern certs init` does not take"),
        "{err}"
    );
}
