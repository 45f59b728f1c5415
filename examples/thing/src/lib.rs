//! The thing service: a fifth service on herd, written by following README's "Adding a service of
//! your own". It prices one unit of an item through the pricing service and adds a note from a
//! configuration section of its own (`/herd/config/thing`).
//!
//! - [`pb`], [`FILE_DESCRIPTOR_SET`], [`DESCRIBE`]: its contract, generated, described for
//!   reflection, and its method typed.
//! - [`ThingSection`], [`ThingConfig`]: its configuration.
//! - [`Thing`]: its handler.

use std::sync::Arc;

use herd::error::relay;
use herd::{ConfigError, ConfigModel, ConfigStore, MeshChannel, Section, SectionSpec, Sections};
use herd_proto::Method;
use herd_proto::methods::PRICE_ITEMS;
use herd_proto::pricing::PriceItemsRequest;
use herd_proto::types::LineItem;
use tonic::{Request, Response, Status};

/// The generated code of `yourteam.thing.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/yourteam.thing.v1.rs"));
}

use pb::thing_service_server::{ThingService, ThingServiceServer};
use pb::{DescribeRequest, DescribeResponse};

/// The contract's descriptor set, for reflection (`Services::with_descriptors`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/thing_descriptor.bin"));

herd_proto::with_context!(DescribeRequest);

/// `yourteam.thing.v1.ThingService/Describe`.
pub const DESCRIBE: Method<DescribeRequest, DescribeResponse> =
    Method::new("/yourteam.thing.v1.ThingService/Describe");

/// `/herd/config/thing`: the note every description carries.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingSection {
    /// A short note, at most 200 characters.
    pub note: String,
}

impl Section for ThingSection {
    const NAME: &'static str = "thing";
    const ABOUT: &'static str = "the note every description carries";

    fn validate(&self) -> Result<(), String> {
        if self.note.chars().count() > 200 {
            return Err("note: at most 200 characters".into());
        }
        Ok(())
    }

    fn example() -> String {
        r#"{"note":"priced by the mesh"}"#.into()
    }
}

/// The thing service's configuration: its one section (the runtime adds its own).
#[derive(Debug)]
pub struct ThingConfig {
    /// The note.
    pub thing: Arc<ThingSection>,
}

impl ConfigModel for ThingConfig {
    fn sections() -> Vec<SectionSpec> {
        vec![SectionSpec::defaulted::<ThingSection>()]
    }

    fn build(sections: &Sections) -> Result<Self, ConfigError> {
        Ok(Self {
            thing: sections.get()?,
        })
    }
}

/// The service's handler.
#[derive(Clone)]
pub struct Thing {
    config: ConfigStore<ThingConfig>,
    pricing: MeshChannel,
}

impl Thing {
    /// A handler reading configuration from `config` and calling pricing over the mesh.
    pub fn new(config: ConfigStore<ThingConfig>, pricing: MeshChannel) -> Self {
        Self { config, pricing }
    }

    /// The generated server around this handler.
    pub fn into_server(self) -> ThingServiceServer<Self> {
        ThingServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ThingService for Thing {
    async fn describe(
        &self,
        request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        herd::handler::serve_at(DESCRIBE, request, &self.config, |call, config| async move {
            // Pin the revision this call is evaluated at, so that pricing uses the same one.
            let mut context = call.context().clone();
            context.config_revision = config.revision;
            let req = call.message();
            let price = PriceItemsRequest {
                context: Some(context),
                items: vec![LineItem {
                    sku: req.sku.clone(),
                    quantity: 1,
                }],
                currency: req.currency.clone(),
                region: req.region.clone(),
            };
            let lines = herd::client::call(call.deadline(), &self.pricing, PRICE_ITEMS, &price)
                .await
                .map_err(|e| relay("pricing", e))?
                .lines;
            Ok(DescribeResponse {
                unit_total: lines.into_iter().next().and_then(|line| line.total),
                note: config.model.thing.note.clone(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_is_the_contract_s() {
        DESCRIBE
            .described_by(FILE_DESCRIPTOR_SET)
            .expect("Describe as the contract says");
    }

    #[tokio::test]
    async fn bad_input_and_a_missing_pricing_service_get_their_statuses() {
        let config = ConfigStore::fixed([("thing", r#"{"note":"hi"}"#)]).expect("valid");
        let nobody = herd::discovery::Resolver::fixed([]);
        let thing = Thing::new(config, MeshChannel::new("pricing", nobody.subscribe()));
        let mut request = DescribeRequest {
            context: None,
            sku: "widget".into(),
            currency: "USD".into(),
            region: "US-CA".into(),
        };
        let status = thing
            .describe(Request::new(request.clone()))
            .await
            .expect_err("no context");
        assert_eq!(status.message(), "context: required");
        request.context = Some(herd_proto::context::RequestContext {
            tenant_id: "acme".into(),
            ..Default::default()
        });
        let status = thing
            .describe(Request::new(request))
            .await
            .expect_err("no pricing instance");
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unavailable, "pricing: no instance registered")
        );
        let long = format!(r#"{{"note":"{}"}}"#, "x".repeat(201));
        let refused = ConfigStore::<ThingConfig>::fixed([("thing", long.as_str())]);
        assert!(refused.is_err());
    }
}
