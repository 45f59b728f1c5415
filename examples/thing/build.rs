//! Generates the thing contract's code and descriptor set; herd's own messages come from
//! herd-proto, found on herd's proto path.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let herd_protos = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("thing_descriptor.bin"))
        .extern_path(".herd", "::herd_proto::pb::herd")
        .codec_path("herd_proto::codec::HerdCodec")
        .compile_protos(
            &[PathBuf::from("proto/yourteam/thing/v1/thing.proto")],
            &[PathBuf::from("proto"), herd_protos],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
