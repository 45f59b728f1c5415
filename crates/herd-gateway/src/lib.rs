//! The gateway: the mesh's public face. It completes each caller's context (request id, accepted
//! time, pinned config revision), has pricing price the basket, and signs the quote.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Longest a call may take when its caller set no deadline.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The service's handler.
#[derive(Clone)]
pub struct Gateway {
    config: ConfigStore<MeshConfig>,
    pricing: MeshChannel,
}

impl Gateway {
    /// A handler reading configuration from `config` and calling pricing over the mesh.
    pub fn new(config: ConfigStore<MeshConfig>, pricing: MeshChannel) -> Self {
        Self { config, pricing }
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> QuoteServiceServer<Self> {
        QuoteServiceServer::new(self)
    }

    /// Fills what the caller left empty: request id, accepted time, config revision.
    fn complete(&self, context: Option<&RequestContext>) -> Result<RequestContext, Status> {
        let mut ctx = herd::context::require(context)?.clone();
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
            ctx.config_revision = self
                .config
                .current()
                .map(|s| s.revision)
                .ok_or(herd::error::RevisionError::NotLoaded)?;
        }
        Ok(ctx)
    }
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
        herd::telemetry::serve(CREATE_QUOTE.name(), request, |r| self.create(r)).await
    }

    async fn verify_quote(
        &self,
        request: Request<VerifyQuoteRequest>,
    ) -> Result<Response<VerifyQuoteResponse>, Status> {
        herd::telemetry::serve(VERIFY_QUOTE.name(), request, |r| self.verify(r)).await
    }
}

impl Gateway {
    async fn create(
        &self,
        request: Request<CreateQuoteRequest>,
    ) -> Result<Response<CreateQuoteResponse>, Status> {
        let deadline = Deadline::from_metadata(request.metadata(), DEFAULT_TIMEOUT);
        deadline.remaining()?;
        let req = request.into_inner();
        let ctx = self.complete(req.context.as_ref())?;
        herd::telemetry::record_context(&tracing::Span::current(), &ctx);
        let snapshot = self.config.at(ctx.config_revision).await?;
        let config = &snapshot.model;
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
            .map_err(|s| herd::error::relay("pricing", s))?
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
        Ok(Response::new(CreateQuoteResponse {
            context: Some(ctx),
            quote: Some(quote),
            token,
        }))
    }

    async fn verify(
        &self,
        request: Request<VerifyQuoteRequest>,
    ) -> Result<Response<VerifyQuoteResponse>, Status> {
        Deadline::from_metadata(request.metadata(), DEFAULT_TIMEOUT).remaining()?;
        let req = request.into_inner();
        let ctx = self.complete(req.context.as_ref())?;
        if req.token.trim().is_empty() {
            return Err(Status::invalid_argument("token: required"));
        }
        // Keys are checked as they are now: a removed key no longer verifies anything.
        let snapshot = self
            .config
            .current()
            .ok_or(herd::error::RevisionError::NotLoaded)?;
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
                "token: the quote belongs to another tenant than {:?}",
                ctx.tenant_id
            )));
        }
        Ok(Response::new(VerifyQuoteResponse {
            context: Some(ctx),
            quote: Some(quote),
        }))
    }
}
