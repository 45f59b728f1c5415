//! The pricing service: catalog prices and promotions per line, tax from the tax service and
//! conversion from the currency service, all at the pinned config revision.

use std::time::Duration;

use herd::balance::RetryBudget;
use herd::{ConfigStore, Deadline, MeshChannel};
use herd_model::MeshConfig;
use herd_model::money::{best_promotion, line_amounts};
use herd_proto::currency::ConvertRequest;
use herd_proto::currency::currency_service_client::CurrencyServiceClient;
use herd_proto::pricing::pricing_service_server::{PricingService, PricingServiceServer};
use herd_proto::pricing::{PriceItemsRequest, PriceItemsResponse};
use herd_proto::tax::tax_service_client::TaxServiceClient;
use herd_proto::tax::{ComputeTaxRequest, TaxableLine};
use herd_proto::types::{Money, QuoteLine};
use tonic::{Request, Response, Status};

/// Longest a call may take when its caller set no deadline.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The service's handler.
#[derive(Clone)]
pub struct Pricing {
    config: ConfigStore<MeshConfig>,
    tax: TaxServiceClient<MeshChannel>,
    tax_budget: RetryBudget,
    currency: CurrencyServiceClient<MeshChannel>,
    currency_budget: RetryBudget,
}

impl Pricing {
    /// A handler reading configuration from `config` and calling tax and currency over the mesh.
    pub fn new(config: ConfigStore<MeshConfig>, tax: MeshChannel, currency: MeshChannel) -> Self {
        Self {
            config,
            tax_budget: tax.budget().clone(),
            tax: TaxServiceClient::new(tax),
            currency_budget: currency.budget().clone(),
            currency: CurrencyServiceClient::new(currency),
        }
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> PricingServiceServer<Self> {
        PricingServiceServer::new(self)
    }
}

/// One line in the catalog currency, before tax.
struct Priced {
    unit: i64,
    gross: i64,
    discount: i64,
    promotion_id: String,
}

#[tonic::async_trait]
impl PricingService for Pricing {
    async fn price_items(
        &self,
        request: Request<PriceItemsRequest>,
    ) -> Result<Response<PriceItemsResponse>, Status> {
        herd::telemetry::serve("herd.pricing.v1.PricingService/PriceItems", request, |r| {
            self.price(r)
        })
        .await
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

        let base = config.catalog.currency.clone();
        let mut priced = Vec::with_capacity(req.items.len());
        let mut taxable = Vec::with_capacity(req.items.len());
        for (i, item) in req.items.iter().enumerate() {
            let entry = config.catalog.items.get(&item.sku).ok_or_else(|| {
                Status::not_found(format!("items[{i}].sku: unknown SKU {:?}", item.sku))
            })?;
            let promotion = best_promotion(
                &config.promotions,
                &item.sku,
                &entry.category,
                item.quantity,
            );
            let amounts = line_amounts(
                entry.price_minor,
                item.quantity,
                promotion.map_or(0, |p| p.percent_off),
            )
            .ok_or_else(|| {
                Status::invalid_argument(format!("items[{i}].quantity: line amount too large"))
            })?;
            taxable.push(TaxableLine {
                sku: item.sku.clone(),
                category: entry.category.clone(),
                net: Some(Money {
                    currency_code: base.clone(),
                    minor_units: amounts.net,
                }),
            });
            priced.push(Priced {
                unit: entry.price_minor,
                gross: amounts.gross,
                discount: amounts.discount,
                promotion_id: promotion.map(|p| p.id.clone()).unwrap_or_default(),
            });
        }

        let tax_request = ComputeTaxRequest {
            context: req.context.clone(),
            region: req.region.clone(),
            lines: taxable,
        };
        let taxes = herd::context::call(
            deadline,
            &self.tax_budget,
            "herd.tax.v1.TaxService/ComputeTax",
            &tax_request,
            |r| {
                let mut client = self.tax.clone();
                async move { client.compute_tax(r).await }
            },
        )
        .await
        .map_err(|s| herd::context::relay("tax", s))?
        .taxes;
        if taxes.len() != priced.len() {
            return Err(Status::internal(
                "tax: answered a different number of lines",
            ));
        }

        // unit price, gross, discount and tax of every line, converted in one call.
        let money = |minor_units| Money {
            currency_code: base.clone(),
            minor_units,
        };
        let amounts = priced
            .iter()
            .zip(&taxes)
            .flat_map(|(p, t)| {
                [
                    money(p.unit),
                    money(p.gross),
                    money(p.discount),
                    money(t.minor_units),
                ]
            })
            .collect();
        let convert_request = ConvertRequest {
            context: req.context.clone(),
            target_currency: req.currency.clone(),
            amounts,
        };
        let converted = herd::context::call(
            deadline,
            &self.currency_budget,
            "herd.currency.v1.CurrencyService/Convert",
            &convert_request,
            |r| {
                let mut client = self.currency.clone();
                async move { client.convert(r).await }
            },
        )
        .await
        .map_err(|s| herd::context::relay("currency", s))?
        .amounts;
        if converted.len() != priced.len() * 4 {
            return Err(Status::internal(
                "currency: answered a different number of amounts",
            ));
        }

        let lines = req
            .items
            .iter()
            .zip(priced)
            .zip(converted.chunks_exact(4))
            .map(|((item, p), c)| {
                let (unit, gross, discount, tax) = (
                    c[0].minor_units,
                    c[1].minor_units,
                    c[2].minor_units,
                    c[3].minor_units,
                );
                let net = gross - discount;
                let money = |minor_units| {
                    Some(Money {
                        currency_code: req.currency.clone(),
                        minor_units,
                    })
                };
                QuoteLine {
                    sku: item.sku.clone(),
                    quantity: item.quantity,
                    unit_price: money(unit),
                    gross: money(gross),
                    discount: money(discount),
                    net: money(net),
                    tax: money(tax),
                    total: money(net + tax),
                    promotion_id: p.promotion_id,
                }
            })
            .collect();
        Ok(Response::new(PriceItemsResponse { lines }))
    }
}
