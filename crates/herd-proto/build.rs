//! Generates herd's protobuf code and the descriptor set that reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "herd/context/v1/context.proto",
        "herd/types/v1/types.proto",
        "herd/quote/v1/quote.proto",
        "herd/pricing/v1/pricing.proto",
        "herd/tax/v1/tax.proto",
        "herd/currency/v1/currency.proto",
        "herd/admin/v1/admin.proto",
    ]
    .map(|f| proto_root.join(f));
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("herd_descriptor.bin"))
        .codec_path("crate::codec::HerdCodec")
        .include_file("_includes.rs")
        .compile_protos(&files, std::slice::from_ref(&proto_root))?;
    // Each file as well as the folder: a folder's time changes only when an entry is added or
    // removed, and a build sharing its target folder with another checkout would keep code
    // generated from the other's files.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}
