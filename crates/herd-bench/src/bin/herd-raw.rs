//! `herd-raw`: one baseline server — the reference mesh's logic on plain tonic with none of herd's
//! layers — or the hello-world ceiling, an OTLP sink, or a server that refuses every call.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use herd_bench::raw;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Gateway,
    Pricing,
    Tax,
    Currency,
    /// grpc.health.v1 only: the ceiling of a plain tonic server on this machine.
    Hello,
    /// An OTLP/gRPC receiver that counts and discards spans.
    Sink,
    /// Every call answered `UNAVAILABLE` at once, on `h2` alone: the least a refusal can cost.
    Refuse,
}

/// Serve one baseline role on a fixed address until killed.
#[derive(Debug, Parser)]
struct Args {
    /// Which server.
    #[arg(long, value_enum)]
    role: Role,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Configuration: a folder of SECTION.json files (catalog, tax, fx, keys, ...).
    #[arg(long, default_value = "")]
    config: String,
    /// The folder of private signing keys, `<key-id>.pem` (gateway).
    #[arg(long, default_value = "")]
    secrets: String,
    /// Pricing's address (gateway).
    #[arg(long, default_value = "")]
    pricing: String,
    /// Tax's address (pricing).
    #[arg(long, default_value = "")]
    tax: String,
    /// Currency's address (pricing).
    #[arg(long, default_value = "")]
    currency: String,
    /// Mutual TLS on every hop, with certificates as `herdctl certs init` writes them into this
    /// folder (the role's own, and the CA).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<std::path::PathBuf>,
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let role = format!("{:?}", args.role).to_lowercase();
    let tls = match &args.tls_dir {
        Some(dir) => Some(raw::RawTls::load(dir, &role)?),
        None => None,
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        // Called from outside the mesh: a client certificate is optional, as at herd's gateway.
        let public = matches!(args.role, Role::Gateway | Role::Hello);
        server = server.tls_config(tls.server(public))?;
    }
    let channel = |address: String| {
        let tls = tls.clone();
        async move { raw::channel_with(&address, tls.as_ref()).await }
    };
    let sink = herd_bench::sink::Sink::default();
    let router = match args.role {
        Role::Hello => server.add_service(tonic_health::server::health_reporter().1),
        Role::Sink => server.add_service(herd_bench::sink::server(sink.clone())),
        // On h2 alone, without tonic.
        Role::Refuse => return herd_bench::refuse::serve(listener).await,
        Role::Tax => server.add_service(raw::tax_server(raw::load_config(&args.config)?)),
        Role::Currency => server.add_service(raw::currency_server(raw::load_config(&args.config)?)),
        Role::Pricing => server.add_service(raw::pricing_server(raw::RawPricing {
            config: raw::load_config(&args.config)?,
            tax: herd_proto::tax::tax_service_client::TaxServiceClient::new(
                channel(args.tax.clone()).await?,
            ),
            currency: herd_proto::currency::currency_service_client::CurrencyServiceClient::new(
                channel(args.currency.clone()).await?,
            ),
        })),
        Role::Gateway => {
            let config = raw::load_config(&args.config)?;
            server.add_service(raw::gateway_server(raw::RawGateway {
                key: raw::active_key(&args.secrets, &config)?,
                config,
                pricing: herd_proto::pricing::pricing_service_client::PricingServiceClient::new(
                    channel(args.pricing.clone()).await?,
                ),
            }))
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    if args.role == Role::Sink {
        // A sink stops on SIGTERM and says how many spans it received, for the benchmark to
        // compare with what the instances say they exported.
        router
            .serve_with_incoming_shutdown(incoming, herd::binary::shutdown_signal())
            .await?;
        println!(
            "spans received: {}",
            sink.spans.load(std::sync::atomic::Ordering::Relaxed)
        );
        return Ok(());
    }
    router.serve_with_incoming(incoming).await?;
    Ok(())
}

fn main() -> ExitCode {
    herd::binary::block_on_main(serve(Args::parse()))
}
