//! `herd-thing`: serves the thing service as a mesh worker.

use std::process::ExitCode;

fn main() -> ExitCode {
    herd::binary::run_binary("thing", "127.0.0.1:0", |mesh| {
        let config = mesh.config::<herd_example_thing::ThingConfig>(); // typed, watched, validated
        let pricing = mesh.channel("pricing"); // balanced, by service name alone
        let thing = herd_example_thing::Thing::new(config, pricing);
        async move {
            Ok(herd::Services::new()
                .with(thing.into_server())
                .with_descriptors(herd_example_thing::FILE_DESCRIPTOR_SET)) // for grpcurl
        }
    })
}
