//! The baseline: the reference mesh's four services with none of herd's layers — plain tonic
//! servers at fixed addresses, configuration read once from a file, plain tonic clients to fixed
//! addresses, no etcd, discovery, balancing, health, tracing, deadlines or context forwarding.
//! The arithmetic is herd-model's, so both meshes do the same work per call.

use std::collections::BTreeMap;
use std::sync::Arc;

use herd_model::MeshConfig;
use herd_model::basket;
use herd_model::keys::{ActiveKey, SigningSecrets};
use herd_model::money::{convert, tax_of};
use herd_model::token;
use herd_proto::currency::currency_service_client::CurrencyServiceClient;
use herd_proto::currency::currency_service_server::{CurrencyService, CurrencyServiceServer};
use herd_proto::currency::{ConvertRequest, ConvertResponse};
use herd_proto::pricing::pricing_service_client::PricingServiceClient;
use herd_proto::pricing::pricing_service_server::{PricingService, PricingServiceServer};
use herd_proto::pricing::{PriceItemsRequest, PriceItemsResponse};
use herd_proto::quote::quote_service_server::{QuoteService, QuoteServiceServer};
use herd_proto::quote::{
    CreateQuoteRequest, CreateQuoteResponse, VerifyQuoteRequest, VerifyQuoteResponse,
};
use herd_proto::tax::tax_service_client::TaxServiceClient;
use herd_proto::tax::tax_service_server::{TaxService, TaxServiceServer};
use herd_proto::tax::{ComputeTaxRequest, ComputeTaxResponse};
use herd_proto::types::Money;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Reads the configuration from a folder of `SECTION.json` files (as `herdctl config apply` takes).
pub fn load_config(dir: &str) -> anyhow::Result<Arc<MeshConfig>> {
    let mut sections = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_stem().and_then(|s| s.to_str());
        if let (true, Some(name)) = (path.extension().is_some_and(|e| e == "json"), name) {
            sections.insert(name.to_string(), std::fs::read(&path)?);
        }
    }
    Ok(Arc::new(MeshConfig::from_json(&sections)?))
}

/// The baseline tax service.
pub struct RawTax(pub Arc<MeshConfig>);

#[tonic::async_trait]
impl TaxService for RawTax {
    async fn compute_tax(
        &self,
        request: Request<ComputeTaxRequest>,
    ) -> Result<Response<ComputeTaxResponse>, Status> {
        let req = request.into_inner();
        let region = self
            .0
            .tax
            .regions
            .get(&req.region)
            .ok_or_else(|| Status::invalid_argument("region"))?;
        let taxes = req
            .lines
            .iter()
            .map(|l| {
                let net = l.net.clone().unwrap_or_default();
                let tax = if region.exempt_categories.contains(&l.category) {
                    0
                } else {
                    tax_of(net.minor_units, region.rate_bps).unwrap_or(0)
                };
                Money {
                    currency_code: net.currency_code,
                    minor_units: tax,
                }
            })
            .collect();
        Ok(Response::new(ComputeTaxResponse {
            taxes,
            rate_bps: region.rate_bps,
        }))
    }
}

/// The baseline currency service.
pub struct RawCurrency(pub Arc<MeshConfig>);

#[tonic::async_trait]
impl CurrencyService for RawCurrency {
    async fn convert(
        &self,
        request: Request<ConvertRequest>,
    ) -> Result<Response<ConvertResponse>, Status> {
        let req = request.into_inner();
        let rate = self
            .0
            .rate(&req.target_currency)
            .ok_or_else(|| Status::invalid_argument("target_currency"))?;
        let amounts = req
            .amounts
            .iter()
            .map(|m| Money {
                currency_code: req.target_currency.clone(),
                minor_units: convert(m.minor_units, rate).unwrap_or(0),
            })
            .collect();
        Ok(Response::new(ConvertResponse {
            amounts,
            rate: rate.to_string(),
        }))
    }
}

/// The baseline pricing service.
pub struct RawPricing {
    /// Configuration.
    pub config: Arc<MeshConfig>,
    /// Tax, at a fixed address.
    pub tax: TaxServiceClient<Channel>,
    /// Currency, at a fixed address.
    pub currency: CurrencyServiceClient<Channel>,
}

#[tonic::async_trait]
impl PricingService for RawPricing {
    async fn price_items(
        &self,
        request: Request<PriceItemsRequest>,
    ) -> Result<Response<PriceItemsResponse>, Status> {
        let req = request.into_inner();
        let config = &self.config;
        let (priced, taxable) = basket::price_lines(&req.items, config)?;
        let taxes = self
            .tax
            .clone()
            .compute_tax(ComputeTaxRequest {
                context: None,
                region: req.region.clone(),
                lines: taxable,
            })
            .await?
            .into_inner()
            .taxes;
        let amounts = basket::to_convert(&priced, &taxes, &config.catalog.currency)?;
        let converted = self
            .currency
            .clone()
            .convert(ConvertRequest {
                context: None,
                target_currency: req.currency.clone(),
                amounts,
            })
            .await?
            .into_inner()
            .amounts;
        let lines = basket::quote_lines(&req.items, priced, &converted, &req.currency)?;
        Ok(Response::new(PriceItemsResponse { lines }))
    }
}

/// The active signing key of `config`, its private key read from the folder `secrets`.
pub fn active_key(secrets: &str, config: &MeshConfig) -> anyhow::Result<ActiveKey> {
    let secrets = SigningSecrets::load(std::path::Path::new(secrets))?;
    Ok(secrets.active(&config.keys)?)
}

/// The baseline gateway.
pub struct RawGateway {
    /// Configuration.
    pub config: Arc<MeshConfig>,
    /// The key that signs quotes.
    pub key: ActiveKey,
    /// Pricing, at a fixed address.
    pub pricing: PricingServiceClient<Channel>,
}

#[tonic::async_trait]
impl QuoteService for RawGateway {
    async fn create_quote(
        &self,
        request: Request<CreateQuoteRequest>,
    ) -> Result<Response<CreateQuoteResponse>, Status> {
        // The same authentication as herd's gateway: bearer JWT verified, tenant from the token.
        let (metadata, _, req) = request.into_parts();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let identity = self
            .config
            .auth
            .authenticate_call(&metadata, i64::try_from(now.as_secs()).unwrap_or(i64::MAX))?;
        let tenant = match req.context.as_ref().map(|c| c.tenant_id.as_str()) {
            None | Some("") => identity.tenant,
            Some(t) if t == identity.tenant => identity.tenant,
            Some(_) => {
                return Err(Status::permission_denied(
                    "context.tenant_id: not the token's",
                ));
            }
        };
        let lines = self
            .pricing
            .clone()
            .price_items(PriceItemsRequest {
                context: None,
                items: req.items,
                currency: req.currency.clone(),
                region: req.region,
            })
            .await?
            .into_inner()
            .lines;
        let request_for = basket::QuoteFor {
            tenant_id: &tenant,
            request_id: "raw",
            accepted_at: prost_timestamp(now),
            config_revision: 0,
        };
        let quote = basket::quote(&request_for, lines, &req.currency, &self.config)?;
        let token = token::sign(&quote, &self.key);
        Ok(Response::new(CreateQuoteResponse {
            context: None,
            quote: Some(quote),
            token,
        }))
    }

    async fn verify_quote(
        &self,
        _request: Request<VerifyQuoteRequest>,
    ) -> Result<Response<VerifyQuoteResponse>, Status> {
        Err(Status::unimplemented("the baseline only creates quotes"))
    }
}

fn prost_timestamp(d: std::time::Duration) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A plain tonic channel to a fixed address.
pub async fn channel(address: &str) -> anyhow::Result<Channel> {
    channel_with(address, None).await
}

/// TLS as plain tonic does it (its rustls, ring), from certificates as `herdctl certs init`
/// writes them: the CA, and one role's certificate and key.
#[derive(Debug, Clone)]
pub struct RawTls {
    ca: tonic::transport::Certificate,
    identity: tonic::transport::Identity,
}

impl RawTls {
    /// `dir/ca.pem`, and `dir/<role>.pem` with `dir/<role>-key.pem`.
    pub fn load(dir: &std::path::Path, role: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let read = |name: String| {
            let path = dir.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(Self {
            ca: tonic::transport::Certificate::from_pem(read("ca.pem".into())?),
            identity: tonic::transport::Identity::from_pem(
                read(format!("{role}.pem"))?,
                read(format!("{role}-key.pem"))?,
            ),
        })
    }

    /// The server side: the role's certificate, callers' certificates checked against the CA
    /// (required, or optional for the gateway).
    pub fn server(&self, client_optional: bool) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(client_optional)
    }
}

/// A channel to `address`, over TLS when `tls` is given (presenting its certificate).
pub async fn channel_with(address: &str, tls: Option<&RawTls>) -> anyhow::Result<Channel> {
    // Plain tonic, as the baseline must be: herd's helper only names the endpoint.
    let mut endpoint = herd::client::fixed_endpoint(address, tls.is_some())?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tls.ca.clone())
                .identity(tls.identity.clone()),
        )?;
    }
    Ok(endpoint.connect().await?)
}

/// Servers for each role.
pub fn tax_server(config: Arc<MeshConfig>) -> TaxServiceServer<RawTax> {
    TaxServiceServer::new(RawTax(config))
}

/// The currency server.
pub fn currency_server(config: Arc<MeshConfig>) -> CurrencyServiceServer<RawCurrency> {
    CurrencyServiceServer::new(RawCurrency(config))
}

/// The pricing server.
pub fn pricing_server(p: RawPricing) -> PricingServiceServer<RawPricing> {
    PricingServiceServer::new(p)
}

/// The gateway server.
pub fn gateway_server(g: RawGateway) -> QuoteServiceServer<RawGateway> {
    QuoteServiceServer::new(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve<S>(svc: S) -> String
    where
        S: tower_service_bound::Bound,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        svc.spawn(listener);
        address
    }

    /// Spawning a generated server without naming tonic's long bounds.
    mod tower_service_bound {
        pub trait Bound {
            fn spawn(self, listener: tokio::net::TcpListener);
        }
        macro_rules! bound {
            ($($t:ty),*) => {$(impl Bound for $t {
                fn spawn(self, listener: tokio::net::TcpListener) {
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .add_service(self)
                            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
                    );
                }
            })*};
        }
        bound!(
            super::TaxServiceServer<super::RawTax>,
            super::CurrencyServiceServer<super::RawCurrency>,
            super::PricingServiceServer<super::RawPricing>,
            super::QuoteServiceServer<super::RawGateway>
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_baseline_prices_like_the_mesh() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/bench/config");
        let config = load_config(dir).unwrap();
        let tax = serve(tax_server(config.clone())).await;
        let currency = serve(currency_server(config.clone())).await;
        let pricing = serve(pricing_server(RawPricing {
            config: config.clone(),
            tax: TaxServiceClient::new(channel(&tax).await.unwrap()),
            currency: CurrencyServiceClient::new(channel(&currency).await.unwrap()),
        }))
        .await;
        let secrets = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/bench/secrets");
        let key = active_key(secrets, &config).unwrap();
        let gateway = serve(gateway_server(RawGateway {
            config,
            key,
            pricing: PricingServiceClient::new(channel(&pricing).await.unwrap()),
        }))
        .await;
        let mut client = herd_proto::quote::quote_service_client::QuoteServiceClient::new(
            channel(&gateway).await.unwrap(),
        );
        let issuer: herd_model::auth::DevIssuer = serde_json::from_slice(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../deploy/bench/issuer.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut request = Request::new(crate::load::quote_request());
        let bearer = format!(
            "Bearer {}",
            issuer.token("bench", "bench", now, 60).unwrap()
        );
        request
            .metadata_mut()
            .insert("authorization", bearer.parse().unwrap());
        let unsigned = client
            .create_quote(crate::load::quote_request())
            .await
            .expect_err("no token");
        assert_eq!(unsigned.code(), tonic::Code::Unauthenticated);
        let quote = client
            .create_quote(request)
            .await
            .unwrap()
            .into_inner()
            .quote
            .unwrap();
        // 3 widgets: 59.97 − 15 % (9.00) + 7.25 % tax (3.70) → EUR 55.47 − 8.32 + 3.42 = 50.57;
        // 2 apples: 2.50, food, untaxed → EUR 2.31. Total EUR 52.88.
        assert_eq!(quote.total.map(|m| m.minor_units), Some(5288));
    }
}
