//! An app's side of the data socket: HTTP/1.1 (or raw bytes) over a Unix stream.

#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Sends one request on a fresh connection and returns the response with its body unread.
pub async fn send(socket: &Path, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let stream = UnixStream::connect(socket)
        .await
        .expect("connect to the data socket");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.expect("send request")
}

/// A POST with a JSON body and the given headers.
pub fn post(path: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(path)
        .header("host", "keyward")
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// Sends and collects: (status, headers, body text).
pub async fn call(socket: &Path, req: Request<Full<Bytes>>) -> (u16, http::HeaderMap, String) {
    let resp = send(socket, req).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// [`call`] with a chat-style POST of `body` to `path`, authenticated with the client `token`.
pub async fn call_as(
    socket: &Path,
    token: &str,
    path: &str,
    body: &str,
) -> (u16, http::HeaderMap, String) {
    call(
        socket,
        post(path, &[("authorization", &bearer(token))], body),
    )
    .await
}

/// Writes raw request bytes and reads the whole answer (the request should say
/// `Connection: close`).
pub async fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The OpenAI chat body used across tests.
pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    })
    .to_string()
}

/// The `Authorization` value for a client token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The `keyward-error` code of an answer, or "" when it has none.
pub fn error_code(headers: &http::HeaderMap) -> String {
    headers
        .get("keyward-error")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}
