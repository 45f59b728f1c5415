//! The arithmetic every instance agrees on: integer minor units, half-even rounding, and exact
//! decimal rates. No floating point.

use rust_decimal::{Decimal, RoundingStrategy};

use crate::sections::{PromotionRule, Promotions};

/// `num / den` rounded half to even. `den` must be positive.
pub fn round_half_even(num: i128, den: i128) -> i128 {
    debug_assert!(den > 0);
    let q = num.div_euclid(den);
    let r = num.rem_euclid(den);
    match (2 * r).cmp(&den) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// A line's amounts in the catalog currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineAmounts {
    /// Unit price × quantity.
    pub gross: i64,
    /// The promotion's discount.
    pub discount: i64,
    /// Gross − discount.
    pub net: i64,
}

/// gross, discount and net of a line; `None` when the amounts overflow.
pub fn line_amounts(price_minor: i64, quantity: i32, percent_off: u32) -> Option<LineAmounts> {
    let gross = i128::from(price_minor) * i128::from(quantity);
    let discount = round_half_even(gross * i128::from(percent_off), 100);
    Some(LineAmounts {
        gross: i64::try_from(gross).ok()?,
        discount: i64::try_from(discount).ok()?,
        net: i64::try_from(gross - discount).ok()?,
    })
}

/// Tax on `net` at `rate_bps` basis points, rounded half-even.
pub fn tax_of(net: i64, rate_bps: u32) -> Option<i64> {
    i64::try_from(round_half_even(
        i128::from(net) * i128::from(rate_bps),
        10_000,
    ))
    .ok()
}

/// `amount` (minor units of the base) at `rate`, rounded half-even to whole minor units.
pub fn convert(amount: i64, rate: Decimal) -> Option<i64> {
    let exact = Decimal::from(amount).checked_mul(rate)?;
    i64::try_from(
        exact
            .round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven)
            .mantissa(),
    )
    .ok()
}

/// The promotion that applies to a line: a matching SKU rule beats any category rule; among equals
/// the highest percent wins, then the smallest id.
pub fn best_promotion<'p>(
    promotions: &'p Promotions,
    sku: &str,
    category: &str,
    quantity: i32,
) -> Option<&'p PromotionRule> {
    let rank = |r: &PromotionRule| (r.sku.is_some(), r.percent_off);
    promotions
        .rules
        .iter()
        .filter(|r| quantity >= r.min_quantity)
        .filter(|r| r.sku.as_deref() == Some(sku) || r.category.as_deref() == Some(category))
        .fold(None, |best: Option<&PromotionRule>, r| match best {
            None => Some(r),
            Some(b) => match rank(r).cmp(&rank(b)) {
                std::cmp::Ordering::Greater => Some(r),
                std::cmp::Ordering::Less => Some(b),
                std::cmp::Ordering::Equal if r.id < b.id => Some(r),
                std::cmp::Ordering::Equal => Some(b),
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn half_even() {
        assert_eq!(round_half_even(25, 10), 2);
        assert_eq!(round_half_even(35, 10), 4);
        assert_eq!(round_half_even(26, 10), 3);
        assert_eq!(round_half_even(-25, 10), -2);
        assert_eq!(round_half_even(-35, 10), -4);
        assert_eq!(round_half_even(0, 7), 0);
    }

    #[test]
    fn line() {
        // 3 × 1999 = 5997; 15 % = 899.55 → 900.
        let l = line_amounts(1999, 3, 15).expect("fits");
        assert_eq!((l.gross, l.discount, l.net), (5997, 900, 5097));
        assert_eq!(tax_of(5097, 725), Some(370)); // 369.5325 → 370
        assert_eq!(tax_of(200, 25), Some(0)); // 0.5 → 0 (even)
        assert_eq!(tax_of(600, 25), Some(2)); // 1.5 → 2 (even)
    }

    #[test]
    fn conversion_rounds_half_even() {
        let rate = Decimal::from_str("0.5").expect("decimal");
        assert_eq!(convert(5, rate), Some(2)); // 2.5 → 2
        assert_eq!(convert(7, rate), Some(4)); // 3.5 → 4
        assert_eq!(
            convert(1999, Decimal::from_str("0.92").expect("decimal")),
            Some(1839)
        ); // 1839.08
        assert_eq!(convert(i64::MAX, Decimal::from(1000)), None);
    }

    #[test]
    fn promotion_precedence() {
        let p: Promotions = serde_json::from_str(
            r#"{"rules":[
                {"id":"cat20","category":"food","percent_off":20},
                {"id":"sku5","sku":"apple","percent_off":5},
                {"id":"sku10b","sku":"apple","percent_off":10},
                {"id":"sku10a","sku":"apple","percent_off":10},
                {"id":"bulk","sku":"apple","percent_off":50,"min_quantity":100}
            ]}"#,
        )
        .expect("json");
        assert_eq!(
            best_promotion(&p, "apple", "food", 1).map(|r| r.id.as_str()),
            Some("sku10a")
        );
        assert_eq!(
            best_promotion(&p, "apple", "food", 100).map(|r| r.id.as_str()),
            Some("bulk")
        );
        assert_eq!(
            best_promotion(&p, "pear", "food", 1).map(|r| r.id.as_str()),
            Some("cat20")
        );
        assert_eq!(best_promotion(&p, "pear", "tools", 1), None);
    }
}
