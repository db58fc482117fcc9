//! Failover: which answers and failures move a call to its next candidate key, and the loop
//! that tries the candidates in order.
//!
//! `scope` lists the keys that may serve and `pool` moves those cooling down or quarantined to
//! the back. An answer moves the call on when it condemns the key for now — 429 with the key
//! cooling down, 401 or 403 with the key quarantined — or is a 5xx; a failure moves it on when
//! nothing reached the upstream application or the exchange broke before response headers
//! (connect, TLS, a key that cannot be opened or used, no access token). A timeout, an encoded
//! answer, or a request the app must fix is never sent again. The decision is made on the
//! response head, before a byte of the response reaches the app, and only while the request
//! body can still be sent again ([`super::replay`]). The audit trail gets one
//! `request.resolved` row for the first key, then one `request.failover` row per move (naming
//! the key that failed, the key taken next and why), committed before the next key is unsealed
//! — fail closed, like the resolution; when that row cannot be written, the app gets what the
//! current key got. When every key fails, the app gets the last attempt's result: the
//! upstream's answer (scrubbed, with `keyward-credential` naming the last key), or keyward's
//! 502/504 error when the last attempt got no answer.
//!
//! This module decides; the I/O of an attempt (unseal, inject, send) and of its audit rows is
//! the caller's, through [`Attempts`].

use std::time::SystemTime;

use http::HeaderMap;

use super::error::{ErrorCode, Reject};
use super::replay::Replay;
use super::upstream::UpstreamError;
use crate::pool::{Change, Outcome, parse_retry_after, unix_secs};
use crate::units::format_time;

/// What one attempt with one key produced.
pub(super) enum Step<A> {
    /// The upstream answered (any status).
    Answer(A),
    /// No answer.
    Failed {
        /// What the app gets if there is no failover.
        reject: Reject,
        /// Another key might do better (see [`retryable`]).
        retryable: bool,
    },
}

/// The I/O of a call's attempts, one per candidate key, in order.
pub(super) trait Attempts {
    /// An upstream answer.
    type Answer;

    /// Sends the request with candidate `index`, reading the body from attempt `index` of the
    /// call's [`Replay`].
    async fn attempt(&mut self, index: usize) -> Step<Self::Answer>;

    /// Reports what `answer` means for candidate `index`'s key to the pool (and audits a
    /// quarantine); returns the answer's status and the pool's change.
    async fn assess(&mut self, index: usize, answer: &Self::Answer) -> (u16, Change);

    /// Makes the move from candidate `from` to `to` durable in the audit trail, or says it
    /// could not (then no other key is used).
    async fn record_failover(
        &mut self,
        from: usize,
        to: usize,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), ()>;
}

/// Tries `candidates` keys in order through `attempts`, sending `body` again on each move.
/// Returns the index of the candidate whose answer the app gets, and that answer; or why the
/// app gets a keyward error instead.
pub(super) async fn run<T, B>(
    attempts: &mut T,
    candidates: usize,
    body: &Replay<B>,
) -> Result<(usize, T::Answer), Reject>
where
    T: Attempts,
{
    let mut index = 0;
    loop {
        let step = attempts.attempt(index).await;
        let after = body.after_attempt();
        // A body the app must fix is refused whatever the upstream said about it.
        if let Some(reject) = after.violation {
            return Err(reject);
        }
        if after.app_failed && matches!(step, Step::Failed { .. }) {
            return Err(Reject::new(
                ErrorCode::BadRequest,
                "reading the request body from the app failed before it ended; send the whole body",
            ));
        }
        let can_move = index + 1 < candidates && after.replayable;
        let (reason, status, fallback) = match step {
            Step::Answer(answer) => {
                let (status, change) = attempts.assess(index, &answer).await;
                match reason_to_move(status, change) {
                    Some(reason) if can_move => (reason, Some(status), Ok(answer)),
                    _ => {
                        body.stop_retaining();
                        return Ok((index, answer));
                    }
                }
            }
            Step::Failed {
                reject,
                retryable: true,
            } if can_move => (reject.message.clone(), None, Err(reject)),
            Step::Failed { reject, .. } => return Err(reject),
        };
        if attempts
            .record_failover(index, index + 1, &reason, status)
            .await
            .is_err()
        {
            return match fallback {
                Ok(answer) => {
                    body.stop_retaining();
                    Ok((index, answer))
                }
                Err(reject) => Err(reject),
            };
        }
        // Drops the refused answer (and with it what the key put into it) before the next key
        // is unsealed.
        drop(fallback);
        index += 1;
        body.restart(index as u32, index + 1 == candidates);
    }
}

/// Why an upstream answer moves the call to the next key, or `None` to hand it to the app.
/// `change` is what the pool made of the answer.
pub(super) fn reason_to_move(status: u16, change: Change) -> Option<String> {
    let until = |t: SystemTime| format_time(unix_secs(t));
    match (status, change) {
        (429, Change::CoolingDown(t)) => Some(format!(
            "upstream answered 429; cooling down until {}",
            until(t)
        )),
        (401 | 403, Change::Quarantined(t) | Change::QuarantineExtended(t)) => Some(format!(
            "upstream answered {status}; quarantined until {}",
            until(t)
        )),
        (500.., _) => Some(format!("upstream answered {status}")),
        _ => None,
    }
}

/// What an upstream answer says about the key, for the pool; `None` for a server error, which
/// says nothing about it. `sent_at` is when the request went out.
pub(super) fn outcome(
    status: u16,
    headers: &HeaderMap,
    sent_at: SystemTime,
    now: SystemTime,
) -> Option<Outcome> {
    Some(match status {
        429 => Outcome::RateLimited {
            retry_after: headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now)),
        },
        401 | 403 => Outcome::Rejected { status },
        500.. => return None,
        _ => Outcome::Served { sent_at },
    })
}

/// Whether another key might succeed where this upstream failure happened: yes when the
/// request did not reach the upstream application or the exchange broke before response
/// headers; no for a timeout (the upstream may still be working on it).
pub(super) fn retryable(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Unreachable { .. } | UpstreamError::Failed { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Fingerprinter;
    use crate::proxy::limits::BodyBudget;
    use crate::proxy::upstream::UpstreamBody;
    use crate::seal::Secret;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::time::Duration;

    /// One scripted attempt: what the key gets, and what the pool makes of an answer.
    enum Script {
        Answer(u16, Change),
        Failed(ErrorCode, bool),
    }

    /// Attempts that follow a script and record what the loop asked of them. Each attempt
    /// reads the whole body it was handed, as a connection would.
    struct Scripted {
        script: VecDeque<Script>,
        body: Replay<UpstreamBody>,
        /// Body each attempt sent, by index.
        sent: Vec<(usize, Result<Bytes, String>)>,
        /// The pool's change for the answer now being assessed.
        change: Option<Change>,
        assessed: Vec<usize>,
        /// `(from, to, reason, status)` of each failover row.
        rows: Vec<(usize, usize, String, Option<u16>)>,
        /// The audit trail refuses failover rows.
        audit_down: bool,
    }

    impl Attempts for Scripted {
        type Answer = (usize, u16);

        async fn attempt(&mut self, index: usize) -> Step<(usize, u16)> {
            let read = self.body.attempt(index as u32, None).collect().await;
            self.sent
                .push((index, read.map(|c| c.to_bytes()).map_err(|e| e.to_string())));
            match self.script.pop_front().expect("an attempt past the script") {
                Script::Answer(status, change) => {
                    self.change = Some(change);
                    Step::Answer((index, status))
                }
                Script::Failed(code, retryable) => Step::Failed {
                    reject: Reject::new(code, format!("attempt {index} failed")),
                    retryable,
                },
            }
        }

        async fn assess(&mut self, index: usize, answer: &(usize, u16)) -> (u16, Change) {
            assert_eq!(answer.0, index);
            self.assessed.push(index);
            (answer.1, self.change.take().unwrap())
        }

        async fn record_failover(
            &mut self,
            from: usize,
            to: usize,
            reason: &str,
            status: Option<u16>,
        ) -> Result<(), ()> {
            if self.audit_down {
                return Err(());
            }
            self.rows.push((from, to, reason.to_string(), status));
            Ok(())
        }
    }

    fn budget() -> Arc<BodyBudget> {
        BodyBudget::new(1 << 20)
    }

    fn whole_body(
        budget: &Arc<BodyBudget>,
        text: &'static str,
        keep: bool,
    ) -> Replay<UpstreamBody> {
        let mut held = budget.hold();
        assert!(held.grow(text.len() as u64));
        Replay::new(
            (vec![Bytes::from_static(text.as_bytes())], held),
            None,
            None,
            Fingerprinter::new(&Secret::from_slice(b"failover test fingerprint key")),
            1 << 20,
            keep,
        )
    }

    fn scripted(body: Replay<UpstreamBody>, script: Vec<Script>) -> Scripted {
        Scripted {
            script: script.into(),
            body,
            sent: Vec::new(),
            change: None,
            assessed: Vec::new(),
            rows: Vec::new(),
            audit_down: false,
        }
    }

    fn soon() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)
    }

    #[tokio::test]
    async fn a_quarantined_key_moves_the_call_on_and_the_next_key_gets_the_same_body() {
        let budget = budget();
        let body = whole_body(&budget, "{\"model\":\"m\"}", true);
        let mut s = scripted(
            body.clone(),
            vec![
                Script::Answer(401, Change::Quarantined(soon())),
                Script::Answer(200, Change::None),
            ],
        );
        let (index, answer) = run(&mut s, 3, &body).await.unwrap();
        assert_eq!((index, answer), (1, (1, 200)));
        assert_eq!(s.sent.len(), 2);
        for (_, sent) in &s.sent {
            assert_eq!(sent.as_deref().unwrap(), b"{\"model\":\"m\"}");
        }
        assert_eq!(s.rows.len(), 1);
        let (from, to, reason, status) = &s.rows[0];
        assert_eq!((*from, *to, *status), (0, 1, Some(401)));
        assert!(
            reason.starts_with("upstream answered 401; quarantined until 2030-"),
            "{reason}"
        );
        assert_eq!(budget.held(), 0, "the delivered call keeps no body");
    }

    #[tokio::test]
    async fn which_answers_move_the_call_on() {
        let t = soon();
        let moves = [
            (429, Change::CoolingDown(t), true),
            (403, Change::Quarantined(t), true),
            (401, Change::QuarantineExtended(t), true),
            (500, Change::None, true),
            (502, Change::None, true),
            (503, Change::None, true),
            // The pool did not take the key out (the only key left, say): no point moving on.
            (429, Change::None, false),
            (401, Change::None, false),
            (403, Change::CoolingDown(t), false),
            (200, Change::None, false),
            (201, Change::None, false),
            (400, Change::None, false),
            (404, Change::None, false),
            (422, Change::None, false),
        ];
        for (status, change, moved) in moves {
            assert_eq!(
                reason_to_move(status, change).is_some(),
                moved,
                "{status} {change:?}"
            );
            let budget = budget();
            let body = whole_body(&budget, "x", true);
            let mut s = scripted(
                body.clone(),
                vec![
                    Script::Answer(status, change),
                    Script::Answer(200, Change::None),
                ],
            );
            let (index, _) = run(&mut s, 2, &body).await.unwrap();
            assert_eq!(index, usize::from(moved), "{status} {change:?}");
            assert_eq!(s.rows.len(), usize::from(moved));
            assert_eq!(s.assessed.len(), 1 + usize::from(moved));
        }
    }

    #[tokio::test]
    async fn which_failures_move_the_call_on() {
        for (retryable, moved) in [(true, true), (false, false)] {
            let budget = budget();
            let body = whole_body(&budget, "x", true);
            let mut s = scripted(
                body.clone(),
                vec![
                    Script::Failed(ErrorCode::UpstreamUnreachable, retryable),
                    Script::Answer(200, Change::None),
                ],
            );
            let result = run(&mut s, 2, &body).await;
            if moved {
                assert_eq!(result.unwrap().0, 1);
                let (_, _, reason, status) = &s.rows[0];
                assert_eq!(reason, "attempt 0 failed");
                assert_eq!(*status, None);
            } else {
                let reject = result.err().unwrap();
                assert_eq!(reject.code, ErrorCode::UpstreamUnreachable);
                assert!(s.rows.is_empty());
                assert_eq!(s.sent.len(), 1);
            }
        }
    }

    #[test]
    fn connect_tls_and_broken_exchanges_are_retryable_and_timeouts_are_not() {
        let host = || "api.example.com:443".to_string();
        let reason = || "x".to_string();
        assert!(retryable(&UpstreamError::Unreachable {
            host: host(),
            reason: reason()
        }));
        assert!(retryable(&UpstreamError::Failed {
            host: host(),
            reason: reason()
        }));
        assert!(!retryable(&UpstreamError::Timeout {
            host: host(),
            after: Duration::from_secs(1)
        }));
        assert!(!retryable(&UpstreamError::StreamIdle {
            after: Duration::from_secs(1)
        }));
    }

    #[tokio::test]
    async fn when_every_key_fails_the_app_gets_the_last_answer() {
        let budget = budget();
        let body = whole_body(&budget, "x", true);
        let mut s = scripted(
            body.clone(),
            vec![
                Script::Answer(500, Change::None),
                Script::Answer(503, Change::None),
                Script::Answer(502, Change::None),
            ],
        );
        let (index, answer) = run(&mut s, 3, &body).await.unwrap();
        assert_eq!((index, answer), (2, (2, 502)));
        let moves: Vec<_> = s.rows.iter().map(|r| (r.0, r.1, r.3)).collect();
        assert_eq!(moves, [(0, 1, Some(500)), (1, 2, Some(503))]);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn when_every_key_fails_to_connect_the_app_gets_the_last_error() {
        let budget = budget();
        let body = whole_body(&budget, "x", true);
        let mut s = scripted(
            body.clone(),
            vec![
                Script::Failed(ErrorCode::UpstreamUnreachable, true),
                Script::Failed(ErrorCode::UpstreamTimeout, true),
            ],
        );
        let reject = run(&mut s, 2, &body).await.err().unwrap();
        assert_eq!(reject.code, ErrorCode::UpstreamTimeout);
        assert_eq!(reject.message, "attempt 1 failed");
        assert_eq!(s.rows.len(), 1);
    }

    #[tokio::test]
    async fn a_body_that_was_not_kept_never_fails_over() {
        let budget = budget();
        let body = whole_body(&budget, "x", false);
        let mut s = scripted(body.clone(), vec![Script::Answer(503, Change::None)]);
        let (index, answer) = run(&mut s, 2, &body).await.unwrap();
        assert_eq!((index, answer), (0, (0, 503)));
        assert!(s.rows.is_empty());
        let mut s = scripted(
            body.clone(),
            vec![Script::Failed(ErrorCode::UpstreamUnreachable, true)],
        );
        assert!(run(&mut s, 2, &body).await.is_err());
        assert!(s.rows.is_empty());
    }

    #[tokio::test]
    async fn a_failover_the_audit_trail_refuses_hands_over_what_the_key_got() {
        let budget = budget();
        let body = whole_body(&budget, "x", true);
        let mut s = scripted(
            body.clone(),
            vec![Script::Answer(429, Change::CoolingDown(soon()))],
        );
        s.audit_down = true;
        let (index, answer) = run(&mut s, 2, &body).await.unwrap();
        assert_eq!((index, answer), (0, (0, 429)));
        assert_eq!(s.sent.len(), 1, "no other key was used");
        assert_eq!(budget.held(), 0);

        let body = whole_body(&budget, "x", true);
        let mut s = scripted(
            body.clone(),
            vec![Script::Failed(ErrorCode::UpstreamUnreachable, true)],
        );
        s.audit_down = true;
        let reject = run(&mut s, 2, &body).await.err().unwrap();
        assert_eq!(reject.message, "attempt 0 failed");
        assert_eq!(s.sent.len(), 1);
    }

    #[tokio::test]
    async fn a_body_too_large_is_refused_whatever_upstream_answered() {
        let budget = budget();
        let mut held = budget.hold();
        assert!(held.grow(4));
        let rest: UpstreamBody = http_body_util::Full::new(Bytes::from_static(b"56789"))
            .map_err(|never| match never {})
            .boxed();
        let body = Replay::new(
            (vec![Bytes::from_static(b"1234")], held),
            Some(rest),
            None,
            Fingerprinter::new(&Secret::from_slice(b"failover test fingerprint key")),
            8,
            true,
        );
        let mut s = scripted(body.clone(), vec![Script::Answer(500, Change::None)]);
        let reject = run(&mut s, 2, &body).await.err().unwrap();
        assert_eq!(reject.code, ErrorCode::BodyTooLarge);
        assert!(s.rows.is_empty(), "no failover for a body the app must fix");
        assert!(
            s.assessed.is_empty(),
            "the key is not judged by an answer to a cut body"
        );
    }

    #[tokio::test]
    async fn once_an_answer_is_handed_over_the_body_can_no_longer_be_sent() {
        let budget = budget();
        let body = whole_body(&budget, "abc", true);
        let mut s = scripted(body.clone(), vec![Script::Answer(200, Change::None)]);
        assert_eq!(run(&mut s, 3, &body).await.unwrap().0, 0);
        let after = body.after_attempt();
        assert!(!after.replayable, "a delivered call must not be sent again");
        assert_eq!(budget.held(), 0);
        // An attempt that polls the body again gets nothing more to send.
        let rest = body.attempt(0, None).collect().await.unwrap().to_bytes();
        assert!(rest.is_empty());
    }

    #[test]
    fn the_pool_hears_what_each_status_says_about_the_key() {
        let now = soon();
        let sent = now - Duration::from_secs(2);
        let mut h = HeaderMap::new();
        assert_eq!(
            outcome(200, &h, sent, now),
            Some(Outcome::Served { sent_at: sent })
        );
        assert_eq!(
            outcome(404, &h, sent, now),
            Some(Outcome::Served { sent_at: sent })
        );
        assert_eq!(
            outcome(401, &h, sent, now),
            Some(Outcome::Rejected { status: 401 })
        );
        assert_eq!(
            outcome(403, &h, sent, now),
            Some(Outcome::Rejected { status: 403 })
        );
        assert_eq!(
            outcome(429, &h, sent, now),
            Some(Outcome::RateLimited { retry_after: None })
        );
        h.insert(http::header::RETRY_AFTER, "30".parse().unwrap());
        assert_eq!(
            outcome(429, &h, sent, now),
            Some(Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(30))
            })
        );
        for status in [500, 502, 503, 504, 599] {
            assert_eq!(outcome(status, &h, sent, now), None, "{status}");
        }
    }
}
