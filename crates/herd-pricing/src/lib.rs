//! The pricing service: catalog prices and promotions per line, tax from the tax service and
//! conversion from the currency service, all at the pinned config revision.

use std::time::Duration;

use herd::{ConfigStore, Deadline, MeshChannel};
use herd_model::MeshConfig;
use herd_model::basket;
use herd_proto::currency::ConvertRequest;
use herd_proto::methods::{COMPUTE_TAX, CONVERT, PRICE_ITEMS};
use herd_proto::pricing::pricing_service_server::{PricingService, PricingServiceServer};
use herd_proto::pricing::{PriceItemsRequest, PriceItemsResponse};
use herd_proto::tax::ComputeTaxRequest;
use tonic::{Request, Response, Status};

/// Longest a call may take when its caller set no deadline.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The service's handler.
#[derive(Clone)]
pub struct Pricing {
    config: ConfigStore<MeshConfig>,
    tax: MeshChannel,
    currency: MeshChannel,
}

impl Pricing {
    /// A handler reading configuration from `config` and calling tax and currency over the mesh.
    pub fn new(config: ConfigStore<MeshConfig>, tax: MeshChannel, currency: MeshChannel) -> Self {
        Self {
            config,
            tax,
            currency,
        }
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> PricingServiceServer<Self> {
        PricingServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl PricingService for Pricing {
    async fn price_items(
        &self,
        request: Request<PriceItemsRequest>,
    ) -> Result<Response<PriceItemsResponse>, Status> {
        herd::telemetry::serve(PRICE_ITEMS.name(), request, |r| self.price(r)).await
    }
}

impl Pricing {
    async fn price(
        &self,
        request: Request<PriceItemsRequest>,
    ) -> Result<Response<PriceItemsResponse>, Status> {
        let deadline = Deadline::from_metadata(request.metadata(), DEFAULT_TIMEOUT);
        deadline.remaining()?;
        let req = request.into_inner();
        let ctx = herd::context::require(req.context.as_ref())?;
        let snapshot = self.config.at(ctx.config_revision).await?;
        let config = &snapshot.model;
        herd_model::request::check_items(&req.items, config)?;
        herd_model::request::check_currency("currency", &req.currency, config)?;
        herd_model::request::check_region(&req.region, config)?;

        let (priced, taxable) = basket::price_lines(&req.items, config)?;

        let tax_request = ComputeTaxRequest {
            context: req.context.clone(),
            region: req.region.clone(),
            lines: taxable,
        };
        let taxes = herd::client::call(deadline, &self.tax, COMPUTE_TAX, &tax_request)
            .await
            .map_err(|s| herd::error::relay("tax", s))?
            .taxes;
        // unit price, gross, discount and tax of every line, converted in one call.
        let amounts = basket::to_convert(&priced, &taxes, &config.catalog.currency)?;
        let convert_request = ConvertRequest {
            context: req.context.clone(),
            target_currency: req.currency.clone(),
            amounts,
        };
        let converted = herd::client::call(deadline, &self.currency, CONVERT, &convert_request)
            .await
            .map_err(|s| herd::error::relay("currency", s))?
            .amounts;
        let lines = basket::quote_lines(&req.items, priced, &converted, &req.currency)?;
        Ok(Response::new(PriceItemsResponse { lines }))
    }
}
