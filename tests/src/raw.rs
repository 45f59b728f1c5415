//! Requests as a hostile or clumsy client sends them: any bytes, any headers, over one HTTP/2
//! connection, with the answer's status read from its head or trailers.

use bytes::Bytes;

/// What came back: the HTTP status, and the gRPC status code and message when there was one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAnswer {
    /// The HTTP status of the response head.
    pub http: u16,
    /// `grpc-status`, from the head (trailers-only) or the trailers.
    pub code: Option<i32>,
    /// `grpc-message`, percent-decoded.
    pub message: String,
}

impl RawAnswer {
    /// The gRPC code, as tonic names it.
    pub fn code(&self) -> tonic::Code {
        self.code
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32)
    }
}

/// A gRPC frame around `message`: no compression, its length, the bytes.
pub fn framed(message: &[u8]) -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

/// POSTs `body` (sent as it is, not framed) to `path` on `address` as a gRPC request with the
/// extra `headers`, on a connection of its own.
pub async fn post(
    address: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<RawAnswer> {
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await?;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut stream) = send.send_request(request.body(())?, false)?;
    // A server may answer (and close the stream) before the body is sent — a message refused
    // from its frame header: the answer is still there to read.
    let sent = stream.send_data(body, true);
    let response = match (response.await, sent) {
        (Ok(response), _) => response,
        (Err(e), Ok(())) => return Err(e.into()),
        (Err(e), Err(send)) => anyhow::bail!("{e} (sending the body: {send})"),
    };
    let http = response.status().as_u16();
    let (head, mut body) = response.into_parts();
    let read = |map: &http::HeaderMap| {
        map.get("grpc-status").map(|code| {
            let code = code
                .to_str()
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(-1);
            let message = map
                .get("grpc-message")
                .map(|m| {
                    percent_encoding::percent_decode(m.as_bytes())
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            (code, message)
        })
    };
    let status = match read(&head.headers) {
        Some(status) => Some(status),
        None => {
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            body.trailers().await?.as_ref().and_then(read)
        }
    };
    Ok(RawAnswer {
        http,
        code: status.as_ref().map(|(code, _)| *code),
        message: status.map(|(_, message)| message).unwrap_or_default(),
    })
}

/// Calls `path` with `message` (already encoded, framed here) and returns the status.
pub async fn call(address: &str, path: &str, message: &[u8]) -> anyhow::Result<RawAnswer> {
    post(address, path, &[], framed(message)).await
}
