//! `herd-tax`: serves the tax service as a mesh worker.

use std::process::ExitCode;

fn main() -> ExitCode {
    herd::binary::run_binary("tax", "127.0.0.1:0", |mesh| {
        let config = mesh.config();
        async move { Ok(herd::Services::new().with(herd_tax::Tax::new(config).into_server())) }
    })
}
