//! Phase 8 of a call ([`super::call`]): one attempt per candidate key — unseal the key,
//! inject it or sign with it (`providers`, pure functions over the headers), send the request
//! with the shared body ([`super::replay`]) — and what each answer means for the key (`pool`,
//! the quarantine row). [`KeyAttempts`] is the I/O that [`super::failover::run`] drives.
//!
//! A secret lives here only from unsealing until the answer is scrubbed: [`Used`] carries what
//! must not come back to the app.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;

use super::aws_session::{SessionCredentials, StsTarget};
use super::call::{AppBody, Call};
use super::error::{ErrorCode, Reject};
use super::failover::{self, Step};
use super::replay::Replay;
use super::route::{Route, upstream_uri};
use super::scrub::ScrubSet;
use super::token::{Derived, TokenKey, TokenRequest};
use super::upstream::{ResponseBody, Upstream};
use crate::audit::{Event, EventKind};
use crate::identity::CredentialKind;
use crate::pool::{Change, Outcome, unix_secs};
use crate::providers::{
    AuthScheme, AwsSigningKey, Target, bearer_auth, prepare_signed_headers,
    prepare_upstream_headers, prepare_upstream_headers_as,
};
use crate::scope::Candidate;
use crate::seal::{CredentialRef, Secret, TenantKeys, open_with_tenant_key};
use crate::state::State;
use crate::units::format_time;

/// The I/O of a call's attempts with its candidate keys, for [`failover::run`].
pub(super) struct KeyAttempts<'a> {
    /// The call: its state, and what the attempts add to it.
    call: &'a mut Call,
    /// The tenant's id and unwrapped keys.
    tenant: (&'a str, &'a TenantKeys),
    /// The parts of the app's request every attempt sends.
    request: &'a Outgoing<'a>,
    /// The keys to try, in order.
    candidates: &'a [Candidate],
    /// The request body, sent again by each attempt.
    replay: &'a Replay<AppBody>,
    /// When the latest attempt's request went out.
    sent_at: SystemTime,
}

impl<'a> KeyAttempts<'a> {
    /// The attempts of `call` with `candidates`, sending `request` with `replay`'s body.
    pub fn new(
        call: &'a mut Call,
        tenant: (&'a str, &'a TenantKeys),
        request: &'a Outgoing<'a>,
        candidates: &'a [Candidate],
        replay: &'a Replay<AppBody>,
    ) -> KeyAttempts<'a> {
        KeyAttempts {
            call,
            tenant,
            request,
            candidates,
            replay,
            sent_at: SystemTime::now(),
        }
    }
}

impl failover::Attempts for KeyAttempts<'_> {
    type Answer = Answer;

    async fn attempt(&mut self, index: usize) -> Step<Answer> {
        let chosen = &self.candidates[index];
        self.call.attempted = Some(chosen.clone());
        if chosen.expired_warn {
            tracing::warn!(
                call_id = self.call.id,
                credential = %chosen.credential.id,
                version = chosen.version().version,
                "serving a key past the tenant's max key age (policy: warn)",
            );
        }
        self.sent_at = SystemTime::now();
        let mut refusal = None;
        let mut step = attempt(
            &self.call.state,
            self.tenant,
            self.request,
            chosen,
            self.replay,
            index as u32,
            &mut self.call.upstream_time,
            &mut refusal,
        )
        .await;
        if let (Some(reason), Step::Failed { reject, .. }) = (refusal, &mut step)
            && let Some(until) = quarantine_refused(self.call, chosen, &reason)
        {
            reject
                .message
                .push_str(&format!("; quarantined until {until}"));
        }
        step
    }

    async fn assess(&mut self, index: usize, (response, used): &Answer) -> (u16, Change) {
        let status = response.status().as_u16();
        // A refused access token is not offered again: the next request fetches anew.
        if status == 401
            && let Some((key, token)) = &used.token
        {
            self.call.state.tokens.refused(key, token).await;
        }
        let chosen = &self.candidates[index];
        let change = report(self.call, chosen, response, self.sent_at);
        (status, change)
    }

    async fn record_failover(
        &mut self,
        from: usize,
        to: usize,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), ()> {
        let (chosen, next) = (&self.candidates[from], &self.candidates[to]);
        let call_id = self.call.id.as_str();
        let mut row = self.call.event(EventKind::RequestFailover);
        name_credential(&mut row, chosen);
        row.upstream_status = status;
        row.detail = Some(format!(
            "from {} to {}: {reason}",
            label(chosen),
            label(next)
        ));
        // Flags the row when either key is past its max age (policy: warn), once.
        if next.expired_warn && !row.flags.iter().any(|f| f == "expired_key_warn") {
            row.flags.push("expired_key_warn".into());
        }
        // Same rule as the resolution: the next key is not used until this row is durable.
        let committing = Instant::now();
        let committed = self.call.state.audit.commit(row).await;
        self.call.state.metrics.audit_commit(committing.elapsed());
        if let Err(e) = committed {
            tracing::error!(
                call_id,
                error = %e,
                "failover not possible: its audit record could not be written",
            );
            return Err(());
        }
        tracing::info!(
            call_id,
            from = %label(chosen),
            to = %label(next),
            reason,
            "failing over to the next key",
        );
        Ok(())
    }
}

/// The parts of the app's request every attempt reuses.
pub(super) struct Outgoing<'a> {
    /// The app's method.
    pub method: &'a http::Method,
    /// The app's headers, before credential stripping and injection.
    pub headers: &'a HeaderMap,
    /// The call's target.
    pub target: &'a Target,
    /// The call's route (the provider path).
    pub route: &'a Route,
    /// The app's `Content-Length`, when it declared one.
    pub declared: Option<u64>,
    /// The upstream clients of the request's configuration snapshot.
    pub upstream: &'a Upstream,
    /// Hex SHA-256 of the whole body, for SigV4 targets (whose body is read whole first).
    pub body_sha256: Option<&'a str>,
}

/// An upstream answer, with what was injected to get it (for scrubbing).
pub(super) type Answer = (Response<ResponseBody>, Used);

/// Sends the request once with `chosen`. `refusal` gets the reason when the token endpoint
/// refused the credential itself.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    state: &State,
    tenant: (&str, &crate::seal::TenantKeys),
    request: &Outgoing<'_>,
    chosen: &Candidate,
    replay: &Replay<AppBody>,
    number: u32,
    upstream_time: &mut std::time::Duration,
    refusal: &mut Option<String>,
) -> Step<Answer> {
    let kind = chosen.credential.kind;
    let signed = matches!(request.target.auth, AuthScheme::SigV4 { .. });
    let signing_kind = matches!(
        kind,
        CredentialKind::AwsAccessKey | CredentialKind::AwsAssumeRole
    );
    if signed != signing_kind {
        return Step::Failed {
            reject: Reject::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "credential {} is of kind {kind}, which this keyward cannot use for target {}",
                    chosen.credential.id, request.target.name
                ),
            ),
            retryable: true,
        };
    }
    let secret = match unseal(tenant, chosen) {
        Ok(secret) => secret,
        Err(reject) => {
            return Step::Failed {
                reject,
                retryable: true,
            };
        }
    };
    let mut headers = request.headers.clone();
    let uri = upstream_uri(request.target, request.route);
    let signing = if signed {
        Some(sign(state, request, chosen, &uri, &mut headers, &secret).await)
    } else {
        None
    };
    let used = match signing {
        Some(Ok((scrub, session))) => Used {
            scrub,
            token: None,
            session,
        },
        Some(Err(reject)) => {
            return Step::Failed {
                reject,
                retryable: true,
            };
        }
        None => match inject(state, request.target, chosen, secret, &mut headers, refusal).await {
            Ok(used) => used,
            Err(failed) => return failed,
        },
    };
    let body = replay.attempt(number, request.declared);
    let mut upstream_req = Request::new(body.boxed());
    *upstream_req.method_mut() = request.method.clone();
    *upstream_req.uri_mut() = uri;
    *upstream_req.headers_mut() = headers;
    let sending = Instant::now();
    let sent = request.upstream.send(request.target, upstream_req).await;
    let took = sending.elapsed();
    *upstream_time += took;
    state.metrics.upstream(&request.target.name, took);
    match sent {
        Ok(response) if is_encoded(response.headers()) => Step::Failed {
            // keyward asked for an identity body (no Accept-Encoding); an encoded one could carry
            // the key past the scrubber, so it is never relayed.
            reject: Reject::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "upstream {} answered with an encoded body (Content-Encoding or \
                     Transfer-Encoding other than chunked) although none was accepted; keyward \
                     cannot scrub it and refuses to relay it",
                    request.target.upstream.authority
                ),
            ),
            retryable: false,
        },
        Ok(response) => {
            // A refused session may have been revoked: the next request assumes the role again.
            if let Some(session) = &used.session
                && matches!(response.status().as_u16(), 401 | 403)
            {
                let version = chosen.version().version;
                state
                    .aws_sessions
                    .invalidate(&chosen.credential.id, version, session)
                    .await;
            }
            Step::Answer((response, used))
        }
        Err(e) => Step::Failed {
            retryable: failover::retryable(&e),
            reject: Reject::new(e.code(), e.to_string()),
        },
    }
}

/// What one attempt put into the request, kept until its response is scrubbed.
pub(super) struct Used {
    /// Every secret the response must not carry: the key, or a document's secret parts and the
    /// token derived from it.
    pub scrub: ScrubSet,
    /// The derived access token and its cache key, to forget it if the upstream refuses it.
    token: Option<(TokenKey, Arc<Derived>)>,
    /// The assumed-role session that signed the request, to forget it if it is refused.
    session: Option<Arc<SessionCredentials>>,
}

/// Puts `chosen`'s credential into `headers`: a key as the target takes it, or for a token kind
/// (README, "Credential kinds") a cached or freshly fetched access token as
/// `Authorization: Bearer`.
async fn inject(
    state: &State,
    target: &Target,
    chosen: &Candidate,
    secret: Secret,
    headers: &mut HeaderMap,
    refusal: &mut Option<String>,
) -> Result<Used, Step<Answer>> {
    let kind = chosen.credential.kind;
    let refused = |e: crate::providers::InjectError| Step::Failed {
        reject: Reject::new(ErrorCode::BadRequest, e.to_string()),
        retryable: false,
    };
    match kind {
        CredentialKind::ApiKey => {
            prepare_upstream_headers(target, headers, &secret).map_err(refused)?;
            Ok(Used {
                scrub: ScrubSet::new(std::slice::from_ref(&secret), &[]),
                token: None,
                session: None,
            })
        }
        CredentialKind::GcpServiceAccount | CredentialKind::AzureEntra => {
            let key = (chosen.credential.id.clone(), chosen.version().version);
            let token = state
                .tokens
                .token(TokenRequest {
                    key: key.clone(),
                    kind,
                    secret: &secret,
                    token_url: target.token_url.as_deref(),
                    authority: target.authority.as_deref(),
                    ca_file: target.ca_file.as_deref(),
                })
                .await
                .map_err(|e| {
                    tracing::warn!(
                        credential = %chosen.credential.id,
                        version = key.1,
                        error = %e,
                        "no access token for the credential",
                    );
                    if e.refused {
                        *refusal = Some(e.to_string());
                    }
                    Step::Failed {
                        reject: Reject::new(
                            ErrorCode::UpstreamUnreachable,
                            format!(
                                "credential {}/v{} ({kind}) got no access token: {e}",
                                key.0, key.1
                            ),
                        ),
                        retryable: true,
                    }
                })?;
            prepare_upstream_headers_as(target, &bearer_auth(), headers, &token.token)
                .map_err(refused)?;
            drop(secret);
            Ok(Used {
                scrub: token.scrub.clone(),
                token: Some((key, token)),
                session: None,
            })
        }
        other => Err(Step::Failed {
            reject: Reject::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "credential {} is of kind {other}, which this keyward cannot use for \
                     target {}",
                    chosen.credential.id, target.name
                ),
            ),
            retryable: true,
        }),
    }
}

/// Signs the request for a SigV4 target with `chosen` (an `aws-access-key`, or the session of
/// an `aws-assume-role`). Returns the secrets to scrub from the answer and the session used, or
/// why it cannot (another key may do better).
async fn sign(
    state: &State,
    request: &Outgoing<'_>,
    chosen: &Candidate,
    uri: &http::Uri,
    headers: &mut HeaderMap,
    secret: &Secret,
) -> Result<(ScrubSet, Option<Arc<SessionCredentials>>), Reject> {
    use crate::identity::kind::{AwsAccessKey, AwsAssumeRole};
    let target = request.target;
    let id = &chosen.credential.id;
    let unusable = |what: String| {
        Reject::new(
            ErrorCode::UpstreamUnreachable,
            format!(
                "credential {id} cannot sign for target {}: {what}",
                target.name
            ),
        )
    };
    let body_sha256 = request
        .body_sha256
        .ok_or_else(|| unusable("the body was not read whole".into()))?;
    let sign = |headers: &mut HeaderMap, key: &AwsSigningKey<'_>| {
        prepare_signed_headers(
            target,
            request.method,
            uri,
            headers,
            body_sha256,
            key,
            SystemTime::now(),
        )
        .map_err(|e| Reject::new(ErrorCode::UpstreamUnreachable, e.to_string()))
    };
    let kind = chosen.credential.kind;
    match kind {
        CredentialKind::AwsAccessKey => {
            let doc = AwsAccessKey::parse(secret).map_err(|e| unusable(e.to_string()))?;
            let key = AwsSigningKey {
                access_key_id: &doc.access_key_id,
                secret_access_key: &doc.secret_access_key,
                session_token: doc.session_token.as_ref(),
            };
            sign(headers, &key)?;
            Ok((ScrubSet::new(&kind.secret_parts(secret).whole, &[]), None))
        }
        CredentialKind::AwsAssumeRole => {
            let doc = AwsAssumeRole::parse(secret).map_err(|e| unusable(e.to_string()))?;
            let AuthScheme::SigV4 {
                region,
                sts_endpoint,
                ..
            } = &target.auth
            else {
                return Err(unusable("the target does not sign".into()));
            };
            let sts = StsTarget {
                endpoint: sts_endpoint,
                region,
                ca_file: target.ca_file.as_ref(),
            };
            let session = state
                .aws_sessions
                .session(id, chosen.version().version, doc, sts)
                .await
                .map_err(|e| Reject::new(ErrorCode::UpstreamUnreachable, e))?;
            let key = AwsSigningKey {
                access_key_id: &session.access_key_id,
                secret_access_key: &session.secret_access_key,
                session_token: Some(&session.session_token),
            };
            sign(headers, &key)?;
            let mut scrub = kind.secret_parts(secret).whole;
            for s in [&session.secret_access_key, &session.session_token] {
                scrub.push(Secret::from_slice(s.expose_secret()));
            }
            Ok((ScrubSet::new(&scrub, &[]), Some(session)))
        }
        other => Err(unusable(format!("a {other} credential cannot sign"))),
    }
}

/// True when the response body is not plain bytes keyward can scrub.
fn is_encoded(headers: &HeaderMap) -> bool {
    let not = |name, allowed: &[&str]| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().map_or(true, |v| {
                v.split(',')
                    .map(str::trim)
                    .any(|t| !t.is_empty() && !allowed.iter().any(|a| t.eq_ignore_ascii_case(a)))
            })
        })
    };
    not(http::header::CONTENT_ENCODING, &["identity"])
        || not(http::header::TRANSFER_ENCODING, &["chunked"])
}

/// Tells the pool what the upstream's status means for the key, and audits a quarantine.
fn report(
    call: &Call,
    chosen: &Candidate,
    response: &Response<ResponseBody>,
    sent_at: SystemTime,
) -> Change {
    let (state, call_id) = (&call.state, call.id.as_str());
    let now = SystemTime::now();
    let status = response.status().as_u16();
    let Some(outcome) = failover::outcome(status, response.headers(), sent_at, now) else {
        return Change::None;
    };
    let version = chosen.version().version;
    let change = state
        .pool
        .report(&chosen.credential.id, version, outcome, now);
    if let Change::Quarantined(until) = change {
        let until = format_time(unix_secs(until));
        tracing::warn!(
            call_id,
            credential = %chosen.credential.id,
            version,
            status,
            %until,
            "upstream refused the key: it may be revoked or leaked; quarantined",
        );
        let mut event = call.event(EventKind::CredentialQuarantined);
        name_credential(&mut event, chosen);
        event.upstream_status = Some(status);
        event.detail = Some(format!(
            "upstream answered {status}: the key may be revoked or leaked; skipped until {until} \
             while other keys can serve"
        ));
        state.audit.enqueue(event);
    }
    change
}

/// The token endpoint refused `chosen`'s credential itself (`invalid_grant`, `invalid_client`,
/// as `reason` says): the version is quarantined like a key the upstream refused with 401, and
/// a new quarantine is audited. Returns until when, for the failover's reason.
fn quarantine_refused(call: &Call, chosen: &Candidate, reason: &str) -> Option<String> {
    let (state, call_id) = (&call.state, call.id.as_str());
    let version = chosen.version().version;
    let now = SystemTime::now();
    let change = state.pool.report(
        &chosen.credential.id,
        version,
        Outcome::Rejected { status: 401 },
        now,
    );
    let (Change::Quarantined(until) | Change::QuarantineExtended(until)) = change else {
        return None;
    };
    let until = format_time(unix_secs(until));
    if matches!(change, Change::Quarantined(_)) {
        tracing::warn!(
            call_id,
            credential = %chosen.credential.id,
            version,
            %until,
            reason,
            "the token endpoint refused the credential; quarantined",
        );
        let mut event = call.event(EventKind::CredentialQuarantined);
        name_credential(&mut event, chosen);
        event.detail = Some(format!(
            "{reason}: the credential may be revoked or its secret wrong; skipped until {until} \
             while other keys can serve"
        ));
        state.audit.enqueue(event);
    }
    Some(until)
}

/// `cred_x/v2`, as in the `keyward-credential` header.
pub(super) fn label(c: &Candidate) -> String {
    format!("{}/v{}", c.credential.id, c.version().version)
}

/// Puts the candidate's id, version and policy flag on an audit row.
pub(super) fn name_credential(event: &mut Event, c: &Candidate) {
    event.credential_id = Some(c.credential.id.clone());
    event.credential_version = Some(c.version().version);
    if c.expired_warn {
        event.flags.push("expired_key_warn".into());
    }
}

/// Opens the chosen version's key into locked memory, with the tenant's key already unwrapped
/// for this request.
fn unseal(
    (tenant, keys): (&str, &crate::seal::TenantKeys),
    chosen: &Candidate,
) -> Result<Secret, Reject> {
    let v = chosen.version();
    open_with_tenant_key(
        &keys.tenant,
        CredentialRef {
            tenant,
            credential: &chosen.credential.id,
            version: v.version,
        },
        &v.wrapped_data_key,
        &v.ciphertext,
    )
    .map_err(|e| {
        tracing::error!(
            credential = %chosen.credential.id,
            version = v.version,
            error = %e,
            "stored credential failed to open",
        );
        Reject::new(
            ErrorCode::UpstreamUnreachable,
            "the stored credential could not be opened; ask the operator to rotate it",
        )
    })
}

/// The tenant's unwrapped keys, from the cache; a miss asks the master key's provider (an HSM
/// or KMS round trip) on a blocking thread.
pub(super) async fn tenant_keys(
    state: &Arc<State>,
    tenant: &crate::store::TenantRow,
) -> Result<Arc<crate::seal::TenantKeys>, crate::seal::SealError> {
    if let Some(keys) = state.tenant_keys.cached(&tenant.id) {
        return Ok(keys);
    }
    let (st, tenant) = (state.clone(), tenant.clone());
    tokio::task::spawn_blocking(move || st.tenant_keys_of(&tenant))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
