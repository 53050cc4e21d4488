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
    // The whole file, whatever command runs: a misspelt table or key is an
    // error now, not on the day its command runs.
    check(&table, cli, &mut Vec::new(), &file)?;
    let (path, at, command) = command_path(&args, cli);
    let Some(settings) = section(&table, &path) else {
        return Ok(args);
    };
    let given = given_args(&args[at..], command);
    let mut flags = Vec::new();
    for (key, value) in settings {
        if value.is_table() {
            continue;
        }
        let arg = find_arg(command, key).context("checked above: every key is a flag")?;
        // The command line overrides a setting: the same flag by any of its
        // names, or a flag that excludes it (`--file` over a `device`).
        if given.iter().any(|g| excludes(command, g, arg.get_id())) {
            continue;
        }
        let long = arg.get_long().context("checked above: a long flag")?;
        let switch = !arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(true) if switch => flags.push(OsString::from(format!("--{long}"))),
            toml::Value::Boolean(false) if switch => {}
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(with_value(long, item).context("checked above: a list of values")?);
                }
            }
            other => flags.push(with_value(long, other).context("checked above: a value")?),
        }
    }
    let mut out = args[..at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[at..]);
    Ok(out)
}

/// Whether the operator's `given` argument replaces the setting of `set`:
/// the same flag, or one of two that exclude each other.
fn excludes(command: &clap::Command, given: &clap::Id, set: &clap::Id) -> bool {
    let conflicts = |a: &clap::Id, b: &clap::Id| {
        command
            .get_arguments()
            .find(|x| x.get_id() == a)
            .is_some_and(|x| {
                command
                    .get_arg_conflicts_with(x)
                    .iter()
                    .any(|c| c.get_id() == b)
            })
    };
    given == set || conflicts(given, set) || conflicts(set, given)
}

/// `--name=value` as one word: a value that starts with `-` stays a value.
fn with_value(long: &str, value: &toml::Value) -> Result<OsString> {
    let mut word = OsString::from(format!("--{long}="));
    word.push(scalar(value)?);
    Ok(word)
}

/// The flag a settings key names (by its long name, `_` as `-`).
fn find_arg<'c>(command: &'c clap::Command, key: &str) -> Option<&'c clap::Arg> {
    let name = key.replace('_', "-");
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(name.as_str()) && name != "config")
}

/// Checks every table and key of the file against the commands and flags:
/// tables name commands (`[nbd.serve]`), keys their flags, with values of
/// the right kind.
fn check(
    table: &toml::Table,
    command: &clap::Command,
    path: &mut Vec<String>,
    file: &Path,
) -> Result<()> {
    for (key, value) in table {
        if let toml::Value::Table(sub) = value {
            let Some(next) = command.find_subcommand(key) else {
                bail!(
                    "{}: [{}] names no command: `tern {}` has no subcommand {key}",
                    file.display(),
                    path.iter()
                        .chain(std::iter::once(key))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("."),
                    path.join(" ")
                );
            };
            path.push(key.clone());
            check(sub, next, path, file)?;
            path.pop();
            continue;
        }
        let at = || {
            if path.is_empty() {
                format!("{}: {key}", file.display())
            } else {
                format!("{}: [{}] {key}", file.display(), path.join("."))
            }
        };
        if path.is_empty() {
            bail!(
                "{} must be a table ([{key}]) of `tern {key}`'s settings",
                at()
            );
        }
        let Some(arg) = find_arg(command, key) else {
            bail!(
                "{}: [{}] sets {key}, which `tern {}` does not take (see `tern {} --help`)",
                file.display(),
                path.join("."),
                path.join(" "),
                path.join(" ")
            );
        };
        let switch = !arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(_) if switch => {}
            _ if switch => bail!("{} is a switch: true or false", at()),
            toml::Value::Boolean(_) => bail!("{} takes a value, not true or false", at()),
            toml::Value::Array(items) => {
                for item in items {
                    scalar(item).with_context(at)?;
                }
            }
            other => {
                scalar(other).with_context(at)?;
            }
        }
    }
    Ok(())
}

/// The arguments the operator gave on the command line (after the
/// subcommand), by id: every spelling of a flag (long, alias, short).
fn given_args(given: &[OsString], command: &clap::Command) -> Vec<clap::Id> {
    let mut ids = Vec::new();
    for word in given
        .iter()
        .take_while(|a| *a != "--")
        .filter_map(|a| a.to_str())
    {
        if let Some(long) = word.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or(long);
            if let Some(a) = command.get_arguments().find(|a| {
                a.get_long() == Some(name)
                    || a.get_all_aliases().is_some_and(|al| al.contains(&name))
            }) {
                ids.push(a.get_id().clone());
            }
        } else if let Some(shorts) = word.strip_prefix('-') {
            for c in shorts.chars() {
                if let Some(a) = command.get_arguments().find(|a| {
                    a.get_short() == Some(c)
                        || a.get_all_short_aliases().is_some_and(|al| al.contains(&c))
                }) {
                    ids.push(a.get_id().clone());
                }
            }
        }
    }
    ids
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
fn section<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Table> {
    let mut at = table;
    for name in path {
        match at.get(name) {
            Some(toml::Value::Table(t)) => at = t,
            _ => return None,
        }
    }
    (!path.is_empty()).then_some(at)
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
                "--image=/var/lib/tern/dst.img",
                "--role=destination",
                "--tls-dir=/etc/tern/pki/dst",
                "--grpc",
                "127.0.0.1:9"
            ]
        );
        let out = run(AGENT, &["tern", "agent", "--tls-dir=/tmp/pki"]).expect("expanded");
        assert!(
            !out.iter().any(|a| a.contains("/etc/tern/pki/dst")),
            "{out:?}"
        );
        // What results parses as the command line would.
        let cli = super::super::Cli::try_parse_from(run(AGENT, &["tern", "agent"]).expect("x"));
        assert!(cli.is_ok(), "{:?}", cli.err().map(|e| e.to_string()));
    }

    #[test]
    fn any_spelling_of_a_flag_or_one_that_excludes_it_overrides_the_file() {
        let file = "[agent]\nrole = \"source\"\nto = \"dst:7443\"\ndevice = \"/dev/vdb\"\nzstd-level = -1\n";
        // `--peer` is `--to`'s alias; `--file` excludes `--device`.
        let out = run(file, &["tern", "agent", "--peer", "b:1", "--file", "x.img"]).expect("x");
        assert_eq!(
            out,
            [
                "tern",
                "agent",
                "--role=source",
                "--zstd-level=-1",
                "--peer",
                "b:1",
                "--file",
                "x.img"
            ]
        );
        let cli = super::super::Cli::try_parse_from(&out);
        assert!(cli.is_ok(), "{:?}", cli.err().map(|e| e.to_string()));
        let file = "[migrate]\npause = \"fsfreeze:/srv\"\n";
        let out = run(file, &["tern", "migrate", "--no-pause"]).expect("x");
        assert_eq!(out, ["tern", "migrate", "--no-pause"]);
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
                "--image=/srv/disk.img",
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
                "--host=src",
                "--host=dst",
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
        // The whole file is checked, whichever command runs.
        let e = run("[migarte]\nto = \"x\"\n", &["tern", "status"]).expect_err("no command");
        assert!(
            format!("{e:#}").contains("[migarte] names no command"),
            "{e:#}"
        );
        let e = run("[nbd.serv]\nimage = \"x\"\n", &["tern", "status"]).expect_err("no sub");
        assert!(
            format!("{e:#}").contains("[nbd.serv] names no command"),
            "{e:#}"
        );
        let e = run("[nbd]\nimage = \"x\"\n", &["tern", "status"]).expect_err("no flag");
        assert!(format!("{e:#}").contains("[nbd] sets image"), "{e:#}");
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
