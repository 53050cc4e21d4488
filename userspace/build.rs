//! Compiles `proto/tern/v1/*.proto` with protox (no protoc on the machine),
//! then generates the prost messages and tonic services from the descriptors.
use std::path::Path;

fn main() {
    let proto_root = Path::new("../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    let protos = ["tern/v1/replica.proto", "tern/v1/control.proto"];
    for proto in protos {
        println!(
            "cargo:rerun-if-changed={}",
            proto_root.join(proto).display()
        );
    }
    let fds = match protox::compile(protos, [proto_root]) {
        Ok(fds) => fds,
        Err(err) => panic!(
            "cannot compile the protos under {}: {err:?}",
            proto_root.display()
        ),
    };
    // `bytes` fields become `bytes::Bytes`, so extent payloads are not copied.
    if let Err(err) = tonic_prost_build::configure()
        .bytes(".tern.v1")
        .compile_fds(fds)
    {
        panic!("cannot generate Rust code from the protos: {err}");
    }
}
