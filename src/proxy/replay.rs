//! The request body shared by every attempt of a call: read once from the app, size-checked,
//! scanned for a second `model` and fingerprinted once, and kept (as cheap `Bytes` clones)
//! while a failover may still send it to another key. Only the attempt that owns the body may
//! read it; an earlier attempt's body fails if its connection polls it again.
//!
//! A body stops being kept, and the call loses its failover, when the next attempt is the last,
//! when keeping it would pass `limits.max_buffered_bodies`, when reading it from the app failed,
//! or when it broke a rule the app must fix (too large, a second model). Whether a failover
//! happens at all is [`super::failover`]'s decision; this module only says whether the body can
//! still be sent again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::body::{BodyScanner, ambiguous, too_large};
use super::conn::Throttle;
use super::error::Reject;
use super::limits::BodyHold;
use super::upstream::BoxError;
use crate::audit::Fingerprinter;
use crate::lock;
use crate::scope::attrs::ScanState;

/// The call's request body, shared by its attempts; clones share it.
pub(super) struct Replay<B> {
    inner: Arc<Mutex<Inner<B>>>,
}

impl<B> Clone for Replay<B> {
    fn clone(&self) -> Self {
        Replay {
            inner: self.inner.clone(),
        }
    }
}

/// What the attempt that just ended left of the body, read at one instant.
pub(super) struct AfterAttempt {
    /// The whole body can still be sent to another key.
    pub replayable: bool,
    /// The body broke a rule the app must fix; the call is refused whatever upstream said.
    pub violation: Option<Reject>,
    /// Reading the body from the app failed before it ended.
    pub app_failed: bool,
}

struct Inner<B> {
    /// Chunks kept for a replay; while `retain` is off, only those not sent yet.
    chunks: VecDeque<Bytes>,
    /// The bytes of `chunks`, counted against `limits.max_buffered_bodies`.
    held: BodyHold,
    /// Index in `chunks` of the next chunk the owner sends.
    next: usize,
    /// Keep sent chunks, because another attempt may follow.
    retain: bool,
    /// The attempt allowed to read; bodies of superseded attempts fail if polled again.
    owner: u32,
    /// The part of the app's body not read yet.
    rest: Option<B>,
    /// Watches the rest of the body for a second top-level `model`.
    scanner: Option<BodyScanner>,
    /// Fingerprint of the body so far; taken when the body ends.
    fingerprinter: Option<Fingerprinter>,
    /// Body bytes read from the app.
    received: u64,
    /// `limits.max_request_body`.
    limit: u64,
    /// Fingerprint of the whole body, once it ended.
    fingerprint: Option<String>,
    /// Why the body was cut (too large, ambiguous model).
    violation: Option<Reject>,
    /// Reading the app's body failed, so it cannot be sent again.
    app_failed: bool,
}

impl<B> Replay<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    /// The body of a call: `prefix` (already read, counted in `held`) followed by `rest` (not
    /// read yet; `None` when the body has ended). `scanner` watches the rest for a second
    /// model; `limit` is `limits.max_request_body`; `retain` says whether another attempt may
    /// follow the first (more than one candidate key).
    pub fn new(
        (prefix, held): (Vec<Bytes>, BodyHold),
        rest: Option<B>,
        scanner: Option<BodyScanner>,
        mut fingerprinter: Fingerprinter,
        limit: u64,
        retain: bool,
    ) -> Replay<B> {
        let mut received = 0;
        for chunk in &prefix {
            fingerprinter.update(chunk);
            received += chunk.len() as u64;
        }
        let mut inner = Inner {
            chunks: prefix.into(),
            held,
            next: 0,
            retain,
            owner: 0,
            rest,
            scanner,
            fingerprinter: Some(fingerprinter),
            received,
            limit,
            fingerprint: None,
            violation: None,
            app_failed: false,
        };
        if inner.rest.is_none() {
            inner.finish();
        }
        Replay {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// The body attempt `number` sends upstream, announcing `declared` bytes when the app
    /// declared a length.
    pub fn attempt(&self, number: u32, declared: Option<u64>) -> AttemptBody<B> {
        AttemptBody {
            replay: self.clone(),
            attempt: number,
            declared,
        }
    }
}

impl<B> Replay<B> {
    /// Whether the body can still be sent again, whether it broke a rule, and whether the app
    /// failed to send it — taken together, as the attempt's connection may still be reading.
    pub fn after_attempt(&self) -> AfterAttempt {
        let mut inner = lock(&self.inner);
        AfterAttempt {
            replayable: inner.replayable(),
            violation: inner.violation.take(),
            app_failed: inner.app_failed,
        }
    }

    /// Hands the body to attempt `owner`, from its first byte. The last attempt need not keep
    /// what it sends.
    pub fn restart(&self, owner: u32, last: bool) {
        let mut inner = lock(&self.inner);
        debug_assert!(inner.retain, "a body that was not kept cannot be replayed");
        inner.owner = owner;
        inner.next = 0;
        inner.retain = !last;
    }

    /// No more failover for this call: free what was sent.
    pub fn stop_retaining(&self) {
        lock(&self.inner).stop_retaining();
    }

    /// Body bytes read from the app so far.
    pub fn received(&self) -> u64 {
        lock(&self.inner).received
    }

    /// The fingerprint of the whole body, once it has ended.
    pub fn fingerprint(&self) -> Option<String> {
        lock(&self.inner).fingerprint.clone()
    }
}

impl<B> Inner<B> {
    fn replayable(&self) -> bool {
        self.retain && !self.app_failed && self.violation.is_none()
    }

    fn stop_retaining(&mut self) {
        self.retain = false;
        let sent: u64 = self.chunks.drain(..self.next).map(|c| c.len() as u64).sum();
        self.held.shrink(sent);
        self.next = 0;
    }

    fn fail(&mut self, reject: Reject) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = reject.message.clone();
        self.violation = Some(reject);
        self.rest = None;
        Poll::Ready(Some(Err(message.into())))
    }

    fn finish(&mut self) {
        if let Some(fp) = self.fingerprinter.take() {
            self.fingerprint = Some(fp.finish());
        }
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks.len() && self.rest.is_none()
    }
}

impl<B> Inner<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.chunks.get(self.next).cloned() {
            if self.retain {
                self.next += 1;
            } else {
                self.chunks.pop_front();
                self.held.shrink(chunk.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = loop {
            match Pin::new(&mut *rest).poll_frame(cx) {
                // The app's trailers are dropped, like the prefix read drops them: a header
                // there would bypass the stripping of credentials and `keyward-*` headers, and
                // no provider API reads request trailers.
                Poll::Ready(Some(Ok(frame))) if !frame.is_data() => continue,
                other => break other,
            }
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.rest = None;
                if let Some(ScanState::Ambiguous) = self.scanner.as_mut().map(BodyScanner::finish) {
                    return self.fail(ambiguous());
                }
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.app_failed = true;
                self.rest = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => self.take(data),
                Err(_) => unreachable!("non-data frames are dropped above"),
            },
        }
    }

    /// Checks, fingerprints and (while a failover may follow) keeps a chunk fresh from the app.
    fn take(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.received + data.len() as u64 > self.limit {
            let limit = self.limit;
            return self.fail(too_large(limit));
        }
        if let Some(ScanState::Ambiguous) = self.scanner.as_mut().map(|s| s.feed(&data)) {
            return self.fail(ambiguous());
        }
        if let Some(fp) = self.fingerprinter.as_mut() {
            fp.update(&data);
        }
        self.received += data.len() as u64;
        // Past max_buffered_bodies the body is no longer kept: this request loses its
        // failover rather than another request its memory.
        if self.retain && !self.held.grow(data.len() as u64) {
            static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
            if let Some(suppressed) = THROTTLE.tick(Instant::now()) {
                tracing::warn!(
                    suppressed,
                    "request body not kept for a failover: limits.max_buffered_bodies reached"
                );
            }
            self.stop_retaining();
        }
        if self.retain {
            self.chunks.push_back(data.clone());
            self.next += 1;
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

/// One attempt's view of the shared request body.
pub(super) struct AttemptBody<B> {
    replay: Replay<B>,
    attempt: u32,
    declared: Option<u64>,
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut inner = lock(&self.replay.inner);
        if inner.owner != self.attempt {
            return Poll::Ready(Some(Err(
                "request abandoned: it failed over to another key".into(),
            )));
        }
        inner.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        let inner = lock(&self.replay.inner);
        inner.owner == self.attempt && inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::error::ErrorCode;
    use crate::proxy::limits::BodyBudget;
    use crate::seal::Secret;
    use http_body_util::BodyExt;

    /// The app's body in a test: frames handed out in order, then the end. Counts its polls,
    /// so a test can tell that a replay did not read the app again.
    struct AppFrames {
        frames: VecDeque<Result<Frame<Bytes>, BoxError>>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Body for AppFrames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.polls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Poll::Ready(self.frames.pop_front())
        }
    }

    fn app(chunks: &[&str]) -> AppFrames {
        AppFrames {
            frames: chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c.as_bytes()))))
                .collect(),
            polls: Default::default(),
        }
    }

    fn key() -> Secret {
        Secret::from_slice(b"a fingerprint key for the replay tests")
    }

    fn fingerprint_of(body: &str) -> String {
        let mut fp = Fingerprinter::new(&key());
        fp.update(body.as_bytes());
        fp.finish()
    }

    /// A call's body: `prefix` already read, `rest` still with the app.
    fn replay(
        budget: &Arc<BodyBudget>,
        prefix: &[&str],
        rest: Option<AppFrames>,
        limit: u64,
        retain: bool,
    ) -> Replay<AppFrames> {
        let mut held = budget.hold();
        let prefix: Vec<Bytes> = prefix
            .iter()
            .map(|c| Bytes::copy_from_slice(c.as_bytes()))
            .collect();
        for c in &prefix {
            assert!(held.grow(c.len() as u64));
        }
        Replay::new(
            (prefix, held),
            rest,
            None,
            Fingerprinter::new(&key()),
            limit,
            retain,
        )
    }

    async fn read_all(body: AttemptBody<AppFrames>) -> Result<String, BoxError> {
        let bytes = body.collect().await?.to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_whole_body_is_sent_again_to_the_next_key() {
        let budget = BodyBudget::new(1 << 20);
        let body = replay(&budget, &["{\"model\":", "\"m\"}"], None, 1 << 20, true);
        assert_eq!(
            body.fingerprint(),
            Some(fingerprint_of("{\"model\":\"m\"}")),
            "a body that ended before the first attempt is fingerprinted at once"
        );
        let first = body.attempt(0, Some(13));
        assert!(!first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(13));
        assert_eq!(read_all(first).await.unwrap(), "{\"model\":\"m\"}");
        assert!(body.after_attempt().replayable);
        body.restart(1, true);
        assert_eq!(
            read_all(body.attempt(1, None)).await.unwrap(),
            "{\"model\":\"m\"}"
        );
        // The last attempt kept nothing it sent.
        assert_eq!(budget.held(), 0);
        assert!(!body.after_attempt().replayable);
    }

    #[tokio::test]
    async fn a_streamed_body_is_read_from_the_app_once_and_replayed_from_memory() {
        let budget = BodyBudget::new(1 << 20);
        let rest = app(&["b", "cd"]);
        let polls = rest.polls.clone();
        let body = replay(&budget, &["a"], Some(rest), 1 << 20, true);
        assert_eq!(body.fingerprint(), None, "the body has not ended yet");
        assert_eq!(read_all(body.attempt(0, None)).await.unwrap(), "abcd");
        let polled = polls.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(body.received(), 4);
        assert_eq!(body.fingerprint(), Some(fingerprint_of("abcd")));
        assert_eq!(budget.held(), 4, "kept for the next attempt");
        body.restart(1, false);
        assert_eq!(read_all(body.attempt(1, None)).await.unwrap(), "abcd");
        assert_eq!(
            polls.load(std::sync::atomic::Ordering::Relaxed),
            polled,
            "the replay read the app's body again"
        );
        assert_eq!(body.received(), 4, "bytes counted twice");
        // No further failover: what was sent is freed at once.
        body.stop_retaining();
        assert_eq!(budget.held(), 0);
        assert!(!body.after_attempt().replayable);
    }

    #[tokio::test]
    async fn an_attempt_that_was_superseded_cannot_read_the_body() {
        let budget = BodyBudget::new(1 << 20);
        let body = replay(&budget, &["abc"], None, 1 << 20, true);
        let mut stale = body.attempt(0, None);
        body.restart(1, true);
        assert!(!stale.is_end_stream());
        let err = stale.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("failed over"), "{err}");
        assert_eq!(read_all(body.attempt(1, None)).await.unwrap(), "abc");
    }

    #[tokio::test]
    async fn a_body_past_max_request_body_is_cut_and_not_replayed() {
        let budget = BodyBudget::new(1 << 20);
        let body = replay(&budget, &["12345"], Some(app(&["678", "90"])), 9, true);
        let err = read_all(body.attempt(0, None)).await.unwrap_err();
        assert!(
            err.to_string().contains("max_request_body (9 bytes)"),
            "{err}"
        );
        let after = body.after_attempt();
        let violation = after.violation.expect("the cut is the app's to fix");
        assert_eq!(violation.code, ErrorCode::BodyTooLarge);
        assert!(!after.replayable);
        assert_eq!(
            body.received(),
            8,
            "the chunk over the limit is not counted"
        );
        assert_eq!(body.fingerprint(), None);
        assert!(
            body.after_attempt().violation.is_none(),
            "the violation is handed out once"
        );
    }

    #[tokio::test]
    async fn a_body_exactly_at_max_request_body_passes() {
        let budget = BodyBudget::new(1 << 20);
        let body = replay(&budget, &["12345"], Some(app(&["6789"])), 9, true);
        assert_eq!(read_all(body.attempt(0, None)).await.unwrap(), "123456789");
        assert!(body.after_attempt().replayable);
    }

    #[tokio::test]
    async fn past_max_buffered_bodies_the_body_is_still_sent_but_not_kept() {
        // The budget holds the prefix and one more byte: the next chunk does not fit.
        let budget = BodyBudget::new(3);
        let body = replay(&budget, &["ab"], Some(app(&["cd", "ef"])), 1 << 20, true);
        assert_eq!(read_all(body.attempt(0, None)).await.unwrap(), "abcdef");
        let after = body.after_attempt();
        assert!(!after.replayable, "a body not kept cannot fail over");
        assert!(after.violation.is_none() && !after.app_failed);
        assert_eq!(budget.held(), 0, "what was sent is given back");
        assert_eq!(body.fingerprint(), Some(fingerprint_of("abcdef")));
    }

    #[tokio::test]
    async fn a_single_candidate_keeps_nothing_it_sent() {
        let budget = BodyBudget::new(1 << 20);
        let body = replay(&budget, &["ab"], Some(app(&["cd"])), 1 << 20, false);
        assert!(!body.after_attempt().replayable);
        let mut attempt = body.attempt(0, None);
        let first = attempt.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"ab");
        assert_eq!(budget.held(), 0, "the prefix is freed as it is sent");
        let second = attempt.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&second[..], b"cd");
        assert_eq!(budget.held(), 0, "the rest is never kept");
        assert!(attempt.frame().await.is_none());
        assert!(attempt.is_end_stream());
    }

    #[tokio::test]
    async fn an_app_that_fails_mid_body_ends_the_failover() {
        let budget = BodyBudget::new(1 << 20);
        let mut rest = app(&["b"]);
        rest.frames
            .push_back(Err("connection reset by the app".into()));
        let body = replay(&budget, &["a"], Some(rest), 1 << 20, true);
        let err = read_all(body.attempt(0, None)).await.unwrap_err();
        assert!(err.to_string().contains("reset by the app"), "{err}");
        let after = body.after_attempt();
        assert!(after.app_failed);
        assert!(!after.replayable);
        assert!(after.violation.is_none(), "not a rule the app broke");
    }

    #[tokio::test]
    async fn the_apps_trailers_are_never_sent_upstream() {
        let budget = BodyBudget::new(1 << 20);
        let mut rest = app(&["b"]);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("authorization", "Bearer smuggled".parse().unwrap());
        rest.frames.push_back(Ok(Frame::trailers(trailers)));
        rest.frames
            .push_back(Ok(Frame::data(Bytes::from_static(b"c"))));
        let body = replay(&budget, &["a"], Some(rest), 1 << 20, true);
        let collected = body.attempt(0, None).collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(&collected.to_bytes()[..], b"abc");
    }

    #[tokio::test]
    async fn a_second_model_in_the_rest_of_the_body_is_refused() {
        let budget = BodyBudget::new(1 << 20);
        let mut scanner = BodyScanner::for_content_type(Some("application/json"));
        let prefix = "{\"model\":\"cheap\",";
        assert!(matches!(
            scanner.feed(prefix.as_bytes()),
            ScanState::Found(_)
        ));
        let mut held = budget.hold();
        assert!(held.grow(prefix.len() as u64));
        let body = Replay::new(
            (vec![Bytes::from_static(prefix.as_bytes())], held),
            Some(app(&["\"model\":\"dear\"}"])),
            Some(scanner),
            Fingerprinter::new(&key()),
            1 << 20,
            true,
        );
        assert!(read_all(body.attempt(0, None)).await.is_err());
        let after = body.after_attempt();
        assert_eq!(after.violation.unwrap().code, ErrorCode::BadRequest);
        assert!(!after.replayable);
    }
}
