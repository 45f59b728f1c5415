//! `herd-currency`: serves the currency service as a mesh worker.

use std::process::ExitCode;

fn main() -> ExitCode {
    herd::binary::run_binary("currency", "127.0.0.1:0", |mesh| {
        let config = mesh.config();
        async move { Ok(herd::Services::new().with(herd_currency::Currency::new(config).into_server())) }
    })
}
