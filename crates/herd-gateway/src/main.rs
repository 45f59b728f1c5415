//! `herd-gateway`: serves the public quote service as a mesh worker.

use std::process::ExitCode;

fn main() -> ExitCode {
    herd::binary::run_binary("gateway", "127.0.0.1:50051", |mesh| {
        let config = mesh.config();
        let gateway = herd_gateway::Gateway::new(config, mesh.channel("pricing"))
            .with_peers(mesh.discover("gateway"));
        async move {
            // Called from outside the mesh: callers authenticate with bearer tokens, and over
            // mutual TLS a client certificate is optional.
            Ok(herd::Services::new()
                .public()
                .with_max_request(gateway.into_server(), herd_gateway::MAX_REQUEST))
        }
    })
}
