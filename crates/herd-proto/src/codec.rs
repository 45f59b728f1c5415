//! The codec of every herd service: prost's, except that a request that cannot be decoded is the
//! caller's fault and says so.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// A prost codec whose decoder answers undecodable input with `INVALID_ARGUMENT` naming the
/// expected message type.
#[derive(Debug, Clone)]
pub struct HerdCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for HerdCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for HerdCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = HerdDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        HerdDecoder {
            inner: ProstDecoder::default(),
        }
    }
}

/// Decodes with prost and turns a decode failure into `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct HerdDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for HerdDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            let name = std::any::type_name::<U>()
                .rsplit("::")
                .next()
                .unwrap_or("message");
            Status::invalid_argument(format!(
                "request body is not a valid {name} message: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
