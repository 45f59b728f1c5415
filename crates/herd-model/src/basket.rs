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
