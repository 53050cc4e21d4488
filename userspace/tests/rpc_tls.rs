//! Mutual TLS on the replica service: data lands byte-exact through it, and
//! peers without a certificate from the right authority are refused.

mod rpc_support;

use std::time::Duration;

use bytes::Bytes;
use rpc_support::{Destination, noise};
use tern::rpc::{EncodedExtent, PushOptions, ReplicaClient, TlsMaterial};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_pushed_over_mutual_tls_lands_byte_exact() {
    let dst = Destination::start(24 * MIB).await;
    // Incompressible, compressible and all-zero stretches: raw, zstd and zero extents.
    let mut source = noise((8 * MIB) as usize, 1);
    source.extend("tern replicates ".repeat((8 * MIB / 16) as usize).bytes());
    source.extend(vec![0u8; (6 * MIB) as usize]);
    source.extend(noise((2 * MIB - 123) as usize, 2));
    let src_dir = tempfile::tempdir().expect("tempdir");
    let src_path = src_dir.path().join("src.img");
    std::fs::write(&src_path, &source).expect("write source");
    // Make the destination's zero stretch non-zero first, so zero extents must really write.
    std::fs::write(&dst.image_path, vec![0xeeu8; (24 * MIB) as usize]).expect("dirty dst");

    let mut client = dst.client().await;
    let opts = PushOptions {
        extent_len: (MIB / 2) as u32,
        ..PushOptions::default()
    };
    let report = tern::rpc::push_file(&mut client, &src_path, &opts)
        .await
        .expect("push");
    assert_eq!(report.bytes, source.len() as u64);
    assert_eq!(report.zero_extents, 12);
    assert!(
        report.wire_bytes < report.bytes,
        "zstd and zero extents shrink the wire"
    );

    let image = dst.contents();
    assert!(
        image[..source.len()] == source[..],
        "destination differs from source"
    );
    assert!(
        image[source.len()..].iter().all(|&b| b == 0xee),
        "bytes past the pushed file changed"
    );
    assert_eq!(dst.metrics.extents_written.get(), report.extents);
    let info = client.info().await.expect("info");
    assert_eq!(info.image_size, 24 * MIB);
    assert_eq!(info.epoch, opts.epoch);
    dst.stop().await;
}

/// Connects with a hand-built TLS config and makes one call; the error, if any.
async fn try_info(dst: &Destination, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    tern::rpc::tls::install_crypto_provider();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", dst.addr))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).expect("tls config");
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = ReplicaClient::from_channel(channel);
    client
        .info()
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e}"))
}

fn ca_of(dst: &Destination) -> Certificate {
    Certificate::from_pem(std::fs::read(dst.tls.dir().join("ca.pem")).expect("ca"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_certificate_is_accepted_by_a_hand_built_config() {
    // The control case for the refusals below: the same path with a valid identity works.
    let dst = Destination::start(MIB).await;
    let dir = dst.tls.dir().to_path_buf();
    let identity = Identity::from_pem(
        std::fs::read(dir.join("cert.pem")).expect("cert"),
        std::fs::read(dir.join("key.pem")).expect("key"),
    );
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca_of(&dst))
        .identity(identity);
    try_info(&dst, Some(tls))
        .await
        .expect("valid client certificate");
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let dst = Destination::start(MIB).await;
    let tls = dst.tls.client_config_without_identity(None);
    let err = try_info(&dst, Some(tls))
        .await
        .expect_err("no client certificate must be refused");
    assert!(!err.is_empty());
    assert_eq!(dst.metrics.extents_written.get(), 0);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_authority_is_refused() {
    let dst = Destination::start(MIB).await;
    let other = tempfile::tempdir().expect("tempdir");
    let report = tern::certs::init(other.path(), &[]).expect("other CA");
    let foreign = &report.host_dirs[0];
    let identity = Identity::from_pem(
        std::fs::read(foreign.join("cert.pem")).expect("cert"),
        std::fs::read(foreign.join("key.pem")).expect("key"),
    );
    // The client trusts the destination (right CA) but presents a foreign identity.
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca_of(&dst))
        .identity(identity);
    try_info(&dst, Some(tls))
        .await
        .expect_err("a certificate from another CA must be refused");
    // And the typed client built from the foreign directory fails too.
    let material = TlsMaterial::load(foreign).expect("foreign dir");
    let refused = match ReplicaClient::connect(&dst.addr.to_string(), Some(&material), None).await {
        Err(_) => true,
        Ok(mut client) => client.info().await.is_err(),
    };
    assert!(refused, "a client from another CA reached the service");
    dst.stop().await;
}

/// A client identity signed by `dst`'s own authority (its key in
/// `certs/ca.key`) but valid only from `not_before` to `not_after`.
fn identity_valid(
    dst: &Destination,
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
) -> Identity {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        date_time_ymd,
    };
    let certs = dst.tls.dir().parent().expect("the certs directory");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).expect("ca.key"))
        .expect("the authority's key");
    // The authority's name and key: what a certificate's issuer is checked by.
    let mut ca = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Tern replication CA");
    ca.distinguished_name = name;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issuer = Issuer::new(ca, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.not_before = date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, &issuer).expect("signed");
    Identity::from_pem(cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_outside_its_validity_is_refused_and_a_valid_one_of_the_same_authority_is_not()
 {
    let dst = Destination::start(MIB).await;
    let tls = |identity| {
        ClientTlsConfig::new()
            .ca_certificate(ca_of(&dst))
            .identity(identity)
    };
    // The control: the same authority, valid now.
    try_info(
        &dst,
        Some(tls(identity_valid(&dst, (2020, 1, 1), (2090, 1, 1)))),
    )
    .await
    .expect("a valid certificate of the destination's authority");
    try_info(
        &dst,
        Some(tls(identity_valid(&dst, (2020, 1, 1), (2021, 1, 1)))),
    )
    .await
    .expect_err("an expired client certificate must be refused");
    try_info(
        &dst,
        Some(tls(identity_valid(&dst, (2080, 1, 1), (2090, 1, 1)))),
    )
    .await
    .expect_err("a client certificate not valid yet must be refused");
    assert_eq!(dst.metrics.extents_written.get(), 0);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_whose_certificate_is_for_another_host_name_is_refused_by_the_source() {
    let dst = Destination::start(MIB).await;
    // The destination's certificate names localhost and its loopback
    // addresses; a source expecting another host must not talk to it.
    let err = ReplicaClient::connect(&dst.addr.to_string(), Some(&dst.tls), Some("dst.example"))
        .await
        .map(|_| ())
        .expect_err("a certificate for another name must be refused");
    let text = format!("{err:?}");
    assert!(
        text.to_lowercase().contains("name") || text.contains("NotValidForName"),
        "the error says the name is wrong: {text}"
    );
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_refused() {
    let dst = Destination::start(MIB).await;
    try_info(&dst, None)
        .await
        .expect_err("plain HTTP/2 to a TLS port must fail");
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_completes_its_handshake_is_closed_after_the_timeout() {
    use tokio::io::AsyncReadExt;
    let dst = Destination::start(MIB).await;
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(dst.addr)
        .await
        .expect("the port accepts");
    let mut buf = [0u8; 64];
    // Nothing sent: the server must end the connection itself.
    let read = tokio::time::timeout(
        tern::rpc::tls::TLS_HANDSHAKE_TIMEOUT + std::time::Duration::from_secs(10),
        silent.read(&mut buf),
    )
    .await
    .expect("the server closed the silent connection before the test's deadline");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the server sent something to a client that said nothing: {read:?}"
    );
    assert!(
        started.elapsed() >= tern::rpc::tls::TLS_HANDSHAKE_TIMEOUT,
        "closed after {:?}, before the handshake timeout",
        started.elapsed()
    );
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_the_replica_service_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dst = Destination::start(MIB).await;
    let channel = Endpoint::from_shared(format!("https://{}", dst.addr))
        .expect("uri")
        .tls_config(dst.tls.client_config(None))
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let reply = health
        .check(HealthCheckRequest {
            service: tern::rpc::SERVICE_NAME.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(reply.status, ServingStatus::Serving as i32);
    // A single extent through the typed client, to prove the data path shares the channel setup.
    let mut client = dst.client().await;
    let mut writer = client.open_writer(1, 4).await.expect("open");
    let data = Bytes::from(noise(4096, 9));
    writer
        .send(EncodedExtent::encode(8192, data.clone(), None).expect("encode"))
        .await
        .expect("send");
    writer.finish().await.expect("finish");
    assert_eq!(&dst.contents()[8192..8192 + 4096], data.as_ref());
    dst.stop().await;
}
