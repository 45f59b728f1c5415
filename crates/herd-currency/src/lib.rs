//! The currency service: converts base-currency amounts with the configured exact rates, rounding
//! half-even to minor units, at the pinned config revision.

use herd::ConfigStore;
use herd_model::MeshConfig;
use herd_model::money::convert;
use herd_proto::currency::currency_service_server::{CurrencyService, CurrencyServiceServer};
use herd_proto::currency::{ConvertRequest, ConvertResponse};
use herd_proto::methods::CONVERT;
use herd_proto::types::Money;
use tonic::{Request, Response, Status};

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
        herd::handler::serve_at(CONVERT, request, &self.config, |call, config| async move {
            convert_amounts(call.message(), &config.model)
        })
        .await
    }
}

/// Every amount of `req` (in the base currency) in its target currency, at `config`'s exact rate.
fn convert_amounts(req: &ConvertRequest, config: &MeshConfig) -> Result<ConvertResponse, Status> {
    herd_model::request::check_currency("target_currency", &req.target_currency, config)?;
    herd_model::request::check_count(
        "amounts",
        req.amounts.len(),
        config.limits.max_items as usize * herd_model::request::AMOUNTS_PER_LINE,
    )?;
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
                    "amounts[{i}].currency_code: must be the base currency {}, got {}",
                    config.fx.base,
                    herd::error::quoted(&m.currency_code)
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
    Ok(ConvertResponse {
        amounts,
        rate: rate.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::context::RequestContext;
    use tonic::Code;

    fn currency() -> Currency {
        Currency::new(herd_model::demo::fixed().expect("the demo configuration is valid"))
    }

    fn request(target: &str, amounts: &[(&str, i64)]) -> Request<ConvertRequest> {
        Request::new(ConvertRequest {
            context: Some(RequestContext {
                tenant_id: "acme".into(),
                ..Default::default()
            }),
            target_currency: target.into(),
            amounts: amounts
                .iter()
                .map(|(code, minor_units)| Money {
                    currency_code: (*code).into(),
                    minor_units: *minor_units,
                })
                .collect(),
        })
    }

    #[tokio::test]
    async fn converts_at_the_exact_rate_rounding_half_even() {
        // CHF at 0.885: 1999 → 1769.115 → 1769; 1000 → 885; 2 → 1.77 → 2.
        let answer = currency()
            .convert(request("CHF", &[("USD", 1999), ("USD", 1000), ("USD", 2)]))
            .await
            .expect("valid")
            .into_inner();
        let converted: Vec<(String, i64)> = answer
            .amounts
            .into_iter()
            .map(|m| (m.currency_code, m.minor_units))
            .collect();
        assert_eq!(
            converted,
            [("CHF".into(), 1769), ("CHF".into(), 885), ("CHF".into(), 2)]
        );
        assert_eq!(answer.rate, "0.885");
        let same = currency()
            .convert(request("USD", &[("USD", 1999)]))
            .await
            .expect("the base converts at 1")
            .into_inner();
        assert_eq!(same.amounts[0].minor_units, 1999);
    }

    #[tokio::test]
    async fn bad_input_is_refused_naming_the_field() {
        let currency = currency();
        for (req, field) in [
            (request("JPY", &[]), "target_currency"),
            (request("EUR", &[("EUR", 5)]), "amounts[0].currency_code"),
            (request("", &[]), "target_currency"),
            (
                request("eur", &[]),
                "target_currency: an ISO 4217 code is 3 capital letters",
            ),
            (
                request("EUR", &[("USD", 1); 401]),
                "amounts: 401 exceed the limit of 400",
            ),
        ] {
            let status = currency.convert(req).await.expect_err(field);
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(field), "{status:?}");
        }
    }
}
