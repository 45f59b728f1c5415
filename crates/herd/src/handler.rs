//! The opening every handler shares, written once: the call runs in its `rpc.server` span, the
//! caller's deadline is read (and a spent one refused before any work), the request's context is
//! checked, and — for [`serve_at`] — the configuration is the one the request is pinned to. A
//! handler says only what is its own:
//!
//! ```ignore
//! async fn compute_tax(&self, request: Request<ComputeTaxRequest>)
//!     -> Result<Response<ComputeTaxResponse>, Status> {
//!     herd::handler::serve_at(COMPUTE_TAX, request, &self.config, |call, config| async move {
//!         // call.message(), call.context(), call.deadline(), config.model
//!     })
//!     .await
//! }
//! ```

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use herd_proto::context::RequestContext;
use herd_proto::{Method, WithContext};
use tonic::{Response, Status};

use crate::config::{ConfigModel, ConfigStore, Snapshot};
use crate::context::{Deadline, require};

/// Longest a call may take when its caller set no deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One call, as its handler sees it: the message, whose context is known to be there with a
/// tenant, and the deadline to forward to every call it makes.
#[derive(Debug)]
pub struct Call<Req> {
    deadline: Deadline,
    message: Req,
}

/// Never seen: a [`Call`] exists only once its context has been checked.
static NO_CONTEXT: LazyLock<RequestContext> = LazyLock::new(RequestContext::default);

impl<Req: WithContext> Call<Req> {
    /// By when the call must be answered (forward it to every call made for this one).
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// The request message.
    pub fn message(&self) -> &Req {
        &self.message
    }

    /// The request message, to take apart.
    pub fn into_message(self) -> Req {
        self.message
    }

    /// The request's context (checked: present, with a tenant).
    pub fn context(&self) -> &RequestContext {
        self.message.context().unwrap_or(&NO_CONTEXT)
    }
}

/// Runs `handler` for one call of `method`, inside the call's server span, once the caller's
/// deadline (default [`DEFAULT_TIMEOUT`]) is known not to be spent and the request's context is
/// present and within its bounds ([`require`]). Whatever fails is answered with its status, its
/// message bounded ([`crate::error::bounded`]).
pub async fn serve<Req, Res, F, Fut>(
    method: Method<Req, Res>,
    request: tonic::Request<Req>,
    handler: F,
) -> Result<Response<Res>, Status>
where
    Req: WithContext,
    F: FnOnce(Call<Req>) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    serve_admitted(
        method,
        request,
        |_, message| std::future::ready(Ok(message)),
        handler,
    )
    .await
}

/// As [`serve`], with `admit` run first, inside the span and once the deadline is known not to
/// be spent: it takes the call's metadata and message and gives back the message, completed (a
/// public service authenticates its caller there and writes who it is into the context), or
/// refuses the call. The context is checked after it.
pub async fn serve_admitted<Req, Res, A, AFut, F, Fut>(
    method: Method<Req, Res>,
    request: tonic::Request<Req>,
    admit: A,
    handler: F,
) -> Result<Response<Res>, Status>
where
    Req: WithContext,
    A: FnOnce(tonic::metadata::MetadataMap, Req) -> AFut,
    AFut: Future<Output = Result<Req, Status>>,
    F: FnOnce(Call<Req>) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    crate::telemetry::serve(method.name(), request, |request| async move {
        let deadline = Deadline::from_metadata(request.metadata(), DEFAULT_TIMEOUT);
        deadline.remaining()?;
        let (metadata, _, message) = request.into_parts();
        let message = admit(metadata, message)
            .await
            .map_err(crate::error::bounded)?;
        require(message.context())?;
        handler(Call { deadline, message })
            .await
            .map(Response::new)
            // Whatever the handler says, no answer carries more than a bounded message.
            .map_err(crate::error::bounded)
    })
    .await
}

/// As [`serve`], with the configuration the request is pinned to (`context.config_revision`; 0
/// means the current one), from `store`.
pub async fn serve_at<Req, Res, M, F, Fut>(
    method: Method<Req, Res>,
    request: tonic::Request<Req>,
    store: &ConfigStore<M>,
    handler: F,
) -> Result<Response<Res>, Status>
where
    Req: WithContext,
    M: ConfigModel,
    F: FnOnce(Call<Req>, Arc<Snapshot<M>>) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    serve_at_admitted(
        method,
        request,
        store,
        |_, message| std::future::ready(Ok(message)),
        handler,
    )
    .await
}

/// As [`serve_at`], with `admit` run first as in [`serve_admitted`]: the revision it leaves in
/// the context is the one served.
pub async fn serve_at_admitted<Req, Res, M, A, AFut, F, Fut>(
    method: Method<Req, Res>,
    request: tonic::Request<Req>,
    store: &ConfigStore<M>,
    admit: A,
    handler: F,
) -> Result<Response<Res>, Status>
where
    Req: WithContext,
    M: ConfigModel,
    A: FnOnce(tonic::metadata::MetadataMap, Req) -> AFut,
    AFut: Future<Output = Result<Req, Status>>,
    F: FnOnce(Call<Req>, Arc<Snapshot<M>>) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    serve_admitted(method, request, admit, |call| async move {
        let config = store.at(call.context().config_revision).await?;
        handler(call, config).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::methods::COMPUTE_TAX;
    use herd_proto::tax::{ComputeTaxRequest, ComputeTaxResponse};
    use tonic::Code;

    fn request(tenant: &str, revision: i64) -> tonic::Request<ComputeTaxRequest> {
        tonic::Request::new(ComputeTaxRequest {
            context: Some(RequestContext {
                tenant_id: tenant.into(),
                config_revision: revision,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn revision_seen(
        store: &ConfigStore<()>,
        request: tonic::Request<ComputeTaxRequest>,
    ) -> Result<i64, Status> {
        let mut seen = 0;
        serve_at(COMPUTE_TAX, request, store, |call, config| {
            seen = config.revision;
            assert_eq!(call.context().tenant_id, "acme");
            async { Ok(ComputeTaxResponse::default()) }
        })
        .await?;
        Ok(seen)
    }

    #[tokio::test]
    async fn the_opening_is_done_before_the_handler_runs() {
        let store = ConfigStore::<()>::fixed([]).expect("no sections needed");
        let seen = |r: Result<i64, Status>| r.map_err(|s| (s.code(), s.message().to_string()));
        assert_eq!(seen(revision_seen(&store, request("acme", 0)).await), Ok(1));
        assert_eq!(seen(revision_seen(&store, request("acme", 1)).await), Ok(1));
        assert_eq!(
            seen(revision_seen(&store, request("", 0)).await),
            Err((Code::InvalidArgument, "context.tenant_id: required".into()))
        );
        let mut spent = request("acme", 0);
        spent
            .metadata_mut()
            .insert("grpc-timeout", "0n".parse().unwrap());
        assert_eq!(
            seen(revision_seen(&store, spent).await).map_err(|(code, _)| code),
            Err(Code::DeadlineExceeded)
        );
        // A fixed configuration has no other revision to give.
        assert_eq!(
            seen(revision_seen(&store, request("acme", 7)).await).map_err(|(code, _)| code),
            Err(Code::Unavailable)
        );
    }
}
