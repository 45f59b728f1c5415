//! The currency service: converts base-currency amounts with the configured exact rates, rounding
//! half-even to minor units, at the pinned config revision.

use herd::{ConfigStore, Deadline};
use herd_model::MeshConfig;
use herd_model::money::convert;
use herd_proto::currency::currency_service_server::{CurrencyService, CurrencyServiceServer};
use herd_proto::currency::{ConvertRequest, ConvertResponse};
use herd_proto::types::Money;
use tonic::{Request, Response, Status};

/// Longest a call may take when its caller set no deadline.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The service's handler.
#[derive(Clone)]
pub struct Currency {
    config: ConfigStore<MeshConfig>,
}

impl Currency {
    /// A handler reading configuration from `config`.
    pub fn new(config: ConfigStore<MeshConfig>) -> Self {
        Self { config }
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> CurrencyServiceServer<Self> {
        CurrencyServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl CurrencyService for Currency {
    async fn convert(
        &self,
        request: Request<ConvertRequest>,
    ) -> Result<Response<ConvertResponse>, Status> {
        herd::telemetry::serve(herd_proto::methods::CONVERT.name(), request, |r| {
            self.convert_amounts(r)
        })
        .await
    }
}

impl Currency {
    async fn convert_amounts(
        &self,
        request: Request<ConvertRequest>,
    ) -> Result<Response<ConvertResponse>, Status> {
        Deadline::from_metadata(request.metadata(), DEFAULT_TIMEOUT).remaining()?;
        let req = request.into_inner();
        let ctx = herd::context::require(req.context.as_ref())?;
        let snapshot = self.config.at(ctx.config_revision).await?;
        let config = &snapshot.model;
        herd_model::request::check_currency("target_currency", &req.target_currency, config)?;
        let rate = config
            .rate(&req.target_currency)
            .ok_or_else(|| Status::invalid_argument("target_currency: unsupported"))?;
        let amounts = req
            .amounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if m.currency_code != config.fx.base {
                    return Err(Status::invalid_argument(format!(
                        "amounts[{i}].currency_code: must be the base currency {}, got {:?}",
                        config.fx.base, m.currency_code
                    )));
                }
                let minor_units = convert(m.minor_units, rate).ok_or_else(|| {
                    Status::invalid_argument(format!("amounts[{i}]: amount too large to convert"))
                })?;
                Ok(Money {
                    currency_code: req.target_currency.clone(),
                    minor_units,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(ConvertResponse {
            amounts,
            rate: rate.to_string(),
        }))
    }
}
