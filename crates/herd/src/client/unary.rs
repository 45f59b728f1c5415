//! The unary gRPC exchange herd's calls make: a request framed once, and a response read to its
//! end — one uncompressed message within a size limit, the status from the trailers or from a
//! trailers-only head (parsed here: tonic's `Status::from_header_map` panics on bad base64
//! details).

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::connection::Response;
use crate::error::CallError;

/// The largest response message accepted unless the channel says otherwise, as tonic's default.
pub const DEFAULT_MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// Bytes in front of every gRPC message: a compression flag and a 4-byte length.
pub(crate) const FRAME_HEADER: usize = 5;

/// Reads a unary call's response to its end: the message's bytes (without the frame header, at
/// most `limit` of them), or why the call failed.
pub(crate) async fn read_unary(response: Response, limit: usize) -> Result<Bytes, CallError> {
    let (head, mut body) = response.into_parts();
    if head.status != StatusCode::OK {
        return Err(CallError::HttpStatus(head.status));
    }
    // A "trailers-only" answer: the status is in the head, and nothing follows.
    if let Some(end) = grpc_status(&head.headers) {
        return Err(end.err().map_or_else(
            || CallError::Malformed("the answer has no message".into()),
            CallError::refused,
        ));
    }
    let mut collected = Collected::new(limit);
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        collected.push(chunk)?;
    }
    let trailers = body.trailers().await?;
    match trailers.as_ref().and_then(grpc_status) {
        Some(Ok(())) => unframe(collected.into_bytes()),
        Some(Err(status)) => Err(CallError::refused(status)),
        None => Err(CallError::NoStatus),
    }
}

/// The bytes of a response body as they arrive, up to a limit; copied only when they come in
/// more than one piece.
struct Collected {
    bytes: Pieces,
    /// The largest message accepted.
    limit: usize,
}

enum Pieces {
    Nothing,
    One(Bytes),
    Many(BytesMut),
}

impl Collected {
    fn new(limit: usize) -> Self {
        Self {
            bytes: Pieces::Nothing,
            limit,
        }
    }

    fn push(&mut self, chunk: Bytes) -> Result<(), CallError> {
        let len = match &self.bytes {
            Pieces::Nothing => 0,
            Pieces::One(b) => b.len(),
            Pieces::Many(b) => b.len(),
        };
        if len + chunk.len() > self.limit + FRAME_HEADER {
            return Err(CallError::TooLarge { limit: self.limit });
        }
        match &mut self.bytes {
            Pieces::Nothing => self.bytes = Pieces::One(chunk),
            Pieces::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(&chunk);
                self.bytes = Pieces::Many(joined);
            }
            Pieces::Many(joined) => joined.extend_from_slice(&chunk),
        }
        Ok(())
    }

    fn into_bytes(self) -> Bytes {
        match self.bytes {
            Pieces::Nothing => Bytes::new(),
            Pieces::One(b) => b,
            Pieces::Many(b) => b.freeze(),
        }
    }
}

/// The single message of a unary response, without its frame header.
fn unframe(frame: Bytes) -> Result<Bytes, CallError> {
    let Some(header) = frame.get(..FRAME_HEADER) else {
        return Err(CallError::Malformed("the answer has no message".into()));
    };
    if header[0] != 0 {
        return Err(CallError::Malformed(
            "the answer is compressed, though no compression was offered".into(),
        ));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let arrived = frame.len() - FRAME_HEADER;
    if arrived != len {
        return Err(CallError::Malformed(format!(
            "the answer's frame announces {len} bytes but {arrived} arrived"
        )));
    }
    Ok(frame.slice(FRAME_HEADER..))
}

/// A gRPC frame as it goes on the wire: the header (uncompressed, the length), then `message`
/// encoded.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut frame = Vec::with_capacity(FRAME_HEADER + len);
    frame.push(0);
    // Messages over 4 GiB cannot be framed; herd's are far from it, and servers refuse 4 MiB.
    frame.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    // Cannot fail: the buffer has room for the whole message.
    let _ = message.encode(&mut frame);
    Bytes::from(frame)
}

/// The head of a unary gRPC request to `path` carrying `metadata` (the deadline included).
pub(crate) fn unary_head(
    path: &http::uri::PathAndQuery,
    metadata: MetadataMap,
) -> http::request::Parts {
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = http::Method::POST;
    head.uri = http::Uri::from(path.clone());
    head.headers = metadata.into_headers();
    head.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    head.headers
        .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    head.headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("herd/", env!("CARGO_PKG_VERSION"))),
    );
    head
}

/// An answer's status header, its name made once (a name given as a string is parsed on every
/// use).
pub(crate) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// `Ok` for `grpc-status: 0`, the status it names otherwise; `None` without one.
fn grpc_status(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let code = headers.get(GRPC_STATUS)?;
    if code.as_bytes() == b"0" {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let details = headers
        .get("grpc-status-details-bin")
        .and_then(|d| BASE64.decode(d.as_bytes()).ok())
        .map(Bytes::from)
        .unwrap_or_default();
    let mut metadata = headers.clone();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        metadata.remove(name);
    }
    Some(Err(Status::with_details_and_metadata(
        Code::from_bytes(code.as_bytes()),
        message,
        details,
        MetadataMap::from_headers(metadata),
    )))
}

/// Base64 as gRPC writes binary metadata: standard alphabet, padding optional.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let message = herd_proto::tax::ComputeTaxRequest {
            region: "DE".into(),
            ..Default::default()
        };
        let framed = frame(&message);
        assert_eq!(
            framed.len(),
            FRAME_HEADER + prost::Message::encoded_len(&message)
        );
        let back = unframe(framed).unwrap();
        let decoded: herd_proto::tax::ComputeTaxRequest = prost::Message::decode(back).unwrap();
        assert_eq!(decoded, message);
    }

    #[test]
    fn bad_frames_are_internal_errors() {
        for bad in [&b""[..], b"\0\0\0", b"\x01\0\0\0\0", b"\0\0\0\0\x05abc"] {
            let status = unframe(Bytes::copy_from_slice(bad)).unwrap_err();
            assert_eq!(status.code(), Code::Internal, "{bad:?}: {status:?}");
        }
    }

    #[test]
    fn statuses_come_from_headers() {
        let mut headers = HeaderMap::new();
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", "0".parse().unwrap());
        assert!(matches!(grpc_status(&headers), Some(Ok(()))));
        headers.insert("grpc-status", "3".parse().unwrap());
        headers.insert("grpc-message", "items%5B0%5D.sku: unknown".parse().unwrap());
        headers.insert("grpc-status-details-bin", "not base64!".parse().unwrap());
        let status = grpc_status(&headers).unwrap().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "items[0].sku: unknown");
        assert!(status.details().is_empty());
    }

    #[test]
    fn responses_are_bounded() {
        let mut collected = Collected::new(DEFAULT_MAX_RESPONSE);
        collected
            .push(Bytes::from(vec![0; DEFAULT_MAX_RESPONSE]))
            .unwrap();
        collected.push(Bytes::from(vec![0; 3])).unwrap();
        let error = collected.push(Bytes::from(vec![0; 3])).unwrap_err();
        assert_eq!(error.code(), Code::ResourceExhausted);
        let mut small = Collected::new(10);
        let error = small.push(Bytes::from(vec![0; 16])).unwrap_err();
        assert_eq!(error.to_string(), "answer larger than 10 bytes");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// A response body, however it arrives: no panic, never more than the limit held, the
        /// same message or error whatever the pieces.
        #[test]
        fn any_response_body_however_split_gets_one_result(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            cuts in proptest::collection::vec(0usize..80, 0..6),
            limit in 0usize..48,
        ) {
            let collect = |pieces: Vec<Bytes>| {
                let mut collected = Collected::new(limit);
                for piece in pieces {
                    collected.push(piece).map_err(|e| e.to_string())?;
                    let held = match &collected.bytes {
                        Pieces::Nothing => 0,
                        Pieces::One(b) => b.len(),
                        Pieces::Many(b) => b.len(),
                    };
                    assert!(held <= limit + FRAME_HEADER);
                }
                unframe(collected.into_bytes()).map_err(|e| e.to_string())
            };
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([body.len()]) {
                pieces.push(Bytes::copy_from_slice(&body[at..cut]));
                at = cut;
            }
            proptest::prop_assert_eq!(collect(vec![Bytes::copy_from_slice(&body)]), collect(pieces));
        }

        /// Any status headers a peer sends: no panic (tonic's own parser panics on bad details).
        #[test]
        fn any_status_headers_are_read_without_panic(
            code in "[0-9]{0,3}",
            message in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            details in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut headers = HeaderMap::new();
            if let Ok(value) = http::HeaderValue::from_str(&code) {
                headers.insert("grpc-status", value);
            }
            if let Ok(value) = http::HeaderValue::from_bytes(&message) {
                headers.insert("grpc-message", value);
            }
            if let Ok(value) = http::HeaderValue::from_bytes(&details) {
                headers.insert("grpc-status-details-bin", value);
            }
            let _ = grpc_status(&headers);
        }
    }
}
