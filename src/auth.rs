//! Client authentication: client tokens (`kw_…`) in the headers SDKs use for their key, and
//! Unix peer credentials, resolved to a [`Principal`] against the catalog.
//!
//! `auth` must not touch upstreams or provider secrets. Tenant and team come only from the
//! authenticated client, never from anything the request claims.

use http::HeaderMap;
use ring::digest;

use crate::catalog::Catalog;

/// Headers an unmodified SDK puts its API key in; any of them may carry a client token.
pub const TOKEN_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// The header naming the workflow a request belongs to.
pub const WORKFLOW_HEADER: &str = "keyward-workflow";

/// Prefix of every client token.
pub const TOKEN_PREFIX: &str = "kw_";

/// Credentials of the process on the other end of a Unix socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id.
    pub pid: i32,
}

/// Who is calling, as established by [`authenticate`].
#[derive(Debug, Clone)]
pub struct Principal {
    /// Client id.
    pub client_id: String,
    /// Tenant id.
    pub tenant_id: String,
    /// Tenant name (for audit and messages).
    pub tenant_name: String,
    /// The client's team, if any.
    pub team: Option<String>,
    /// The workflow the request named (checked against the client's allowlist).
    pub workflow: Option<String>,
    /// Peer credentials, on the Unix socket.
    pub peer: Option<PeerCred>,
}

/// Why a request could not be authenticated; messages never contain a token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// Neither a token nor a bound uid.
    #[error(
        "no client credentials: send a keyward client token (kw_…) as `Authorization: Bearer`, \
         `x-api-key`, `api-key` or `x-goog-api-key`, or connect from a uid bound to a client \
         (`keyward client add --uid`)"
    )]
    Missing,
    /// The token is unknown or revoked.
    #[error(
        "client token is not valid (unknown or revoked): check the token `keyward client add` \
         printed"
    )]
    InvalidToken,
    /// Two different tokens in one request.
    #[error("the request carries two different client tokens; send one")]
    ConflictingTokens,
    /// Token and peer uid name different clients.
    #[error(
        "client token and socket peer uid {uid} do not agree: one of them belongs to another client"
    )]
    UidMismatch {
        /// The peer's uid.
        uid: u32,
    },
    /// A uid-bound client's token was used where no peer uid can be checked.
    #[error("this client is bound to a uid and must connect over the Unix socket, not TCP")]
    UidRequired,
    /// The named workflow is not in the client's allowlist.
    #[error("workflow `{workflow}` is not allowed for this client (allowed: {allowed})")]
    WorkflowNotAllowed {
        /// The workflow named.
        workflow: String,
        /// The client's allowlist.
        allowed: String,
    },
    /// The workflow header is not valid text.
    #[error("header keyward-workflow must be a short printable name")]
    BadWorkflow,
}

/// A new client token and the hash to store. The token is shown once and never stored.
pub fn new_token() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    crate::seal::fill_random(&mut bytes);
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 64);
    token.push_str(TOKEN_PREFIX);
    crate::hex::encode_into(&mut token, &bytes);
    zeroize::Zeroize::zeroize(&mut bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// SHA-256 of a token, the only form in which tokens are stored or compared.
pub fn token_hash(token: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// The scheme of an AWS SigV4 `Authorization` header.
const SIGV4_SCHEME: &str = "AWS4-HMAC-SHA256";

/// The access key id of a SigV4 `Authorization` value (after the scheme):
/// `Credential=<id>/<date>/<region>/<service>/aws4_request, SignedHeaders=..., Signature=...`.
/// An AWS SDK configured with a client token as its access key id sends the token here; its
/// signature (made with whatever secret the app holds) is not checked, and never forwarded.
fn sigv4_key_id(params: &str) -> Option<&str> {
    params
        .split(',')
        .find_map(|p| p.trim().strip_prefix("Credential="))
        .and_then(|c| c.split('/').next())
}

/// The client token in the request, if any; errors when two different ones are present.
fn find_token(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut found: Option<&str> = None;
    for name in TOKEN_HEADERS {
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else { continue };
            let text = text.trim();
            let text = if name == "authorization" {
                match text.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    Some((scheme, rest)) if scheme == SIGV4_SCHEME => match sigv4_key_id(rest) {
                        Some(id) => id,
                        None => continue,
                    },
                    _ => continue,
                }
            } else {
                text
            };
            if !text.starts_with(TOKEN_PREFIX) {
                continue;
            }
            match found {
                Some(prev) if prev != text => return Err(AuthError::ConflictingTokens),
                _ => found = Some(text),
            }
        }
    }
    Ok(found)
}

/// Identifies the caller. `peer` is `None` on TCP.
pub fn authenticate(
    catalog: &Catalog,
    headers: &HeaderMap,
    peer: Option<PeerCred>,
) -> Result<Principal, AuthError> {
    let client = match find_token(headers)? {
        Some(token) => {
            let client = catalog
                .clients_by_token
                .get(&token_hash(token))
                .ok_or(AuthError::InvalidToken)?;
            if let Some(bound) = client.uid {
                match peer {
                    None => return Err(AuthError::UidRequired),
                    Some(p) if p.uid != bound => return Err(AuthError::UidMismatch { uid: p.uid }),
                    Some(_) => {}
                }
            }
            // The other direction: a peer whose uid identifies a client may not borrow
            // another client's token.
            if let Some(p) = peer
                && let Some(owner) = catalog.clients_by_uid.get(&p.uid)
                && owner.id != client.id
            {
                return Err(AuthError::UidMismatch { uid: p.uid });
            }
            client
        }
        None => {
            let p = peer.ok_or(AuthError::Missing)?;
            catalog
                .clients_by_uid
                .get(&p.uid)
                .ok_or(AuthError::Missing)?
        }
    };
    let tenant = catalog
        .tenant(&client.tenant_id)
        .ok_or(AuthError::InvalidToken)?;
    let workflow = match headers.get(WORKFLOW_HEADER) {
        None => None,
        Some(v) => {
            let w = v.to_str().map_err(|_| AuthError::BadWorkflow)?.trim();
            if w.is_empty() || w.len() > 128 || !w.chars().all(|c| c.is_ascii_graphic()) {
                return Err(AuthError::BadWorkflow);
            }
            if !client.workflows.is_empty() && !client.workflows.iter().any(|a| a == w) {
                return Err(AuthError::WorkflowNotAllowed {
                    workflow: w.to_string(),
                    allowed: client.workflows.join(", "),
                });
            }
            Some(w.to_string())
        }
    };
    Ok(Principal {
        client_id: client.id.clone(),
        tenant_id: tenant.id.clone(),
        tenant_name: tenant.name.clone(),
        team: client.team.clone(),
        workflow,
        peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClientRow, Snapshot, TenantRow};

    fn catalog() -> (Catalog, String, String) {
        let (t1, h1) = new_token();
        let (t2, h2) = new_token();
        let tenant = TenantRow {
            id: "ten_1".into(),
            name: "acme".into(),
            wrapped_key: vec![],
            wrapped_fp_key: vec![],
            max_key_age_s: None,
            on_expiry: "deny".into(),
            rotation_overlap_s: None,
            created_at: 0,
        };
        let client = |id: &str, hash, uid, workflows: Vec<String>| ClientRow {
            id: id.into(),
            tenant_id: "ten_1".into(),
            name: id.into(),
            team: Some("search".into()),
            uid,
            workflows,
            token_hash: hash,
            created_at: 0,
            revoked_at: None,
        };
        let snap = Snapshot {
            tenants: vec![tenant],
            clients: vec![
                client("cli_a", h1, None, vec![]),
                client("cli_b", h2, Some(1000), vec!["batch".into()]),
            ],
            credentials: vec![],
        };
        (Catalog::build(snap), t1, t2)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn token_in_any_sdk_header_authenticates() {
        let (cat, t1, _) = catalog();
        for (name, value) in [
            ("authorization", format!("Bearer {t1}")),
            ("x-api-key", t1.clone()),
            ("api-key", t1.clone()),
            ("x-goog-api-key", t1.clone()),
        ] {
            let p = authenticate(&cat, &headers(&[(name, &value)]), None).unwrap();
            assert_eq!(p.client_id, "cli_a", "{name}");
            assert_eq!(p.tenant_name, "acme");
            assert_eq!(p.team.as_deref(), Some("search"));
        }
    }

    #[test]
    fn bad_tokens_are_refused() {
        let (cat, t1, t2) = catalog();
        assert_eq!(
            authenticate(&cat, &headers(&[]), None).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            authenticate(&cat, &headers(&[("x-api-key", "kw_nothing")]), None).unwrap_err(),
            AuthError::InvalidToken
        );
        // A provider key the SDK was configured with is not a client token.
        assert_eq!(
            authenticate(&cat, &headers(&[("authorization", "Bearer sk-real")]), None).unwrap_err(),
            AuthError::Missing
        );
        let both = headers(&[
            ("authorization", &format!("Bearer {t1}")),
            ("x-api-key", &t2),
        ]);
        assert_eq!(
            authenticate(&cat, &both, None).unwrap_err(),
            AuthError::ConflictingTokens
        );
    }

    #[test]
    fn uid_binding_and_token_must_agree() {
        let (cat, t1, t2) = catalog();
        let peer = |uid| {
            Some(PeerCred {
                uid,
                gid: 0,
                pid: 1,
            })
        };
        assert_eq!(
            authenticate(&cat, &headers(&[]), peer(1000))
                .unwrap()
                .client_id,
            "cli_b"
        );
        assert_eq!(
            authenticate(&cat, &headers(&[]), peer(1001)).unwrap_err(),
            AuthError::Missing
        );
        let h = headers(&[("x-api-key", &t2)]);
        assert_eq!(
            authenticate(&cat, &h, peer(1000)).unwrap().client_id,
            "cli_b"
        );
        assert_eq!(
            authenticate(&cat, &h, peer(1001)).unwrap_err(),
            AuthError::UidMismatch { uid: 1001 }
        );
        assert_eq!(
            authenticate(&cat, &h, None).unwrap_err(),
            AuthError::UidRequired
        );
        // uid 1000 identifies cli_b, so it may not present cli_a's unbound token either.
        let borrowed = headers(&[("x-api-key", &t1)]);
        assert_eq!(
            authenticate(&cat, &borrowed, peer(1000)).unwrap_err(),
            AuthError::UidMismatch { uid: 1000 }
        );
        assert_eq!(
            authenticate(&cat, &borrowed, peer(1001)).unwrap().client_id,
            "cli_a"
        );
    }

    #[test]
    fn workflow_must_be_allowed() {
        let (cat, _, t2) = catalog();
        let peer = Some(PeerCred {
            uid: 1000,
            gid: 0,
            pid: 1,
        });
        let ok = headers(&[("x-api-key", &t2), ("keyward-workflow", "batch")]);
        assert_eq!(
            authenticate(&cat, &ok, peer).unwrap().workflow.as_deref(),
            Some("batch")
        );
        let bad = headers(&[("x-api-key", &t2), ("keyward-workflow", "chat")]);
        let err = authenticate(&cat, &bad, peer).unwrap_err();
        assert!(
            err.to_string().contains("`chat` is not allowed") && err.to_string().contains("batch")
        );
    }

    #[test]
    fn a_workflow_header_must_be_a_short_printable_name() {
        let (cat, t1, _) = catalog();
        let with = |w: &str| {
            authenticate(
                &cat,
                &headers(&[("x-api-key", &t1), ("keyward-workflow", w)]),
                None,
            )
        };
        assert_eq!(with(&"w".repeat(128)).unwrap().workflow.unwrap().len(), 128);
        assert_eq!(
            with(" nightly ").unwrap().workflow.as_deref(),
            Some("nightly")
        );
        for bad in ["", "  ", &"w".repeat(129), "two words"] {
            assert_eq!(with(bad).unwrap_err(), AuthError::BadWorkflow, "{bad:?}");
        }
        // No header, no workflow.
        let none = authenticate(&cat, &headers(&[("x-api-key", &t1)]), None).unwrap();
        assert_eq!(none.workflow, None);
    }

    #[test]
    fn the_same_token_twice_is_one_token_and_other_schemes_are_not_tokens() {
        let (cat, t1, _) = catalog();
        let twice = headers(&[
            ("authorization", &format!("bearer  {t1}")),
            ("x-api-key", &format!(" {t1} ")),
        ]);
        assert_eq!(authenticate(&cat, &twice, None).unwrap().client_id, "cli_a");
        let basic = headers(&[("authorization", &format!("Basic {t1}"))]);
        assert_eq!(
            authenticate(&cat, &basic, None).unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn errors_never_echo_the_token() {
        let (cat, t1, _) = catalog();
        let mut wrong = t1.clone();
        wrong.push('x');
        let err = authenticate(&cat, &headers(&[("x-api-key", &wrong)]), None).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(&wrong));
    }

    #[test]
    fn an_aws_sdk_signature_carries_the_token_as_its_access_key_id() {
        let (cat, t1, _) = catalog();
        let sigv4 = format!(
            "AWS4-HMAC-SHA256 Credential={t1}/20261130/us-east-1/bedrock/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=00ff"
        );
        let p = authenticate(&cat, &headers(&[("authorization", &sigv4)]), None).unwrap();
        assert_eq!(p.client_id, "cli_a");
        for bad in [
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261130/us-east-1/bedrock/x",
            "AWS4-HMAC-SHA256 SignedHeaders=host",
            "aws4-hmac-sha256 Credential=kw_x/1",
        ] {
            let bad = bad.replace("kw_x", &t1);
            assert!(
                authenticate(&cat, &headers(&[("authorization", &bad)]), None).is_err(),
                "{bad}"
            );
        }
    }
}
