//! Pricing a basket, the steps around the calls to tax and currency: each line in the catalog
//! currency, the amounts to convert, and the quote lines in the target currency.

use herd_proto::tax::TaxableLine;
use herd_proto::types::{LineItem, Money, QuoteLine};
use tonic::Status;

use crate::MeshConfig;
use crate::money::{best_promotion, line_amounts};

/// One line in the catalog currency, before tax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// Unit price.
    pub unit: i64,
    /// Unit price × quantity.
    pub gross: i64,
    /// The winning promotion's discount.
    pub discount: i64,
    /// The winning promotion's id, empty when none applies.
    pub promotion_id: String,
}

fn money(currency: &str, minor_units: i64) -> Money {
    Money {
        currency_code: currency.to_string(),
        minor_units,
    }
}

/// Prices every item in the catalog currency; returns the lines and what the tax service needs.
/// An unknown SKU is `NOT_FOUND` naming the item.
pub fn price_lines(
    items: &[LineItem],
    config: &MeshConfig,
) -> Result<(Vec<Priced>, Vec<TaxableLine>), Status> {
    let base = &config.catalog.currency;
    let mut priced = Vec::with_capacity(items.len());
    let mut taxable = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let entry = config.catalog.items.get(&item.sku).ok_or_else(|| {
            Status::not_found(format!(
                "items[{i}].sku: unknown SKU {}",
                herd::error::quoted(&item.sku)
            ))
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
            net: Some(money(base, amounts.net)),
        });
        priced.push(Priced {
            unit: entry.price_minor,
            gross: amounts.gross,
            discount: amounts.discount,
            promotion_id: promotion.map(|p| p.id.clone()).unwrap_or_default(),
        });
    }
    Ok((priced, taxable))
}

/// The amounts to convert, four per line in order: unit price, gross, discount, tax.
pub fn to_convert(priced: &[Priced], taxes: &[Money], base: &str) -> Result<Vec<Money>, Status> {
    if taxes.len() != priced.len() {
        return Err(Status::internal(
            "tax: answered a different number of lines",
        ));
    }
    Ok(priced
        .iter()
        .zip(taxes)
        .flat_map(|(p, t)| [p.unit, p.gross, p.discount, t.minor_units].map(|m| money(base, m)))
        .collect())
}

/// The quote lines from the converted amounts: in the target currency `net = gross − discount`
/// and `total = net + tax`.
pub fn quote_lines(
    items: &[LineItem],
    priced: Vec<Priced>,
    converted: &[Money],
    currency: &str,
) -> Result<Vec<QuoteLine>, Status> {
    if converted.len() != priced.len() * 4 {
        return Err(Status::internal(
            "currency: answered a different number of amounts",
        ));
    }
    Ok(items
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
            let m = |minor_units| Some(money(currency, minor_units));
            QuoteLine {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price: m(unit),
                gross: m(gross),
                discount: m(discount),
                net: m(net),
                tax: m(tax),
                total: m(net + tax),
                promotion_id: p.promotion_id,
            }
        })
        .collect())
}

/// What a quote is made for: who asked, which request, when it was accepted, at which revision.
#[derive(Debug, Clone)]
pub struct QuoteFor<'a> {
    /// The tenant.
    pub tenant_id: &'a str,
    /// The request id.
    pub request_id: &'a str,
    /// When the request was first accepted.
    pub accepted_at: prost_types::Timestamp,
    /// The configuration revision it was priced at.
    pub config_revision: i64,
}

fn sum(
    currency: &str,
    amounts: impl Iterator<Item = Option<i64>>,
) -> Result<Option<Money>, Status> {
    let mut total: i64 = 0;
    for a in amounts {
        let a = a.ok_or_else(|| Status::internal("pricing: a line is missing an amount"))?;
        total = total
            .checked_add(a)
            .ok_or_else(|| Status::invalid_argument("items: quote total too large"))?;
    }
    Ok(Some(money(currency, total)))
}

/// The quote of priced lines: totals are the sums of the lines; the id and expiry derive from the
/// request, so that a retry with the same context gives the same quote.
pub fn quote(
    request: &QuoteFor<'_>,
    lines: Vec<QuoteLine>,
    currency: &str,
    config: &MeshConfig,
) -> Result<herd_proto::quote::Quote, Status> {
    let minor = |m: &Option<Money>| m.as_ref().map(|m| m.minor_units);
    let accepted = request.accepted_at;
    Ok(herd_proto::quote::Quote {
        quote_id: crate::token::quote_id(request.tenant_id, request.request_id, &accepted),
        tenant_id: request.tenant_id.to_string(),
        subtotal: sum(currency, lines.iter().map(|l| minor(&l.gross)))?,
        discount: sum(currency, lines.iter().map(|l| minor(&l.discount)))?,
        tax: sum(currency, lines.iter().map(|l| minor(&l.tax)))?,
        total: sum(currency, lines.iter().map(|l| minor(&l.total)))?,
        lines,
        currency: currency.to_string(),
        config_revision: request.config_revision,
        expires_at: Some(prost_types::Timestamp {
            seconds: accepted
                .seconds
                .saturating_add(i64::from(config.quote.ttl_seconds)),
            nanos: accepted.nanos,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config() -> MeshConfig {
        let sections: BTreeMap<String, Vec<u8>> = crate::demo::sections()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect();
        MeshConfig::from_json(&sections).expect("demo config")
    }

    fn item(sku: &str, quantity: i32) -> LineItem {
        LineItem {
            sku: sku.into(),
            quantity,
        }
    }

    #[test]
    fn lines_take_the_best_promotion_and_name_unknown_skus() {
        let (priced, taxable) =
            price_lines(&[item("hammer", 3), item("apple", 2)], &config()).unwrap();
        // 3 × 19.99 = 59.97, the SKU rule's 15 % (8.9955 → 9.00) beats the category's 5 %.
        assert_eq!(
            priced[0],
            Priced {
                unit: 1999,
                gross: 5997,
                discount: 900,
                promotion_id: "hammer-3-for-15".into()
            }
        );
        assert_eq!(taxable[0].net.as_ref().map(|m| m.minor_units), Some(5097));
        assert_eq!(taxable[1].category, "food");
        let err = price_lines(&[item("hammer", 1), item("unicorn", 1)], &config()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.message().starts_with("items[1].sku"), "{err:?}");
    }

    #[test]
    fn quote_lines_are_recomputed_in_the_target_currency() {
        let (priced, _) = price_lines(&[item("hammer", 3)], &config()).unwrap();
        let taxes = [money("USD", 370)];
        let amounts = to_convert(&priced, &taxes, "USD").unwrap();
        assert_eq!(
            amounts.iter().map(|m| m.minor_units).collect::<Vec<_>>(),
            vec![1999, 5997, 900, 370]
        );
        let converted = [1839, 5517, 828, 340].map(|m| money("EUR", m));
        let lines = quote_lines(&[item("hammer", 3)], priced, &converted, "EUR").unwrap();
        assert_eq!(
            lines[0].net.as_ref().map(|m| m.minor_units),
            Some(5517 - 828)
        );
        assert_eq!(
            lines[0].total.as_ref().map(|m| m.minor_units),
            Some(5517 - 828 + 340)
        );
        assert!(to_convert(&[], &taxes, "USD").is_err());
    }
}
