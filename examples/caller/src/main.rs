//! A caller outside the mesh: it registers nothing and serves nothing, finds the gateways through
//! etcd, and asks for a quote, then has it verified — each call balanced, health-watched and
//! retried by herd's channel.

use std::time::Duration;

use clap::Parser;
use herd::{Caller, CallerSettings};
use herd_proto::context::RequestContext;
use herd_proto::quote::quote_service_client::QuoteServiceClient;
use herd_proto::quote::{CreateQuoteRequest, VerifyQuoteRequest};
use herd_proto::types::LineItem;

/// Asks the mesh's gateways for quotes and has each verified.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    caller: CallerSettings,
    /// The tenant to quote for (the token's).
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// How many quotes to ask for, one after another.
    #[arg(long, default_value_t = 1)]
    quotes: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let caller = Caller::connect(&args.caller).await?;
    let mut gateway = QuoteServiceClient::new(caller.channel("gateway"));
    let context = || {
        Some(RequestContext {
            tenant_id: args.tenant.clone(),
            ..Default::default()
        })
    };
    for _ in 0..args.quotes {
        let mut create = tonic::Request::new(CreateQuoteRequest {
            context: context(),
            items: vec![LineItem {
                sku: "hammer".into(),
                quantity: 3,
            }],
            currency: "EUR".into(),
            region: "US-CA".into(),
        });
        create.set_timeout(Duration::from_secs(2));
        let created = gateway.create_quote(create).await?.into_inner();
        let mut verify = tonic::Request::new(VerifyQuoteRequest {
            context: context(),
            token: created.token,
        });
        verify.set_timeout(Duration::from_secs(2));
        let quote = gateway.verify_quote(verify).await?.into_inner().quote;
        let (id, total) = quote
            .map(|q| (q.quote_id, q.total.unwrap_or_default()))
            .unwrap_or_default();
        println!(
            "quote {id}: {} {} minor units, verified",
            total.minor_units, total.currency_code
        );
    }
    Ok(())
}
