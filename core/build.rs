//! Compiles `proto/registry.proto` with protox (pure Rust; no protoc) into prost messages
//! and tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/registry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A watch reset carries the whole catalog; as `Bytes`, one encoding is shared by
        // every watcher that needs a reset at that revision.
        .bytes(".meshbridge.registry.v1.Reset.catalog_json")
        .compile_fds(fds)?;
    Ok(())
}
