//! Loading a `--tls-dir` (as written by `tern certs init`) and building the
//! mutual-TLS configurations of the replica server and client.
//!
//! A TLS directory holds `ca.pem` (the authority both peers trust),
//! `cert.pem` and `key.pem` (this host's identity). The server requires a
//! client certificate signed by `ca.pem`; the client verifies the server's
//! certificate against the same authority.

use std::fs;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a gRPC client may take to complete its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("cannot read {path}: {source}; create the TLS directory with `tern certs init`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error(
        "{path} holds no {what} in PEM form; point --tls-dir at a directory from `tern certs init`"
    )]
    NoPem { path: PathBuf, what: &'static str },
    /// A PEM file is malformed.
    #[error("{path} is not valid PEM: {source}")]
    BadPem {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// rustls refused the material (a key that does not match the certificate, or
    /// an authority it cannot use to check clients).
    #[error("cannot build a TLS server configuration from {dir}: {source}")]
    Config {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// `ca.pem` cannot check client certificates.
    #[error("the authority in {dir}/ca.pem cannot verify client certificates: {source}")]
    ClientVerifier {
        dir: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The private key is readable by others.
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyTooOpen { path: PathBuf, mode: u32 },
}

/// The PEM material of one host.
#[derive(Clone)]
pub struct TlsMaterial {
    dir: PathBuf,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads and checks `dir/ca.pem`, `dir/cert.pem`, `dir/key.pem`.
    pub fn load(dir: &Path) -> Result<TlsMaterial, TlsError> {
        let ca_path = dir.join("ca.pem");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        let ca_pem = read(&ca_path)?;
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        count_certs(&ca_path, &ca_pem, "CA certificate")?;
        count_certs(&cert_path, &cert_pem, "certificate")?;
        check_key(&key_path, &key_pem)?;
        let mode = fs::metadata(&key_path)
            .map_err(|source| TlsError::Read {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyTooOpen {
                path: key_path,
                mode,
            });
        }
        Ok(TlsMaterial {
            dir: dir.to_path_buf(),
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Server side: present `cert.pem`, require a client certificate signed
    /// by `ca.pem`, and close a connection whose handshake has not completed
    /// within [`TLS_HANDSHAKE_TIMEOUT`] (a client that connects and never
    /// speaks would otherwise hold one of the listener's places for good).
    pub fn server_config(&self) -> ServerTlsConfig {
        install_crypto_provider();
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            .timeout(TLS_HANDSHAKE_TIMEOUT)
    }

    /// Server side for protocols served without tonic (NBD over STARTTLS):
    /// present `cert.pem`, require a client certificate signed by `ca.pem`,
    /// exactly as [`TlsMaterial::server_config`] does for gRPC.
    pub fn rustls_server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        install_crypto_provider();
        let failed = |source| TlsError::Config {
            dir: self.dir.clone(),
            source,
        };
        let roots = self.roots()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots))
            .build()
            .map_err(|source| TlsError::ClientVerifier {
                dir: self.dir.clone(),
                source,
            })?;
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.parse_certs(&self.cert_pem, "cert.pem")?,
                self.parse_key()?,
            )
            .map_err(failed)?;
        Ok(std::sync::Arc::new(config))
    }

    /// Client side for protocols spoken without tonic (an NBD client over
    /// STARTTLS): trust only `ca.pem`, present `cert.pem`.
    pub fn rustls_client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, TlsError> {
        install_crypto_provider();
        let failed = |source| TlsError::Config {
            dir: self.dir.clone(),
            source,
        };
        let roots = self.roots()?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                self.parse_certs(&self.cert_pem, "cert.pem")?,
                self.parse_key()?,
            )
            .map_err(failed)?;
        Ok(std::sync::Arc::new(config))
    }

    /// `ca.pem` as the only trusted authority.
    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in self.parse_certs(&self.ca_pem, "ca.pem")? {
            roots.add(ca).map_err(|source| TlsError::Config {
                dir: self.dir.clone(),
                source,
            })?;
        }
        Ok(roots)
    }

    fn parse_certs(
        &self,
        pem: &[u8],
        file: &str,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
        rustls_pemfile::certs(&mut BufReader::new(pem))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::BadPem {
                path: self.dir.join(file),
                source,
            })
    }

    fn parse_key(&self) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
        rustls_pemfile::private_key(&mut BufReader::new(&self.key_pem[..]))
            .map_err(|source| TlsError::BadPem {
                path: self.dir.join("key.pem"),
                source,
            })?
            .ok_or_else(|| TlsError::NoPem {
                path: self.dir.join("key.pem"),
                what: "private key",
            })
    }

    /// Client side: trust only `ca.pem`, present `cert.pem`. `domain` is the
    /// name checked in the server's certificate; `None` uses the host of the URI.
    pub fn client_config(&self, domain: Option<&str>) -> ClientTlsConfig {
        install_crypto_provider();
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match domain {
            Some(domain) => config.domain_name(domain),
            None => config,
        }
    }

    /// Client side without a client certificate (for tests of refusal and
    /// for tools that only need to verify the server).
    pub fn client_config_without_identity(&self, domain: Option<&str>) -> ClientTlsConfig {
        install_crypto_provider();
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match domain {
            Some(domain) => config.domain_name(domain),
            None => config,
        }
    }
}

/// Makes `ring` the process's rustls provider. Two providers are linked (ours,
/// `ring`; the S3 client's, `aws-lc-rs`), and rustls then refuses to guess one
/// when tonic builds its configurations. Idempotent: a provider already
/// installed (by us or by the embedding program) is kept.
pub fn install_crypto_provider() {
    // An Err only says a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn count_certs(path: &Path, pem: &[u8], what: &'static str) -> Result<(), TlsError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(())
}

fn check_key(path: &Path, pem: &[u8]) -> Result<(), TlsError> {
    match rustls_pemfile::private_key(&mut BufReader::new(pem)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(TlsError::NoPem {
            path: path.to_path_buf(),
            what: "private key",
        }),
        Err(source) => Err(TlsError::BadPem {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_host_dir_from_certs_init() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = crate::certs::init(dir.path(), &[]).expect("certs");
        let material = TlsMaterial::load(&report.host_dirs[0]).expect("load");
        assert_eq!(material.dir(), report.host_dirs[0]);
    }

    #[test]
    fn refuses_a_world_readable_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = crate::certs::init(dir.path(), &[]).expect("certs");
        let key = report.host_dirs[0].join("key.pem");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            TlsMaterial::load(&report.host_dirs[0]),
            Err(TlsError::KeyTooOpen { .. })
        ));
    }

    #[test]
    fn refuses_a_directory_without_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("ca.pem"), b"not pem").expect("write");
        fs::write(dir.path().join("cert.pem"), b"").expect("write");
        fs::write(dir.path().join("key.pem"), b"").expect("write");
        assert!(matches!(
            TlsMaterial::load(dir.path()),
            Err(TlsError::NoPem { .. })
        ));
    }
}
