//! The app's request body before a key is chosen: reading it until its `model` is known (the
//! top-level `"model"` of a JSON body, the `model` field of a form), or whole for a target that
//! signs the body's hash, within `limits.max_request_body`, `limits.max_model_scan` and
//! `limits.max_buffered_bodies`.
//!
//! What is read here is held, counted against the body budget, and handed to
//! [`super::replay`], which sends it on. This module does no I/O besides reading the body.

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body_util::BodyExt;
use hyper::body::Body;

use super::error::{ErrorCode, Reject};
use super::limits::BodyHold;
use super::upstream::BoxError;
use crate::scope::attrs::{ModelScanner, ScanState};
use crate::scope::multipart::{MultipartScanner, form_data_boundary};

/// Reads the rest of the body into `prefix` (counted in `held`, bounded by `max_request_body`
/// and `max_buffered_bodies`), and returns the hex SHA-256 of all of it.
pub(super) async fn read_whole<B>(
    body: &mut B,
    prefix: &mut Vec<Bytes>,
    held: &mut BodyHold,
    scan: Scan,
) -> Result<String, Reject>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let mut received: u64 = prefix.iter().map(|c| c.len() as u64).sum();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Reject::new(
                ErrorCode::BadRequest,
                format!("reading the request body failed: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if received > scan.limit {
            return Err(too_large(scan.limit));
        }
        if !held.grow(data.len() as u64) {
            return Err(Reject::new(
                ErrorCode::Overloaded,
                format!(
                    "request bodies held while keyward signs them have reached \
                     limits.max_buffered_bodies ({} bytes); retry shortly",
                    scan.budget
                ),
            ));
        }
        prefix.push(data);
    }
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for chunk in prefix.iter() {
        digest.update(chunk);
    }
    Ok(crate::hex::encode(digest.finish().as_ref()))
}

/// The bounds on reading a body for its model.
pub(super) struct Scan {
    /// `limits.max_request_body`.
    pub limit: u64,
    /// `limits.max_model_scan`.
    pub window: u64,
    /// `limits.max_buffered_bodies`.
    pub budget: u64,
}

/// Reads body frames until the model is known or the body ends, holding what was read in
/// `prefix` (counted in `held`). Returns the model and whether the body has ended. Refuses a
/// body whose model is not within `max_model_scan` bytes (400), and one that would take the
/// bodies held by all requests past `max_buffered_bodies` (503).
pub(super) async fn read_model<B>(
    body: &mut B,
    scanner: &mut BodyScanner,
    prefix: &mut Vec<Bytes>,
    held: &mut BodyHold,
    scan: Scan,
) -> Result<(Option<String>, bool), Reject>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let Scan {
        limit,
        window,
        budget,
    } = scan;
    let mut received = 0u64;
    loop {
        let Some(frame) = body.frame().await else {
            return match scanner.finish() {
                ScanState::Found(m) => Ok((Some(m), true)),
                ScanState::Ambiguous => Err(ambiguous()),
                _ => Ok((None, true)),
            };
        };
        let frame = frame.map_err(|e| {
            Reject::new(
                ErrorCode::BadRequest,
                format!("reading the request body failed: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if received > limit {
            return Err(too_large(limit));
        }
        if !held.grow(data.len() as u64) {
            return Err(Reject::new(
                ErrorCode::Overloaded,
                format!(
                    "request bodies held while keyward reads their model have reached \
                     limits.max_buffered_bodies ({budget} bytes); retry shortly"
                ),
            ));
        }
        let state = scanner.feed(&data);
        prefix.push(data);
        match state {
            ScanState::NeedMore if received >= window => {
                let how = match scanner {
                    BodyScanner::Json(_) => {
                        "the JSON body does not name its top-level \"model\" within its first \
                         {window} bytes (limits.max_model_scan); put \"model\" before large \
                         fields such as \"messages\""
                    }
                    BodyScanner::Form(_) => {
                        "the form does not name its `model` field within its first {window} \
                         bytes (limits.max_model_scan); send the model field before the file"
                    }
                };
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    format!(
                        "{}, or ask the operator to raise the limit",
                        how.replace("{window}", &window.to_string())
                    ),
                ));
            }
            ScanState::NeedMore => {}
            ScanState::Found(m) => return Ok((Some(m), body.is_end_stream())),
            ScanState::Absent => return Ok((None, body.is_end_stream())),
            ScanState::Ambiguous => return Err(ambiguous()),
        }
    }
}

/// 400: the body names its model twice, or is malformed after naming it.
pub(super) fn ambiguous() -> Reject {
    Reject::new(
        ErrorCode::BadRequest,
        "the body names its model more than once (a second top-level \"model\" in JSON, a \
         second `model` field in a form) or is malformed after it; send one model",
    )
}

/// Reads the model a request body names: the top-level `"model"` of a JSON body, or the
/// `model` field of a `multipart/form-data` body (uploads such as audio transcriptions and
/// image edits).
pub(super) enum BodyScanner {
    /// A JSON body: its top-level `"model"`.
    Json(ModelScanner),
    /// A `multipart/form-data` body: its `model` field.
    Form(MultipartScanner),
}

impl BodyScanner {
    /// The scanner for a body of this `Content-Type`.
    pub fn for_content_type(content_type: Option<&str>) -> BodyScanner {
        match content_type.and_then(form_data_boundary) {
            Some(boundary) => BodyScanner::Form(MultipartScanner::new(&boundary)),
            None => BodyScanner::Json(ModelScanner::new()),
        }
    }

    /// Feeds the next chunk of the body; says whether the model is known yet.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanState {
        match self {
            BodyScanner::Json(s) => s.feed(chunk),
            BodyScanner::Form(s) => s.feed(chunk),
        }
    }

    /// The body ended: the model it named, if any.
    pub fn finish(&mut self) -> ScanState {
        match self {
            BodyScanner::Json(s) => s.finish(),
            BodyScanner::Form(s) => s.finish(),
        }
    }
}

/// 413: the body passed `limits.max_request_body`.
pub(super) fn too_large(limit: u64) -> Reject {
    Reject::new(
        ErrorCode::BodyTooLarge,
        format!("request body is larger than limits.max_request_body ({limit} bytes)"),
    )
}

/// The request's `Content-Length`, when it has a valid one.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::limits::BodyBudget;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// The app's body in a test: its chunks, then the end.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(hyper::body::Frame::data(c))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    fn scan(limit: u64, window: u64, budget: u64) -> Scan {
        Scan {
            limit,
            window,
            budget,
        }
    }

    #[tokio::test]
    async fn reading_stops_once_the_model_is_known() {
        let budget = BodyBudget::new(1 << 20);
        let mut held = budget.hold();
        let mut body = chunks(&["{\"model\":\"gpt-4o\",", "\"messages\":[]", "}"]);
        let mut scanner = BodyScanner::for_content_type(Some("application/json"));
        let mut prefix = Vec::new();
        let (model, ended) = read_model(
            &mut body,
            &mut scanner,
            &mut prefix,
            &mut held,
            scan(1 << 20, 1024, budget.limit()),
        )
        .await
        .unwrap();
        assert_eq!(model.as_deref(), Some("gpt-4o"));
        assert!(!ended, "the rest of the body is still with the app");
        assert_eq!(prefix.len(), 1);
        assert_eq!(held.bytes(), 18);
        assert_eq!(body.0.len(), 2, "read past the model");
    }

    #[tokio::test]
    async fn a_model_past_max_model_scan_is_refused() {
        let budget = BodyBudget::new(1 << 20);
        let mut held = budget.hold();
        let mut body = chunks(&["{\"messages\":[\"aaaaaaaa\"],", "\"model\":\"m\"}"]);
        let mut scanner = BodyScanner::for_content_type(None);
        let err = read_model(
            &mut body,
            &mut scanner,
            &mut Vec::new(),
            &mut held,
            scan(1 << 20, 16, budget.limit()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(
            err.message
                .contains("first 16 bytes (limits.max_model_scan)"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn a_body_past_max_request_body_or_the_shared_budget_is_refused() {
        let budget = BodyBudget::new(1 << 20);
        let mut body = chunks(&["{\"messages\":", "[1,2,3,4,5,6]"]);
        let err = read_model(
            &mut body,
            &mut BodyScanner::for_content_type(None),
            &mut Vec::new(),
            &mut budget.hold(),
            scan(20, 1024, budget.limit()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BodyTooLarge);

        let small = BodyBudget::new(10);
        let mut held = small.hold();
        let err = read_model(
            &mut chunks(&["{\"messages\":", "[1]"]),
            &mut BodyScanner::for_content_type(None),
            &mut Vec::new(),
            &mut held,
            scan(1 << 20, 1024, small.limit()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert!(err.message.contains("max_buffered_bodies (10 bytes)"));
        assert_eq!(small.held(), 0, "nothing is held past the budget");
    }

    #[tokio::test]
    async fn a_whole_body_is_hashed_with_its_prefix() {
        let budget = BodyBudget::new(1 << 20);
        let mut held = budget.hold();
        let mut prefix = vec![Bytes::from_static(b"{\"a\":")];
        assert!(held.grow(5));
        let hash = read_whole(
            &mut chunks(&["1", "}"]),
            &mut prefix,
            &mut held,
            scan(1 << 20, 1 << 20, budget.limit()),
        )
        .await
        .unwrap();
        let want = ring::digest::digest(&ring::digest::SHA256, b"{\"a\":1}");
        assert_eq!(hash, crate::hex::encode(want.as_ref()));
        assert_eq!(held.bytes(), 7);
        let err = read_whole(
            &mut chunks(&["0123456789"]),
            &mut Vec::new(),
            &mut budget.hold(),
            scan(9, 9, budget.limit()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BodyTooLarge);
    }
}
