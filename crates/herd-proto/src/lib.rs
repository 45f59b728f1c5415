//! herd's protobuf contracts, generated for tonic from `proto/`, and the descriptor set that server
//! reflection serves.
//!
//! - [`pb`]: the generated messages, clients and servers, one module per protobuf package.
//! - [`FILE_DESCRIPTOR_SET`]: every herd file's descriptor, for reflection.
//! - [`WithContext`]: the request messages, by the context they carry.
//! - [`codec::HerdCodec`]: the prost codec every generated service uses; a request that does not
//!   decode is answered with `INVALID_ARGUMENT` instead of prost's `INTERNAL`.

pub mod codec;

/// The generated code, one module per protobuf package (`pb::herd::quote::v1`, ...).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/_includes.rs"));
}

/// The encoded `FileDescriptorSet` of every herd contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/herd_descriptor.bin"));

pub use pb::herd::context::v1 as context;
pub use pb::herd::currency::v1 as currency;
pub use pb::herd::pricing::v1 as pricing;
pub use pb::herd::quote::v1 as quote;
pub use pb::herd::tax::v1 as tax;
pub use pb::herd::types::v1 as types;

/// A request message that carries a [`context::RequestContext`] as its field 1.
pub trait WithContext {
    /// The context, if the caller sent one.
    fn context(&self) -> Option<&context::RequestContext>;
    /// The context, for filling in.
    fn context_mut(&mut self) -> &mut Option<context::RequestContext>;
}

macro_rules! with_context {
    ($($t:ty),* $(,)?) => {
        $(impl WithContext for $t {
            fn context(&self) -> Option<&context::RequestContext> {
                self.context.as_ref()
            }
            fn context_mut(&mut self) -> &mut Option<context::RequestContext> {
                &mut self.context
            }
        })*
    };
}

with_context!(
    quote::CreateQuoteRequest,
    quote::VerifyQuoteRequest,
    pricing::PriceItemsRequest,
    tax::ComputeTaxRequest,
    currency::ConvertRequest,
);
