//! The gateway: the mesh's public face. It authenticates each caller by its bearer token, writes
//! who it is into the context (tenant, principal), completes the context (request id, accepted
//! time, pinned config revision) under its seal, has pricing price the basket, and signs the
//! quote with the active key (whose private key it reads from its secrets folder, never etcd).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use herd::error::{quoted, relay};
use herd::{ConfigStore, Deadline, MeshChannel};
use herd_model::MeshConfig;
use herd_model::keys::{ActiveKey, SigningSecrets};
use herd_model::{basket, seal, token};
use herd_proto::WithContext;
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
    secrets: SigningSecrets,
    rates: Arc<rate::TenantRates>,
}

impl Gateway {
    /// A handler reading configuration from `config`, signing with the private keys in
    /// `secrets` and calling pricing over the mesh.
    pub fn new(
        config: ConfigStore<MeshConfig>,
        pricing: MeshChannel,
        secrets: SigningSecrets,
    ) -> Self {
        Self {
            config,
            pricing,
            secrets,
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

/// Fills what the caller left empty — request id, accepted time, and the config revision it is
/// priced at — and seals the result with `key`.
fn complete(context: &RequestContext, revision: i64, key: &ActiveKey) -> RequestContext {
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
    ctx.seal = seal::seal(&ctx, key);
    ctx
}

/// The caller as its bearer token says, written into the request's context before anything
/// else is looked at: the tenant (a context naming another one is PERMISSION_DENIED) and the
/// principal (whatever the caller wrote there is replaced). An accepted time or a pinned revision
/// is believed only under the gateway's own seal, for the same tenant and principal, within the
/// retry window (the quote TTL); without one it is INVALID_ARGUMENT naming the field. Tokens and
/// seals are checked against the configuration as it is now, so a removed key or a revocation
/// takes effect at once whatever revision a request is pinned to.
async fn admit<Req: WithContext>(
    config: &ConfigStore<MeshConfig>,
    secrets: &SigningSecrets,
    metadata: tonic::metadata::MetadataMap,
    mut message: Req,
) -> Result<Req, Status> {
    let snapshot = config
        .current()
        .ok_or(herd::error::RevisionError::NotLoaded)?;
    let now = now().seconds;
    let identity = snapshot.model.auth.authenticate_call(&metadata, now)?;
    let ctx = message
        .context_mut()
        .as_mut()
        .ok_or_else(|| Status::invalid_argument("context: required"))?;
    if ctx.tenant_id.is_empty() {
        ctx.tenant_id = identity.tenant;
    } else if ctx.tenant_id != identity.tenant {
        return Err(Status::permission_denied(format!(
            "context.tenant_id: {} is not the tenant of the caller's token",
            quoted(&ctx.tenant_id)
        )));
    }
    ctx.principal = identity.subject;
    if ctx.seal.is_empty() {
        if ctx.accepted_at.is_some() {
            return Err(unsealed("accepted_at"));
        }
        if ctx.config_revision != 0 {
            return Err(unsealed("config_revision"));
        }
        return Ok(message);
    }
    check_seal(
        ctx,
        &snapshot.model.keys,
        secrets,
        snapshot.revision,
        |revision| async move {
            config
                .at(revision)
                .await
                .map(|newer| newer.model.keys.clone())
        },
    )
    .await?;
    let accepted = ctx.accepted_at.map(|t| t.seconds).unwrap_or_default();
    let window = i64::from(snapshot.model.quote.ttl_seconds);
    if now.saturating_sub(accepted) > window {
        return Err(Status::invalid_argument(format!(
            "context.accepted_at: the retry window of {window} s has passed; send an empty context \
             to start afresh"
        )));
    }
    Ok(message)
}

/// Checks `ctx`'s seal with the keys as they are now (`current`, at `current_revision`). A seal
/// made with a key this gateway has not seen — a rotation that reached another gateway first —
/// is checked with the keys of the revision the context pins, got from `newer`, when that
/// revision is newer than this gateway's; only forward, so a removed key stays removed.
async fn check_seal<F, Fut>(
    ctx: &RequestContext,
    current: &herd_model::sections::KeyRing,
    secrets: &SigningSecrets,
    current_revision: i64,
    newer: F,
) -> Result<(), Status>
where
    F: FnOnce(i64) -> Fut,
    Fut: std::future::Future<
            Output = Result<Arc<herd_model::sections::KeyRing>, herd::error::RevisionError>,
        >,
{
    let checked = match seal::check(ctx, current, secrets) {
        Err(seal::SealError::UnknownKey) if ctx.config_revision > current_revision => {
            let keys = newer(ctx.config_revision).await?;
            seal::check(ctx, &keys, secrets)
        }
        checked => checked,
    };
    checked.map_err(|e| Status::invalid_argument(e.to_string()))
}

fn unsealed(field: &str) -> Status {
    Status::invalid_argument(format!(
        "context.{field}: set only by the gateway; send back the context it returned, seal \
         included, or leave it empty"
    ))
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
        herd::handler::serve_at_admitted(
            CREATE_QUOTE,
            request,
            &self.config,
            |metadata, message| admit(&self.config, &self.secrets, metadata, message),
            |call, config| async move {
                self.rates.admit(
                    &call.context().tenant_id,
                    &config.model.limits,
                    tokio::time::Instant::now(),
                )?;
                let key = self.secrets.active(&config.model.keys)?;
                let ctx = complete(call.context(), config.revision, &key);
                self.create(
                    call.deadline(),
                    ctx,
                    call.into_message(),
                    &config.model,
                    &key,
                )
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
        herd::handler::serve_admitted(
            VERIFY_QUOTE,
            request,
            |metadata, message| admit(&self.config, &self.secrets, metadata, message),
            |call| self.verify(call.into_message()),
        )
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
        key: &ActiveKey,
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
        let token = token::sign(&quote, key);
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
            &self.secrets.active(&snapshot.model.keys)?,
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
        // The context's tenant is the caller's token's (see `admit`).
        if quote.tenant_id != ctx.tenant_id {
            return Err(Status::permission_denied(format!(
                "token: the quote belongs to another tenant than the caller's, {}",
                quoted(&ctx.tenant_id)
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

    /// The issuer the test configuration trusts.
    fn issuer() -> herd_model::auth::DevIssuer {
        herd_model::auth::DevIssuer::from_secret([5; 32])
    }

    /// `request` as `subject` of `tenant` sends it, with a token good for a minute.
    fn signed<T>(mut request: Request<T>, tenant: &str, subject: &str) -> Request<T> {
        let token = issuer()
            .token(tenant, subject, now().seconds, 60)
            .expect("signed");
        let value = format!("Bearer {token}").parse().expect("ascii");
        request.metadata_mut().insert("authorization", value);
        request
    }

    /// A gateway over real pricing, tax and currency services, all on one demo configuration.
    async fn gateway() -> (Gateway, Vec<Resolver>) {
        let (config, secrets) =
            herd_model::demo::fixed_for(&issuer()).expect("the demo configuration is valid");
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
        let gateway = Gateway::new(
            config,
            MeshChannel::new("pricing", pricing.subscribe()),
            secrets,
        );
        (gateway, vec![tax, currency, pricing])
    }

    fn context(tenant: &str) -> Option<RequestContext> {
        Some(RequestContext {
            tenant_id: tenant.into(),
            ..Default::default()
        })
    }

    fn hammers(context: Option<RequestContext>) -> Request<CreateQuoteRequest> {
        let tenant = context
            .as_ref()
            .map(|c| c.tenant_id.clone())
            .unwrap_or_default();
        signed(unsigned_hammers(context), &tenant, "alice")
    }

    fn unsigned_hammers(context: Option<RequestContext>) -> Request<CreateQuoteRequest> {
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
        signed(
            Request::new(VerifyQuoteRequest {
                context: context(tenant),
                token: token.into(),
            }),
            tenant,
            "alice",
        )
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
            .create_quote(signed(unsigned_hammers(None), "acme", "alice"))
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

    #[tokio::test]
    async fn identity_comes_from_the_token_and_the_context_is_sealed() {
        let (gateway, _services) = gateway().await;
        let status = gateway
            .create_quote(unsigned_hammers(context("acme")))
            .await
            .expect_err("no token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("bearer token is required"));

        // An empty tenant is the token's; whatever principal the caller wrote is replaced.
        let mut ctx = RequestContext {
            principal: "root".into(),
            ..Default::default()
        };
        let created = gateway
            .create_quote(signed(unsigned_hammers(Some(ctx.clone())), "acme", "alice"))
            .await
            .expect("valid")
            .into_inner();
        let returned = created.context.clone().unwrap_or_default();
        assert_eq!(
            (returned.tenant_id.as_str(), returned.principal.as_str()),
            ("acme", "alice")
        );
        assert!(!returned.seal.is_empty());

        // The returned context, sent back: the same quote, byte for byte.
        let again = gateway
            .create_quote(signed(
                unsigned_hammers(created.context.clone()),
                "acme",
                "alice",
            ))
            .await
            .expect("a sealed retry")
            .into_inner();
        assert_eq!(
            (&again.quote, &again.token),
            (&created.quote, &created.token)
        );

        // The same seal from another principal or tenant, or with a field changed: refused.
        let status = gateway
            .create_quote(signed(
                unsigned_hammers(created.context.clone()),
                "acme",
                "bob",
            ))
            .await
            .expect_err("another principal");
        assert!(status.message().starts_with("context.seal"), "{status:?}");
        let status = gateway
            .create_quote(signed(
                unsigned_hammers(created.context.clone()),
                "globex",
                "alice",
            ))
            .await
            .expect_err("another tenant");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let mut later = returned.clone();
        later.accepted_at = Some(prost_types::Timestamp {
            seconds: 4_102_444_800,
            nanos: 0,
        });
        let status = gateway
            .create_quote(signed(unsigned_hammers(Some(later)), "acme", "alice"))
            .await
            .expect_err("a made-up accepted time");
        assert!(status.message().starts_with("context.seal"), "{status:?}");

        // Without a seal, a made-up accepted time or revision is refused, naming the field.
        ctx.accepted_at = returned.accepted_at;
        let status = gateway
            .create_quote(signed(unsigned_hammers(Some(ctx.clone())), "acme", "alice"))
            .await
            .expect_err("unsealed accepted_at");
        assert!(
            status.message().starts_with("context.accepted_at"),
            "{status:?}"
        );
        ctx.accepted_at = None;
        ctx.config_revision = 1;
        let status = gateway
            .create_quote(signed(unsigned_hammers(Some(ctx)), "acme", "alice"))
            .await
            .expect_err("unsealed config_revision");
        assert!(
            status.message().starts_with("context.config_revision"),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn a_seal_from_a_rotation_not_yet_applied_is_checked_at_its_revision() {
        use herd_model::sections::KeyRing;
        // The gateway holds the private keys of both (files come before the keys section).
        let (old, _) = KeyRing::for_tests("k1", &["k1"]);
        let (rotated, secrets) = KeyRing::for_tests("k2", &["k1", "k2"]);
        let rotated = Arc::new(rotated);
        let active = secrets.active(&rotated).expect("k2 held");
        let mut ctx = RequestContext {
            tenant_id: "acme".into(),
            principal: "alice".into(),
            request_id: "r".into(),
            config_revision: 8,
            accepted_at: Some(now()),
            ..Default::default()
        };
        ctx.seal = seal::seal(&ctx, &active);
        let asked = std::sync::Mutex::new(Vec::new());
        let newer = |revision| {
            asked.lock().unwrap().push(revision);
            let keys = rotated.clone();
            async move { Ok(keys) }
        };
        // This gateway is at revision 7, the seal pins 8: checked with revision 8's keys.
        check_seal(&ctx, &old, &secrets, 7, newer)
            .await
            .expect("a rotation landing");
        assert_eq!(*asked.lock().unwrap(), vec![8]);
        // Not newer than this gateway's revision: the key is unknown, and that is final.
        let status = check_seal(&ctx, &old, &secrets, 8, newer)
            .await
            .expect_err("removed key");
        assert!(
            status.message().contains("no longer configured"),
            "{status:?}"
        );
        // A seal nobody made, pinning a newer revision, still fails at that revision's keys.
        let mut forged = ctx.clone();
        forged.principal = "mallory".into();
        let status = check_seal(&forged, &old, &secrets, 7, newer)
            .await
            .expect_err("forged");
        assert!(status.message().contains("does not match"), "{status:?}");
    }
}
