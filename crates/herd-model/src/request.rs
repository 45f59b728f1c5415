//! Checks of incoming requests that every service shares, each naming the field at fault.

use herd_proto::types::LineItem;
use tonic::Status;

use crate::sections::MeshConfig;

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
    if config.rate(currency).is_none() {
        return Err(Status::invalid_argument(format!(
            "{field}: unsupported currency {currency:?}"
        )));
    }
    Ok(())
}

/// Checks that `region` is a configured tax region.
pub fn check_region(region: &str, config: &MeshConfig) -> Result<(), Status> {
    if region.is_empty() {
        return Err(Status::invalid_argument("region: required"));
    }
    if !config.tax.regions.contains_key(region) {
        return Err(Status::invalid_argument(format!(
            "region: unknown tax region {region:?}"
        )));
    }
    Ok(())
}
