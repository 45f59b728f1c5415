//! The demo configuration `herdctl config seed` writes where nothing is configured yet: a small
//! catalog, a promotion by SKU and one by category, tax regions with a food exemption, fx rates,
//! quote and limit settings, and one signing key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The demo sections as `(name, JSON)`, with the signing key made from `secret`.
pub fn sections(secret: &[u8; 32]) -> Vec<(&'static str, String)> {
    vec![
        (
            "catalog",
            r#"{"currency":"USD","items":{
  "apple":{"name":"Apple","price_minor":125,"category":"food"},
  "bread":{"name":"Sourdough bread","price_minor":499,"category":"food"},
  "hammer":{"name":"Claw hammer","price_minor":1999,"category":"tools"},
  "drill":{"name":"Cordless drill","price_minor":8999,"category":"tools"},
  "lamp":{"name":"Desk lamp","price_minor":3450,"category":"home"}
}}"#
            .to_string(),
        ),
        (
            "promotions",
            r#"{"rules":[
  {"id":"hammer-3-for-15","sku":"hammer","percent_off":15,"min_quantity":3},
  {"id":"tools-5","category":"tools","percent_off":5,"min_quantity":1}
]}"#
            .to_string(),
        ),
        (
            "tax",
            r#"{"regions":{
  "US-CA":{"rate_bps":725,"exempt_categories":["food"]},
  "US-NY":{"rate_bps":400,"exempt_categories":[]},
  "DE":{"rate_bps":1900,"exempt_categories":[]}
}}"#
            .to_string(),
        ),
        (
            "fx",
            r#"{"base":"USD","rates":{"EUR":"0.92","GBP":"0.79","CHF":"0.885"}}"#.to_string(),
        ),
        ("quote", r#"{"ttl_seconds":300}"#.to_string()),
        (
            "limits",
            r#"{"max_items":100,"max_quantity":10000}"#.to_string(),
        ),
        (
            "keys",
            format!(
                r#"{{"keys":[{{"id":"k1","secret":"{}","active":true}}]}}"#,
                BASE64.encode(secret)
            ),
        ),
    ]
}
