//! `herd-pricing`: serves the pricing service as a mesh worker.

use std::process::ExitCode;

fn main() -> ExitCode {
    herd::binary::run_binary("pricing", "127.0.0.1:0", |mesh| {
        let config = mesh.config();
        let pricing =
            herd_pricing::Pricing::new(config, mesh.channel("tax"), mesh.channel("currency"));
        async move { Ok(herd::Services::new().with(pricing.into_server())) }
    })
}
