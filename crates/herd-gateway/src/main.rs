//! `herd-gateway`: serves the public quote service as a mesh worker.

use std::process::ExitCode;
use std::time::Duration;

use herd_model::keys::SigningSecrets;

fn main() -> ExitCode {
    herd::binary::run_binary("gateway", "127.0.0.1:50051", |mesh| {
        let secrets = mesh.secrets_dir().map(std::path::Path::to_path_buf);
        let config = mesh.config();
        let pricing = mesh.channel("pricing");
        let peers = mesh.discover("gateway");
        async move {
            let dir = secrets.ok_or(
                "the gateway signs quotes: --secrets DIR (HERD_SECRETS) must name the folder of \
                 its private signing keys (<key-id>.pem)",
            )?;
            let secrets = SigningSecrets::load(&dir)?;
            tracing::info!(ids = ?secrets.ids(), folder = %dir.display(), "signing keys read");
            // Keys added to or removed from the folder are taken up within a second; the task
            // lives as long as the gateway's handle on them.
            secrets.watch(dir, Duration::from_secs(1));
            let gateway = herd_gateway::Gateway::new(config, pricing, secrets).with_peers(peers);
            // Called from outside the mesh: callers authenticate with bearer tokens, and over
            // mutual TLS a client certificate is optional.
            Ok(herd::Services::new()
                .public()
                .with_max_request(gateway.into_server(), herd_gateway::MAX_REQUEST))
        }
    })
}
