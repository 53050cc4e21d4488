//! `tern certs init DIR`: a small certificate authority and one certificate
//! per host for the replication channel's mutual TLS.
//!
//! Layout written under `DIR`:
//! - `ca.pem`, `ca.key`: the authority (keep `ca.key` off the hosts);
//! - `<host>/ca.pem`, `<host>/cert.pem`, `<host>/key.pem`: one directory per
//!   host, usable as is as that host's `--tls-dir`. Each host certificate is
//!   good for both server and client authentication, so the same directory
//!   serves the destination agent and the source's client;
//! - in each host directory, links under the names QEMU and libnbd look for
//!   (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`, `server-*.pem`), so
//!   it is also a `tls-creds-x509` `dir=` and an `nbds://` `tls-certificates=`.
//!
//! Running it again with new host names adds hosts signed by the existing
//! authority; an existing host directory is never overwritten.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// Subject of the authority; fixed, so the issuer can be rebuilt from `ca.key`.
const CA_COMMON_NAME: &str = "Tern replication CA";
/// Names every host certificate carries, so local tests and tunnels work.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// The names QEMU's `tls-creds-x509` and libnbd's `tls-certificates` look
/// for in a directory, as relative links to this host's files: a host
/// directory serves them as it is (one certificate is good for both ends).
const GNUTLS_NAMES: [(&str, &str); 5] = [
    ("ca-cert.pem", "ca.pem"),
    ("server-cert.pem", "cert.pem"),
    ("server-key.pem", "key.pem"),
    ("client-cert.pem", "cert.pem"),
    ("client-key.pem", "key.pem"),
];
/// Host used when none is given.
pub const DEFAULT_HOST: &str = "localhost";
const CA_YEARS: i32 = 10;
const HOST_YEARS: i32 = 2;

/// Errors of certificate generation.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A host name that cannot be a directory name or a certificate name.
    #[error(
        "host name {0:?} is not a DNS name or IP address; use letters, digits, '-', '.' (or an IP)"
    )]
    BadHostName(String),
    /// The host already has certificates.
    #[error("{0} already exists; remove it first to issue a new certificate for that host")]
    HostExists(PathBuf),
    /// `ca.pem` exists without `ca.key` or the other way round.
    #[error(
        "{dir} holds only one of ca.pem and ca.key; restore the missing file or start from an empty directory"
    )]
    HalfCa { dir: PathBuf },
    /// rcgen refused.
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}; check the directory exists and is writable")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertsReport {
    /// `DIR/ca.pem`.
    pub ca_cert: PathBuf,
    /// Whether the authority was created by this call (not reused).
    pub ca_created: bool,
    /// One `--tls-dir` per host, in the order given.
    pub host_dirs: Vec<PathBuf>,
}

/// Creates (or reuses) the authority in `dir` and issues one certificate per
/// host; `hosts` empty means [`DEFAULT_HOST`].
pub fn init(dir: &Path, hosts: &[String]) -> Result<CertsReport, CertsError> {
    let hosts: Vec<String> = if hosts.is_empty() {
        vec![DEFAULT_HOST.to_owned()]
    } else {
        hosts.to_vec()
    };
    for host in &hosts {
        check_host_name(host)?;
        let host_dir = dir.join(host);
        if host_dir.exists() {
            return Err(CertsError::HostExists(host_dir));
        }
    }
    create_dir(dir)?;

    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca_params = ca_params();
    let (ca_pem, ca_key, ca_created) = match (ca_cert_path.exists(), ca_key_path.exists()) {
        (true, true) => {
            let pem = read(&ca_cert_path)?;
            let key =
                KeyPair::from_pem(&read(&ca_key_path)?).map_err(|source| CertsError::Generate {
                    what: format!("the authority key from {}", ca_key_path.display()),
                    source,
                })?;
            (pem, key, false)
        }
        (false, false) => {
            let key = KeyPair::generate().map_err(|source| CertsError::Generate {
                what: "the authority key".into(),
                source,
            })?;
            let cert = ca_params
                .self_signed(&key)
                .map_err(|source| CertsError::Generate {
                    what: "the authority certificate".into(),
                    source,
                })?;
            write_file(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&ca_cert_path, cert.pem().as_bytes(), 0o644)?;
            (cert.pem(), key, true)
        }
        _ => {
            return Err(CertsError::HalfCa {
                dir: dir.to_path_buf(),
            });
        }
    };
    let issuer = Issuer::new(ca_params, ca_key);

    let mut host_dirs = Vec::with_capacity(hosts.len());
    for host in &hosts {
        let host_dir = dir.join(host);
        issue_host(&issuer, &ca_pem, host, &host_dir)?;
        host_dirs.push(host_dir);
    }
    tracing::info!(dir = %dir.display(), ca_created, hosts = hosts.len(), "certificates written");
    Ok(CertsReport {
        ca_cert: ca_cert_path,
        ca_created,
        host_dirs,
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_YEARS);
    params
}

fn issue_host(
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    host: &str,
    host_dir: &Path,
) -> Result<(), CertsError> {
    let mut names: Vec<String> = vec![host.to_owned()];
    names.extend(
        LOCAL_NAMES
            .iter()
            .filter(|n| **n != host)
            .map(|n| (*n).to_owned()),
    );
    let generate = |source| CertsError::Generate {
        what: format!("the certificate for {host}"),
        source,
    };
    let mut params = CertificateParams::new(names).map_err(generate)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, host);
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, HOST_YEARS);
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, issuer).map_err(generate)?;

    create_dir(host_dir)?;
    write_file(
        &host_dir.join("key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&host_dir.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
    write_file(&host_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    for (name, target) in GNUTLS_NAMES {
        let link = host_dir.join(name);
        std::os::unix::fs::symlink(target, &link).map_err(|source| CertsError::Io {
            action: "link",
            path: link,
            source,
        })?;
    }
    Ok(())
}

/// Valid from yesterday (clock skew between hosts) for `years` years.
fn set_validity(params: &mut CertificateParams, years: i32) {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let days = i64::try_from(days).expect("u64 seconds / 86400 fits i64");
    let (y, m, d) = civil_from_days(days - 1);
    params.not_before = date_time_ymd(y, m, d);
    // Day 28 exists in every month: no Feb 29 trouble.
    params.not_after = date_time_ymd(y.saturating_add(years), m, d.min(28));
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        // A year past i32 (a clock some billion years off) saturates.
        i32::try_from(y).unwrap_or(i32::MAX),
        u8::try_from(m).expect("the algorithm gives a month in 1..=12"),
        u8::try_from(d).expect("the algorithm gives a day in 1..=31"),
    )
}

fn check_host_name(host: &str) -> Result<(), CertsError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('.')
        && !host.starts_with('-')
        && host != ".."
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
    if ok {
        Ok(())
    } else {
        Err(CertsError::BadHostName(host.to_owned()))
    }
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a new file with `mode` from the start (a key is never world-readable,
/// not even briefly), refusing to overwrite.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertsError> {
    let io = |action, source| CertsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io("create", e))?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io("set permissions on", e))?;
    file.write_all(data).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn init_writes_ca_and_host_dirs_with_private_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = init(dir.path(), &["dst.example".into(), "src".into()]).expect("init");
        assert!(report.ca_created);
        assert_eq!(report.host_dirs.len(), 2);
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        for host in &report.host_dirs {
            assert_eq!(mode(&host.join("key.pem")), 0o600);
            let cert = fs::read_to_string(host.join("cert.pem")).expect("cert");
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
            assert_eq!(
                fs::read(host.join("ca.pem")).expect("ca copy"),
                fs::read(&report.ca_cert).expect("ca")
            );
            // QEMU's and libnbd's names lead to the same files, through
            // relative links (the directory can be moved to its host).
            for (name, target) in GNUTLS_NAMES {
                assert_eq!(
                    fs::read_link(host.join(name)).expect("link"),
                    Path::new(target)
                );
                assert_eq!(
                    fs::read(host.join(name)).expect("through the link"),
                    fs::read(host.join(target)).expect("target")
                );
            }
        }
    }

    #[test]
    fn init_again_reuses_the_ca_and_refuses_existing_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[]).expect("first");
        let ca = fs::read(dir.path().join("ca.pem")).expect("ca");
        assert!(matches!(
            init(dir.path(), &[]),
            Err(CertsError::HostExists(_))
        ));
        let second = init(dir.path(), &["other".into()]).expect("second");
        assert!(!second.ca_created);
        assert_eq!(fs::read(dir.path().join("ca.pem")).expect("ca"), ca);
    }

    #[test]
    fn host_names_with_slashes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            init(dir.path(), &["../evil".into()]),
            Err(CertsError::BadHostName(_))
        ));
    }
}
