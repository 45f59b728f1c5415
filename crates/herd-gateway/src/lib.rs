//! The gateway: the mesh's public face. It completes each caller's context (request id, accepted
//! time, pinned config revision), has pricing price the basket, and signs the quote.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use herd::error::relay;
use herd::{ConfigStore, Deadline, MeshChannel};
use herd_model::MeshConfig;
use herd_model::{basket, token};
use herd_proto::context::RequestContext;
use herd_proto::methods::{CREATE_QUOTE, PRICE_ITEMS, VERIFY_QUOTE};
use herd_proto::pricing::PriceItemsRequest;
use herd_proto::quote::quote_service_server::{QuoteService, QuoteServiceServer};
use herd_proto::quote::{
    CreateQuoteRequest, CreateQuoteResponse, VerifyQuoteRequest, VerifyQuoteResponse,
};
use tonic::{Request, Response, Status};

pub mod rate;

/// The largest request the public API takes (the internal services take up to
/// [`herd::door::DEFAULT_MAX_REQUEST`]): a basket of the most items a configuration may allow
/// fits, nothing much larger is read.
pub const MAX_REQUEST: usize = 256 * 1024;

/// The service's handler.
#[derive(Clone)]
pub struct Gateway {
    config: ConfigStore<MeshConfig>,
    pricing: MeshChannel,
    rates: Arc<rate::TenantRates>,
}

impl Gateway {
    /// A handler reading configuration from `config` and calling pricing over the mesh.
    pub fn new(config: ConfigStore<MeshConfig>, pricing: MeshChannel) -> Self {
        Self {
            config,
            pricing,
            rates: Arc::default(),
        }
    }

    /// Shares each tenant's rate among the gateways `peers` lists (by default this gateway
    /// enforces the whole rate alone).
    pub fn with_peers(
        mut self,
        peers: tokio::sync::watch::Receiver<herd::discovery::Discovered>,
    ) -> Self {
        self.rates = Arc::new(rate::TenantRates::shared_with(peers));
        self
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> QuoteServiceServer<Self> {
        QuoteServiceServer::new(self)
    }
}

/// Fills what the caller left empty: request id, accepted time, and the config revision it is
/// priced at.
fn complete(context: &RequestContext, revision: i64) -> RequestContext {
    let mut ctx = context.clone();
    if ctx.request_id.is_empty() {
        // From the thread-local generator: no system call per request.
        ctx.request_id = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
    }
    if ctx.accepted_at.is_none() {
        ctx.accepted_at = Some(now());
    }
    if ctx.config_revision == 0 {
        ctx.config_revision = revision;
    }
    ctx
}

fn now() -> prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl QuoteService for Gateway {
    async fn create_quote(
        &self,
        request: Request<CreateQuoteRequest>,
    ) -> Result<Response<CreateQuoteResponse>, Status> {
        herd::handler::serve_at(
            CREATE_QUOTE,
            request,
            &self.config,
            |call, config| async move {
                self.rates.admit(
                    &call.context().tenant_id,
                    &config.model.limits,
                    tokio::time::Instant::now(),
                )?;
                let ctx = complete(call.context(), config.revision);
                self.create(call.deadline(), ctx, call.into_message(), &config.model)
                    .await
            },
        )
        .await
    }

    async fn verify_quote(
        &self,
        request: Request<VerifyQuoteRequest>,
    ) -> Result<Response<VerifyQuoteResponse>, Status> {
        // Keys are checked as they are now, whatever revision the context is pinned to: a removed
        // key no longer verifies anything.
        herd::handler::serve(VERIFY_QUOTE, request, |call| {
            self.verify(call.into_message())
        })
        .await
    }
}

impl Gateway {
    async fn create(
        &self,
        deadline: Deadline,
        ctx: RequestContext,
        req: CreateQuoteRequest,
        config: &MeshConfig,
    ) -> Result<CreateQuoteResponse, Status> {
        herd::telemetry::record_context(&tracing::Span::current(), &ctx);
        herd_model::request::check_items(&req.items, config)?;
        herd_model::request::check_currency("currency", &req.currency, config)?;
        herd_model::request::check_region(&req.region, config)?;

        let pricing_request = PriceItemsRequest {
            context: Some(ctx.clone()),
            items: req.items,
            currency: req.currency.clone(),
            region: req.region,
        };
        let lines = herd::client::call(deadline, &self.pricing, PRICE_ITEMS, &pricing_request)
            .await
            .map_err(|e| relay("pricing", e))?
            .lines;

        let quote = basket::quote(
            &basket::QuoteFor {
                tenant_id: &ctx.tenant_id,
                request_id: &ctx.request_id,
                accepted_at: ctx.accepted_at.unwrap_or_default(),
                config_revision: ctx.config_revision,
            },
            lines,
            &req.currency,
            config,
        )?;
        herd::telemetry::record_quote_id(&quote.quote_id);
        let token = token::sign(&quote, &config.keys);
        tracing::debug!(request_id = %ctx.request_id, quote_id = %quote.quote_id, "quote created");
        Ok(CreateQuoteResponse {
            context: Some(ctx),
            quote: Some(quote),
            token,
        })
    }

    async fn verify(&self, req: VerifyQuoteRequest) -> Result<VerifyQuoteResponse, Status> {
        if req.token.trim().is_empty() {
            return Err(Status::invalid_argument("token: required"));
        }
        let snapshot = self
            .config
            .current()
            .ok_or(herd::error::RevisionError::NotLoaded)?;
        let ctx = complete(
            req.context.as_ref().unwrap_or(&RequestContext::default()),
            snapshot.revision,
        );
        self.rates.admit(
            &ctx.tenant_id,
            &snapshot.model.limits,
            tokio::time::Instant::now(),
        )?;
        let now = now().seconds;
        let quote = match token::verify(&req.token, &snapshot.model.keys, now) {
            // Signed with a key from a revision this instance has not applied yet (a rotation
            // landing): verify with that revision's keys. Only forward, so a removed key stays
            // removed.
            Err(token::TokenError::UnknownKey(_))
                if token::claimed_revision(&req.token).is_some_and(|r| r > snapshot.revision) =>
            {
                let claimed = token::claimed_revision(&req.token).unwrap_or_default();
                let newer = self.config.at(claimed).await?;
                token::verify(&req.token, &newer.model.keys, now)?
            }
            result => result?,
        };
        herd::telemetry::record_quote_id(&quote.quote_id);
        if quote.tenant_id != ctx.tenant_id {
            return Err(Status::permission_denied(format!(
                "token: the quote belongs to another tenant than {}",
                herd::error::quoted(&ctx.tenant_id)
            )));
        }
        Ok(VerifyQuoteResponse {
            context: Some(ctx),
            quote: Some(quote),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd::discovery::Resolver;
    use herd::instance::InstanceInfo;
    use herd_proto::types::LineItem;
    use tonic::Code;

    /// Serves `services` on a loopback port, found by a fixed resolver.
    async fn serve(service: &str, services: herd::Services) -> Resolver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(services.serve_standalone(service.to_string(), listener));
        Resolver::fixed([InstanceInfo {
            service: service.into(),
            instance_id: format!("{service}-1"),
            address,
            pid: 0,
            version: "test".into(),
        }])
    }

    /// A gateway over real pricing, tax and currency services, all on one demo configuration.
    async fn gateway() -> (Gateway, Vec<Resolver>) {
        let config = herd_model::demo::fixed().expect("the demo configuration is valid");
        let tax = serve(
            "tax",
            herd::Services::new().with(herd_tax::Tax::new(config.clone()).into_server()),
        )
        .await;
        let currency = serve(
            "currency",
            herd::Services::new().with(herd_currency::Currency::new(config.clone()).into_server()),
        )
        .await;
        let pricing = herd_pricing::Pricing::new(
            config.clone(),
            MeshChannel::new("tax", tax.subscribe()),
            MeshChannel::new("currency", currency.subscribe()),
        );
        let pricing = serve("pricing", herd::Services::new().with(pricing.into_server())).await;
        let gateway = Gateway::new(config, MeshChannel::new("pricing", pricing.subscribe()));
        (gateway, vec![tax, currency, pricing])
    }

    fn context(tenant: &str) -> Option<RequestContext> {
        Some(RequestContext {
            tenant_id: tenant.into(),
            ..Default::default()
        })
    }

    fn hammers(context: Option<RequestContext>) -> Request<CreateQuoteRequest> {
        Request::new(CreateQuoteRequest {
            context,
            items: vec![LineItem {
                sku: "hammer".into(),
                quantity: 3,
            }],
            currency: "EUR".into(),
            region: "US-CA".into(),
        })
    }

    fn verify(token: &str, tenant: &str) -> Request<VerifyQuoteRequest> {
        Request::new(VerifyQuoteRequest {
            context: context(tenant),
            token: token.into(),
        })
    }

    #[tokio::test]
    async fn a_quote_is_completed_signed_and_verified_by_its_tenant_only() {
        let (gateway, _services) = gateway().await;
        let created = gateway
            .create_quote(hammers(context("acme")))
            .await
            .expect("valid")
            .into_inner();
        let ctx = created.context.clone().unwrap_or_default();
        assert!(!ctx.request_id.is_empty() && ctx.accepted_at.is_some());
        assert_eq!(ctx.config_revision, 1, "the fixed configuration's revision");
        let quote = created.quote.clone().unwrap_or_default();
        assert_eq!(
            (quote.tenant_id.as_str(), quote.currency.as_str()),
            ("acme", "EUR")
        );

        // The same context again: the identical quote and token.
        let again = gateway
            .create_quote(hammers(created.context.clone()))
            .await
            .expect("a retry")
            .into_inner();
        assert_eq!(
            (again.quote, &again.token),
            (created.quote.clone(), &created.token)
        );

        let verified = gateway
            .verify_quote(verify(&created.token, "acme"))
            .await
            .expect("its own tenant")
            .into_inner();
        assert_eq!(verified.quote, created.quote);
        let status = gateway
            .verify_quote(verify(&created.token, "other"))
            .await
            .expect_err("another tenant");
        assert_eq!(status.code(), Code::PermissionDenied);
        let mut altered = created.token.clone();
        altered.insert(10, 'x');
        let status = gateway
            .verify_quote(verify(&altered, "acme"))
            .await
            .expect_err("an altered token");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    #[tokio::test]
    async fn bad_input_gets_a_status_naming_the_field() {
        let (gateway, _services) = gateway().await;
        let status = gateway
            .create_quote(hammers(None))
            .await
            .expect_err("no context");
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, "context: required")
        );
        let mut request = hammers(context("acme"));
        request.get_mut().region = "XX".into();
        let status = gateway
            .create_quote(request)
            .await
            .expect_err("unknown region");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("region"), "{status:?}");
        let status = gateway
            .verify_quote(verify(" ", "acme"))
            .await
            .expect_err("no token");
        assert_eq!(status.message(), "token: required");
    }
}
