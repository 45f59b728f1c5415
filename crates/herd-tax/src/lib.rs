//! The tax service: the tax on each line's net amount in a region, at the pinned config revision.

use herd::{ConfigStore, Deadline};
use herd_model::MeshConfig;
use herd_model::money::tax_of;
use herd_proto::tax::tax_service_server::{TaxService, TaxServiceServer};
use herd_proto::tax::{ComputeTaxRequest, ComputeTaxResponse};
use herd_proto::types::Money;
use tonic::{Request, Response, Status};

/// Longest a call may take when its caller set no deadline.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The service's handler.
#[derive(Clone)]
pub struct Tax {
    config: ConfigStore<MeshConfig>,
}

impl Tax {
    /// A handler reading configuration from `config`.
    pub fn new(config: ConfigStore<MeshConfig>) -> Self {
        Self { config }
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> TaxServiceServer<Self> {
        TaxServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl TaxService for Tax {
    async fn compute_tax(
        &self,
        request: Request<ComputeTaxRequest>,
    ) -> Result<Response<ComputeTaxResponse>, Status> {
        herd::telemetry::serve(herd_proto::methods::COMPUTE_TAX.name(), request, |r| {
            self.compute(r)
        })
        .await
    }
}

impl Tax {
    async fn compute(
        &self,
        request: Request<ComputeTaxRequest>,
    ) -> Result<Response<ComputeTaxResponse>, Status> {
        Deadline::from_metadata(request.metadata(), DEFAULT_TIMEOUT).remaining()?;
        let req = request.into_inner();
        let ctx = herd::context::require(req.context.as_ref())?;
        let snapshot = self.config.at(ctx.config_revision).await?;
        let config = &snapshot.model;
        if req.region.is_empty() {
            return Err(Status::invalid_argument("region: required"));
        }
        let region = config.tax.regions.get(&req.region).ok_or_else(|| {
            Status::invalid_argument(format!("region: unknown tax region {:?}", req.region))
        })?;
        let taxes =
            req.lines
                .iter()
                .enumerate()
                .map(|(i, line)| {
                    let net = line.net.as_ref().ok_or_else(|| {
                        Status::invalid_argument(format!("lines[{i}].net: required"))
                    })?;
                    if net.currency_code != config.catalog.currency {
                        return Err(Status::invalid_argument(format!(
                            "lines[{i}].net.currency_code: must be {}, got {:?}",
                            config.catalog.currency, net.currency_code
                        )));
                    }
                    let minor_units = if region.exempt_categories.contains(&line.category) {
                        0
                    } else {
                        tax_of(net.minor_units, region.rate_bps).ok_or_else(|| {
                            Status::invalid_argument(format!("lines[{i}].net: amount too large"))
                        })?
                    };
                    Ok(Money {
                        currency_code: net.currency_code.clone(),
                        minor_units,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(ComputeTaxResponse {
            taxes,
            rate_bps: region.rate_bps,
        }))
    }
}
