//! Checks of incoming requests that every service shares, each naming the field at fault.

use herd::error::quoted;
use herd_proto::types::LineItem;
use tonic::Status;

use crate::sections::MeshConfig;

/// The most bytes of a SKU (`LineItem.sku`, `TaxableLine.sku`) and of a category.
pub const MAX_SKU_BYTES: usize = 64;
/// The most bytes of a tax region code.
pub const MAX_REGION_BYTES: usize = 32;
/// Amounts the currency service converts per line priced: unit price, gross, discount, tax.
pub const AMOUNTS_PER_LINE: usize = 4;

/// A text field of at most `max` bytes with no control characters.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {max} bytes, got {}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field}: must not hold control characters"
        )));
    }
    Ok(())
}

/// Checks that a request carries at most `max` entries of `field` (`count` of them).
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), Status> {
    if count > max {
        return Err(Status::invalid_argument(format!(
            "{field}: {count} exceed the limit of {max}"
        )));
    }
    Ok(())
}

/// Checks a basket against the configured limits: at least one line, not too many, every SKU
/// present and every quantity in range.
pub fn check_items(items: &[LineItem], config: &MeshConfig) -> Result<(), Status> {
    let limits = &config.limits;
    if items.is_empty() {
        return Err(Status::invalid_argument(
            "items: at least one item is required",
        ));
    }
    if items.len() > limits.max_items as usize {
        return Err(Status::invalid_argument(format!(
            "items: {} items exceed the limit of {}",
            items.len(),
            limits.max_items
        )));
    }
    for (i, item) in items.iter().enumerate() {
        if item.sku.trim().is_empty() {
            return Err(Status::invalid_argument(format!(
                "items[{i}].sku: required"
            )));
        }
        check_text(&format!("items[{i}].sku"), &item.sku, MAX_SKU_BYTES)?;
        if item.quantity < 1 {
            return Err(Status::invalid_argument(format!(
                "items[{i}].quantity: must be at least 1, got {}",
                item.quantity
            )));
        }
        if item.quantity > limits.max_quantity {
            return Err(Status::invalid_argument(format!(
                "items[{i}].quantity: {} exceeds the limit of {}",
                item.quantity, limits.max_quantity
            )));
        }
    }
    Ok(())
}

/// Checks that `currency` (named `field` in the caller's request) can be quoted.
pub fn check_currency(field: &str, currency: &str, config: &MeshConfig) -> Result<(), Status> {
    if currency.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Status::invalid_argument(format!(
            "{field}: an ISO 4217 code is 3 capital letters, got {}",
            quoted(currency)
        )));
    }
    if config.rate(currency).is_none() {
        return Err(Status::invalid_argument(format!(
            "{field}: unsupported currency {}",
            quoted(currency)
        )));
    }
    Ok(())
}

/// Checks that `region` is a configured tax region.
pub fn check_region(region: &str, config: &MeshConfig) -> Result<(), Status> {
    if region.is_empty() {
        return Err(Status::invalid_argument("region: required"));
    }
    check_text("region", region, MAX_REGION_BYTES)?;
    if !config.tax.regions.contains_key(region) {
        return Err(Status::invalid_argument(format!(
            "region: unknown tax region {}",
            quoted(region)
        )));
    }
    Ok(())
}
