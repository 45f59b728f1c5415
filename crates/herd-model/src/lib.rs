//! The reference mesh's shared model: its configuration sections and their rules, the money
//! arithmetic every service agrees on, request validation, and signed quote tokens.
//!
//! - [`auth`]: the `auth` section and the check of a caller's bearer JWT against it.
//! - [`sections`]: the typed sections under `/herd/config/` and [`MeshConfig`], validated once here
//!   for the services and `herdctl` alike.
//! - [`basket`]: pricing a basket around the calls to tax and currency.
//! - [`money`]: integer minor units, half-even rounding, promotions, tax and conversion.
//! - [`request`]: checks of incoming baskets that name the offending field.
//! - [`seal`]: the gateway's seal on the context fields it fills, so a retry may send them back.
//! - [`token`]: quote tokens signed with the active key; any instance verifies them.
//! - [`keys`]: the private signing keys, read from files (never from etcd) by the instances that
//!   sign.
//! - [`demo`]: the demo configuration `herdctl config seed` writes.

pub mod auth;
pub mod basket;
pub mod demo;
pub mod keys;
pub mod money;
pub mod request;
pub mod seal;
pub mod sections;
pub mod token;

pub use sections::MeshConfig;
