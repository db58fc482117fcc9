//! The CLI's side of the admin API: one HTTP/1.1 exchange over an already connected (and
//! already vetted) Unix socket. Blocking, for the CLI's plain `fn main`.

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use zeroize::Zeroizing;

/// An answer: the HTTP status and the body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body (JSON, or Prometheus text for `/v1/metrics`).
    pub body: Bytes,
}

/// Why no answer was read: the connection failed or closed first (the text says how).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoAnswer(pub String);

/// Sends `method path` with `body` (JSON; empty for none) on `stream` and reads the answer.
/// The caller checks who serves the socket before handing it over: this sends at once.
/// The body buffer is wiped when sent (it may hold a provider key).
pub fn exchange(
    stream: std::os::unix::net::UnixStream,
    method: http::Method,
    path: &str,
    body: Zeroizing<Vec<u8>>,
) -> Result<Answer, NoAnswer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NoAnswer(format!("cannot start the client runtime: {e}")))?;
    runtime.block_on(async move {
        let fail = |e: &dyn std::fmt::Display| NoAnswer(e.to_string());
        stream.set_nonblocking(true).map_err(|e| fail(&e))?;
        let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| fail(&e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(&e))?;
        let driver = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "keyward");
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(&body)))
            .map_err(|e| fail(&e))?;
        drop(body);
        let response = sender.send_request(request).await.map_err(|e| {
            NoAnswer(match e.is_incomplete_message() || e.is_closed() {
                true => "the daemon closed the connection without answering".into(),
                false => e.to_string(),
            })
        })?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(&e))?
            .to_bytes();
        driver.abort();
        Ok(Answer { status, body })
    })
}
