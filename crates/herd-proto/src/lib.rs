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
        use prost::Message;

        /// The path names a method of the contracts whose input and output are the types.
        fn check<Req, Res>(method: Method<Req, Res>) {
            let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
            let (service, name) = method.name().rsplit_once('/').unwrap();
            let (package, service) = service.rsplit_once('.').unwrap();
            let last = |t: &str| t.rsplit(['.', ':']).next().unwrap().to_string();
            let found = set
                .file
                .iter()
                .filter(|f| f.package() == package)
                .flat_map(|f| &f.service)
                .filter(|s| s.name() == service)
                .flat_map(|s| &s.method)
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("{method:?} is not in the contracts"));
            assert_eq!(last(found.input_type()), last(std::any::type_name::<Req>()));
            assert_eq!(
                last(found.output_type()),
                last(std::any::type_name::<Res>())
            );
            assert!(!found.client_streaming() && !found.server_streaming());
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
