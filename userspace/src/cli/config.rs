//! The settings file: `/etc/tern/tern.toml` when it exists, or `--config
//! FILE`. One table per command, named as on the command line (`[agent]`,
//! `[migrate]`, `[nbd.serve]`), holding that command's flags by their long
//! names without the dashes (`tls-dir = "/etc/tern/pki/src"`, `direct =
//! true`, `host = ["src", "dst"]` for a flag given several times). They are
//! put on the command line (in the keys' order) before the operator's own flags, and a flag the
//! operator gives replaces the file's: the file holds a host's standing
//! choices, the command line the exception. Every key is checked against the
//! command's flags, so a misspelt setting is an error naming the file, not a
//! silently ignored line.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Read when it exists and no `--config` names another file.
pub const DEFAULT_PATH: &str = "/etc/tern/tern.toml";

/// `args` (the program's, its name first) with the settings for its command
/// added from the file `--config` names, else from `default` if it exists.
pub fn expand(args: Vec<OsString>, cli: &clap::Command, default: &Path) -> Result<Vec<OsString>> {
    let (file, explicit) = match config_flag(&args) {
        Some(path) => (path, true),
        None => (default.to_path_buf(), false),
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(args),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the settings file {}", file.display()));
        }
    };
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not a TOML settings file", file.display()))?;
    let (path, at, command) = command_path(&args, cli);
    let Some(settings) = section(&table, &path, &file)? else {
        return Ok(args);
    };
    let given = &args[at..];
    let mut flags = Vec::new();
    for (key, value) in settings {
        if value.is_table() {
            // A subcommand's own table (`[nbd.serve]` inside `[nbd]`).
            if command.find_subcommand(key).is_some() {
                continue;
            }
            bail!(
                "{}: [{}] {key} is a table, but `tern {}` has no subcommand {key}",
                file.display(),
                path.join("."),
                path.join(" ")
            );
        }
        let name = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()) && name != "config")
        else {
            bail!(
                "{}: [{}] sets {key}, which `tern {}` does not take (see `tern {} --help`)",
                file.display(),
                path.join("."),
                path.join(" "),
                path.join(" ")
            );
        };
        if overridden(given, &name) {
            continue;
        }
        let switch = !arg.get_action().takes_values();
        let where_ = || format!("{}: [{}] {key}", file.display(), path.join("."));
        match value {
            toml::Value::Boolean(on) if switch => {
                if *on {
                    flags.push(OsString::from(format!("--{name}")));
                }
            }
            _ if switch => bail!("{} is a switch: true or false", where_()),
            toml::Value::Boolean(_) => {
                bail!("{} takes a value, not true or false", where_())
            }
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(OsString::from(format!("--{name}")));
                    flags.push(scalar(item).with_context(where_)?);
                }
            }
            other => {
                flags.push(OsString::from(format!("--{name}")));
                flags.push(scalar(other).with_context(where_)?);
            }
        }
    }
    let mut out = args[..at].to_vec();
    out.extend(flags);
    out.extend_from_slice(given);
    Ok(out)
}

/// The file `--config FILE` (or `--config=FILE`) names, anywhere in `args`.
fn config_flag(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The subcommands named in `args` (`["nbd", "serve"]`), the index just
/// after the last of them, and that command.
fn command_path<'a>(
    args: &[OsString],
    cli: &'a clap::Command,
) -> (Vec<String>, usize, &'a clap::Command) {
    let mut command = cli;
    let mut path = Vec::new();
    let mut at = 1.min(args.len());
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let Some(text) = a.to_str() else { break };
        if text == "--" {
            break;
        }
        if let Some(long) = text.strip_prefix("--") {
            // A flag: skip its value when it takes one and has no `=`.
            if !long.contains('=') && takes_value(command, long) {
                i += 1;
            }
        } else if text.starts_with('-') {
            // Short flags (`-h`, `-q`) take no separate value here.
        } else if let Some(sub) = command.find_subcommand(OsStr::new(text)) {
            command = sub;
            path.push(sub.get_name().to_owned());
            at = i + 1;
        } else {
            // A positional argument: no subcommand comes after it.
            break;
        }
        i += 1;
    }
    (path, at, command)
}

fn takes_value(command: &clap::Command, long: &str) -> bool {
    long == "config"
        || command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .is_some_and(|a| a.get_action().takes_values())
}

/// The table of `path` in `table`, if the file has one.
fn section<'t>(
    table: &'t toml::Table,
    path: &[String],
    file: &Path,
) -> Result<Option<&'t toml::Table>> {
    let mut at = table;
    for (depth, name) in path.iter().enumerate() {
        match at.get(name) {
            None => return Ok(None),
            Some(toml::Value::Table(t)) => at = t,
            Some(_) => bail!(
                "{}: {} must be a table ([{}]) of `tern {}`'s settings",
                file.display(),
                path[..=depth].join("."),
                path[..=depth].join("."),
                path[..=depth].join(" ")
            ),
        }
    }
    Ok((!path.is_empty()).then_some(at))
}

/// Whether the operator gave `--name` on the command line.
fn overridden(given: &[OsString], name: &str) -> bool {
    let flag = format!("--{name}");
    let with_value = format!("--{name}=");
    given
        .iter()
        .take_while(|a| *a != "--")
        .filter_map(|a| a.to_str())
        .any(|a| a == flag || a.starts_with(&with_value))
}

/// A setting's value as the command line would spell it.
fn scalar(value: &toml::Value) -> Result<OsString> {
    Ok(OsString::from(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            bail!("a list's items are single values (text or numbers)")
        }
    }))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn run(file: &str, args: &[&str]) -> Result<Vec<String>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tern.toml");
        std::fs::write(&path, file).expect("write the settings");
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let out = expand(args, &super::super::Cli::command(), &path)?;
        Ok(out
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    const AGENT: &str = r#"
[agent]
role = "destination"
image = "/var/lib/tern/dst.img"
grpc = "0.0.0.0:7443"
tls-dir = "/etc/tern/pki/dst"
direct = true
insecure_nbd = false

[nbd.serve]
image = "/srv/disk.img"
read-only = true

[certs.init]
host = ["src", "dst"]
"#;

    #[test]
    fn a_commands_settings_come_before_its_flags_which_override_them() {
        let out = run(AGENT, &["tern", "agent", "--grpc", "127.0.0.1:9"]).expect("expanded");
        assert_eq!(
            out,
            [
                "tern",
                "agent",
                "--direct",
                "--image",
                "/var/lib/tern/dst.img",
                "--role",
                "destination",
                "--tls-dir",
                "/etc/tern/pki/dst",
                "--grpc",
                "127.0.0.1:9"
            ]
        );
        let out = run(AGENT, &["tern", "agent", "--tls-dir=/tmp/pki"]).expect("expanded");
        assert!(!out.contains(&"/etc/tern/pki/dst".to_owned()), "{out:?}");
        // What results parses as the command line would.
        let cli = super::super::Cli::try_parse_from(run(AGENT, &["tern", "agent"]).expect("x"));
        assert!(cli.is_ok(), "{:?}", cli.err().map(|e| e.to_string()));
    }

    #[test]
    fn subcommands_have_their_own_tables_and_lists_repeat_a_flag() {
        let out = run(AGENT, &["tern", "nbd", "serve", "--size", "1G"]).expect("expanded");
        assert_eq!(
            out,
            [
                "tern",
                "nbd",
                "serve",
                "--image",
                "/srv/disk.img",
                "--read-only",
                "--size",
                "1G"
            ]
        );
        let out = run(AGENT, &["tern", "certs", "init", "/etc/tern/pki"]).expect("expanded");
        assert_eq!(
            out,
            [
                "tern",
                "certs",
                "init",
                "--host",
                "src",
                "--host",
                "dst",
                "/etc/tern/pki"
            ]
        );
        // A command without a table is left as it is.
        let out = run(AGENT, &["tern", "status", "--json"]).expect("expanded");
        assert_eq!(out, ["tern", "status", "--json"]);
    }

    #[test]
    fn a_wrong_setting_is_an_error_naming_the_file_and_the_key() {
        let e = run("[agent]\nimagee = \"x\"\n", &["tern", "agent"]).expect_err("misspelt");
        let e = format!("{e:#}");
        assert!(
            e.contains("[agent] sets imagee, which `tern agent` does not take"),
            "{e}"
        );
        let e = run("[agent]\ndirect = \"yes\"\n", &["tern", "agent"]).expect_err("a switch");
        assert!(
            format!("{e:#}").contains("[agent] direct is a switch"),
            "{e:#}"
        );
        let e = run("[agent]\nimage = true\n", &["tern", "agent"]).expect_err("a value");
        assert!(format!("{e:#}").contains("takes a value"), "{e:#}");
        let e = run("agent = 3\n", &["tern", "agent"]).expect_err("not a table");
        assert!(
            format!("{e:#}").contains("must be a table ([agent])"),
            "{e:#}"
        );
        let e = run("[agent\n", &["tern", "agent"]).expect_err("not TOML");
        assert!(
            format!("{e:#}").contains("is not a TOML settings file"),
            "{e:#}"
        );
    }

    #[test]
    fn the_default_file_is_optional_and_a_named_one_is_not() {
        let args: Vec<OsString> = ["tern", "status"].iter().map(OsString::from).collect();
        let cli = super::super::Cli::command();
        let missing = Path::new("/nonexistent/tern.toml");
        assert_eq!(expand(args.clone(), &cli, missing).expect("no file"), args);
        let named: Vec<OsString> = ["tern", "--config", "/nonexistent/x.toml", "status"]
            .iter()
            .map(OsString::from)
            .collect();
        let e = expand(named, &cli, missing).expect_err("named and missing");
        assert!(
            format!("{e:#}").contains("cannot read the settings file /nonexistent/x.toml"),
            "{e:#}"
        );
    }
}
