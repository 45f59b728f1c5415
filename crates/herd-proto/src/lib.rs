//! herd's protobuf contracts, generated for tonic from `proto/`, and the descriptor set that server
//! reflection serves.
//!
//! - [`pb`]: the generated messages, clients and servers, one module per protobuf package.
//! - [`FILE_DESCRIPTOR_SET`]: every herd file's descriptor, for reflection.
//! - [`WithContext`]: the request messages, by the context they carry.
//! - [`methods`]: every unary method as a typed [`Method`], for calls made by path.
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

pub use pb::herd::admin::v1 as admin;
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

/// Implements [`WithContext`] for request messages whose field `context` (field 1) is a
/// `herd.context.v1.RequestContext`: `herd_proto::with_context!(my::DescribeRequest);` in the
/// crate that generates them.
#[macro_export]
macro_rules! with_context {
    ($($t:ty),* $(,)?) => {
        $(impl $crate::WithContext for $t {
            fn context(&self) -> Option<&$crate::context::RequestContext> {
                self.context.as_ref()
            }
            fn context_mut(&mut self) -> &mut Option<$crate::context::RequestContext> {
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

/// A unary method of a herd contract: its path, and in its type the messages it takes and
/// returns, so that a call through [`methods`] cannot pair a path with the wrong messages.
pub struct Method<Req, Res> {
    path: &'static str,
    types: std::marker::PhantomData<fn(Req) -> Res>,
}

impl<Req, Res> Method<Req, Res> {
    /// The method at `path`, `/package.Service/Method`. Panics (at compile time, in a `const`)
    /// unless the path starts with `/` and holds only letters, digits, `_`, `.`, `-` and `/`.
    pub const fn new(path: &'static str) -> Self {
        let bytes = path.as_bytes();
        assert!(
            !bytes.is_empty() && bytes[0] == b'/',
            "a method path starts with /"
        );
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            assert!(
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'),
                "a method path holds only letters, digits, _, ., - and /"
            );
            i += 1;
        }
        Self {
            path,
            types: std::marker::PhantomData,
        }
    }

    /// The HTTP/2 path: `/package.Service/Method`.
    pub const fn path(&self) -> &'static str {
        self.path
    }

    /// `package.Service/Method`, as spans and logs name it.
    pub fn name(&self) -> &'static str {
        self.path.strip_prefix('/').unwrap_or(self.path)
    }
}

impl<Req, Res> Method<Req, Res> {
    /// Checks that the encoded `FileDescriptorSet` `set` holds this method as a unary method
    /// taking `Req` and returning `Res` (by message name): a test of every `Method` constant
    /// against the contracts it was written for.
    pub fn described_by(&self, set: &[u8]) -> Result<(), String> {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(set).map_err(|e| e.to_string())?;
        let (service, name) = self
            .name()
            .rsplit_once('/')
            .ok_or_else(|| format!("{self:?} names no method"))?;
        let (package, service) = service
            .rsplit_once('.')
            .ok_or_else(|| format!("{self:?} names no package"))?;
        let last = |t: &str| t.rsplit(['.', ':']).next().unwrap_or_default().to_string();
        let found = set
            .file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == service)
            .flat_map(|s| &s.method)
            .find(|m| m.name() == name)
            .ok_or_else(|| format!("{self:?} is not in the contracts"))?;
        let types = (last(found.input_type()), last(found.output_type()));
        let ours = (
            last(std::any::type_name::<Req>()),
            last(std::any::type_name::<Res>()),
        );
        if types != ours {
            return Err(format!(
                "{self:?} takes and returns {types:?}, not {ours:?}"
            ));
        }
        if found.client_streaming() || found.server_streaming() {
            return Err(format!("{self:?} streams"));
        }
        Ok(())
    }
}

impl<Req, Res> Clone for Method<Req, Res> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req, Res> Copy for Method<Req, Res> {}

impl<Req, Res> std::fmt::Debug for Method<Req, Res> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path)
    }
}

/// Every unary method of the reference mesh.
pub mod methods {
    use super::{Method, currency, pricing, quote, tax};

    /// `herd.quote.v1.QuoteService/CreateQuote`.
    pub const CREATE_QUOTE: Method<quote::CreateQuoteRequest, quote::CreateQuoteResponse> =
        Method::new("/herd.quote.v1.QuoteService/CreateQuote");
    /// `herd.quote.v1.QuoteService/VerifyQuote`.
    pub const VERIFY_QUOTE: Method<quote::VerifyQuoteRequest, quote::VerifyQuoteResponse> =
        Method::new("/herd.quote.v1.QuoteService/VerifyQuote");
    /// `herd.pricing.v1.PricingService/PriceItems`.
    pub const PRICE_ITEMS: Method<pricing::PriceItemsRequest, pricing::PriceItemsResponse> =
        Method::new("/herd.pricing.v1.PricingService/PriceItems");
    /// `herd.tax.v1.TaxService/ComputeTax`.
    pub const COMPUTE_TAX: Method<tax::ComputeTaxRequest, tax::ComputeTaxResponse> =
        Method::new("/herd.tax.v1.TaxService/ComputeTax");
    /// `herd.currency.v1.CurrencyService/Convert`.
    pub const CONVERT: Method<currency::ConvertRequest, currency::ConvertResponse> =
        Method::new("/herd.currency.v1.CurrencyService/Convert");

    #[cfg(test)]
    mod tests {
        use super::*;

        fn check<Req, Res>(method: Method<Req, Res>) {
            if let Err(e) = method.described_by(crate::FILE_DESCRIPTOR_SET) {
                panic!("{e}");
            }
        }

        #[test]
        fn every_method_matches_the_contracts() {
            check(CREATE_QUOTE);
            check(VERIFY_QUOTE);
            check(PRICE_ITEMS);
            check(COMPUTE_TAX);
            check(CONVERT);
        }
    }
}
