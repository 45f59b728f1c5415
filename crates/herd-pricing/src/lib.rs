//! The pricing service: catalog prices and promotions per line, tax from the tax service and
//! conversion from the currency service, all at the pinned config revision.

use herd::error::relay;
use herd::{ConfigStore, Deadline, MeshChannel};
use herd_model::MeshConfig;
use herd_model::basket;
use herd_proto::currency::ConvertRequest;
use herd_proto::methods::{COMPUTE_TAX, CONVERT, PRICE_ITEMS};
use herd_proto::pricing::pricing_service_server::{PricingService, PricingServiceServer};
use herd_proto::pricing::{PriceItemsRequest, PriceItemsResponse};
use herd_proto::tax::ComputeTaxRequest;
use tonic::{Request, Response, Status};

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
        herd::handler::serve_at(
            PRICE_ITEMS,
            request,
            &self.config,
            |call, config| async move {
                self.price(call.deadline(), call.into_message(), &config.model)
                    .await
            },
        )
        .await
    }
}

impl Pricing {
    /// Prices each line, has tax compute the taxes and currency convert every amount, at the
    /// revision the request is pinned to.
    async fn price(
        &self,
        deadline: Deadline,
        req: PriceItemsRequest,
        config: &MeshConfig,
    ) -> Result<PriceItemsResponse, Status> {
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
            .map_err(|e| relay("tax", e))?
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
            .map_err(|e| relay("currency", e))?
            .amounts;
        let lines = basket::quote_lines(&req.items, priced, &converted, &req.currency)?;
        Ok(PriceItemsResponse { lines })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd::discovery::Resolver;
    use herd::instance::InstanceInfo;
    use herd_proto::context::RequestContext;
    use herd_proto::types::LineItem;
    use tonic::Code;

    /// Serves `services` on a loopback port; returns the address.
    async fn serve(service: &str, services: herd::Services) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(services.serve_standalone(service.to_string(), listener));
        address
    }

    fn endpoint(service: &str, address: &str) -> Resolver {
        Resolver::fixed([InstanceInfo {
            service: service.into(),
            instance_id: format!("{service}-1"),
            address: address.into(),
            pid: 0,
            version: "test".into(),
        }])
    }

    /// Pricing over real tax and currency services, all three on the demo configuration.
    async fn pricing() -> (Pricing, Vec<Resolver>) {
        let config = || herd_model::demo::fixed().expect("the demo configuration is valid");
        let tax = serve(
            "tax",
            herd::Services::new().with(herd_tax::Tax::new(config()).into_server()),
        )
        .await;
        let currency = serve(
            "currency",
            herd::Services::new().with(herd_currency::Currency::new(config()).into_server()),
        )
        .await;
        let (tax, currency) = (endpoint("tax", &tax), endpoint("currency", &currency));
        let pricing = Pricing::new(
            config(),
            MeshChannel::new("tax", tax.subscribe()),
            MeshChannel::new("currency", currency.subscribe()),
        );
        (pricing, vec![tax, currency])
    }

    fn request(items: &[(&str, i32)], currency: &str) -> Request<PriceItemsRequest> {
        Request::new(PriceItemsRequest {
            context: Some(RequestContext {
                tenant_id: "acme".into(),
                ..Default::default()
            }),
            items: items
                .iter()
                .map(|(sku, quantity)| LineItem {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
            currency: currency.into(),
            region: "US-CA".into(),
        })
    }

    #[tokio::test]
    async fn lines_are_priced_taxed_and_converted() {
        let (pricing, _endpoints) = pricing().await;
        let lines = pricing
            .price_items(request(&[("hammer", 3), ("apple", 4)], "USD"))
            .await
            .expect("valid")
            .into_inner()
            .lines;
        let money = |m: &Option<herd_proto::types::Money>| m.as_ref().map_or(-1, |m| m.minor_units);
        // 3 hammers at 19.99: the SKU rule's 15 % beats the tools category's 5 %;
        // 7.25 % tax on 50.97. Apples are food: no promotion, exempt from tax in US-CA.
        let hammer = &lines[0];
        assert_eq!(hammer.promotion_id, "hammer-3-for-15");
        assert_eq!(
            (
                money(&hammer.gross),
                money(&hammer.discount),
                money(&hammer.net)
            ),
            (5997, 900, 5097)
        );
        assert_eq!((money(&hammer.tax), money(&hammer.total)), (370, 5467));
        let apple = &lines[1];
        assert_eq!((money(&apple.total), money(&apple.tax)), (500, 0));
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_any_call() {
        let (pricing, _endpoints) = pricing().await;
        let status = pricing
            .price_items(request(&[("unicorn", 1)], "EUR"))
            .await
            .expect_err("no unicorns in the catalog");
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().starts_with("items[0].sku"), "{status:?}");
        let status = pricing
            .price_items(request(&[("hammer", 0)], "EUR"))
            .await
            .expect_err("a quantity of 0");
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_downstream_service_with_no_instance_is_unavailable_at_once() {
        let config = herd_model::demo::fixed().expect("the demo configuration is valid");
        let nobody = Resolver::fixed([]);
        let pricing = Pricing::new(
            config,
            MeshChannel::new("tax", nobody.subscribe()),
            MeshChannel::new("currency", nobody.subscribe()),
        );
        let status = pricing
            .price_items(request(&[("hammer", 1)], "EUR"))
            .await
            .expect_err("no tax instance");
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "tax: no instance registered")
        );
    }
}
