//! Access tokens for the token kinds (`gcp-service-account`, `azure-entra`): the HTTPS client
//! that asks a token endpoint, and the single-flight cache in front of it (README, "Credential
//! kinds").
//!
//! Token endpoints are reached only over verified TLS (web PKI roots plus the target's
//! `ca_file`); a plain-http URL is refused before anything is sent. The grant bodies and the
//! tokens stay in locked memory except for the copies hyper needs to send and receive them
//! (the binary's allocator wipes those when freed). Errors name the endpoint and its answer,
//! never a secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::scrub::ScrubSet;
use crate::identity::kind::{AzureEntra, GcpServiceAccount};
use crate::identity::oauth::{self, MAX_TOKEN_RESPONSE, TokenError};
use crate::identity::{CredentialKind, DerivedCache};
use crate::seal::Secret;

/// Longest a token request may take, connect to last byte; requests waiting for the token wait
/// at most this long.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Which credential version a token belongs to.
pub type TokenKey = (String, u32);

/// Where and how one credential's token is obtained.
pub struct TokenRequest<'a> {
    /// Credential id and version: the cache key.
    pub key: TokenKey,
    /// `gcp-service-account` or `azure-entra`.
    pub kind: CredentialKind,
    /// The unsealed secret document.
    pub secret: &'a Secret,
    /// The target's `token_url` (Vertex: instead of the key's `token_uri`).
    pub token_url: Option<&'a str>,
    /// The target's `authority` (Entra ID: instead of the public cloud's).
    pub authority: Option<&'a str>,
    /// The target's extra trust anchors.
    pub ca_file: Option<&'a Path>,
}

/// An access token and what a response must not carry while it is in use.
pub struct Derived {
    /// The access token.
    pub token: Secret,
    /// The needles for the token and the credential's secret parts (README, "Credential
    /// kinds"), built once per token rather than per request: parsing a service account key
    /// checks its RSA key, and a key has dozens of lines to look for.
    pub scrub: ScrubSet,
}

/// Cached access tokens and the clients that fetch them.
#[derive(Default)]
pub struct TokenSource {
    cache: DerivedCache<TokenKey, Derived, TokenError>,
    /// One client per trust set (`ca_file`), made on first use.
    clients: std::sync::Mutex<HashMap<Option<PathBuf>, HttpsClient>>,
    /// Token requests sent since start.
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// The access token for `req`: cached until shortly before it expires, else fetched once
    /// for every request that needs it meanwhile.
    pub async fn token(&self, req: TokenRequest<'_>) -> Result<Arc<Derived>, TokenError> {
        let key = req.key.clone();
        self.cache
            .get(&key, || async {
                let mut parts = req.kind.secret_parts(req.secret);
                let fresh = self.fetch(req).await?;
                parts
                    .whole
                    .push(Secret::from_slice(fresh.value.expose_secret()));
                Ok(crate::identity::Fresh {
                    value: Derived {
                        token: fresh.value,
                        scrub: ScrubSet::new(&parts.whole, &parts.fragments),
                    },
                    lifetime: fresh.lifetime,
                })
            })
            .await
    }

    /// Forgets `token` (the upstream answered 401 to it), so the next request fetches anew.
    pub async fn refused(&self, key: &TokenKey, token: &Arc<Derived>) {
        self.cache.invalidate(key, token).await;
    }

    /// Drops the tokens of every credential version `keep` refuses (deleted, revoked, retired).
    pub fn retain(&self, keep: impl FnMut(&TokenKey) -> bool) {
        self.cache.retain(keep);
    }

    /// Credential versions with a token in the cache.
    pub fn cached(&self) -> usize {
        self.cache.held()
    }

    /// Token requests sent since start.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn fetch(
        &self,
        req: TokenRequest<'_>,
    ) -> Result<crate::identity::Fresh<Secret>, TokenError> {
        let (url, body) = grant(&req)?;
        let secrets = req.kind.secret_parts(req.secret).whole;
        let client = self.client(req.ca_file, &url)?;
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fail = |reason: String| TokenError {
            endpoint: url.clone(),
            reason,
            refused: false,
        };
        let request = http::Request::post(&url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::copy_from_slice(body.expose_secret())))
            .map_err(|e| fail(format!("cannot form the request: {e}")))?;
        drop(body);
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| fail(format!("unreachable: {}", error_chain(&e))))?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|e| fail(format!("answer unreadable or over 64 KiB: {e}")))?
                .to_bytes();
            let body = Secret::from_slice(&bytes);
            drop(bytes);
            oauth::read_token_response(&url, status, body.expose_secret(), &secrets)
        };
        match tokio::time::timeout(TOKEN_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(fail(format!(
                "no answer within {}s",
                TOKEN_TIMEOUT.as_secs()
            ))),
        }
    }

    fn client(&self, ca_file: Option<&Path>, url: &str) -> Result<HttpsClient, TokenError> {
        let mut clients = crate::lock(&self.clients);
        let key = ca_file.map(Path::to_path_buf);
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let tls =
            super::upstream::tls_config(ca_file, "token endpoint").map_err(|e| TokenError {
                endpoint: url.to_string(),
                reason: e.to_string(),
                refused: false,
            })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client: HttpsClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// The token URL and form body of `req`'s grant.
fn grant(req: &TokenRequest<'_>) -> Result<(String, Secret), TokenError> {
    let bad = |endpoint: &str, reason: String| TokenError {
        endpoint: endpoint.to_string(),
        reason,
        refused: true,
    };
    let (url, body) = match req.kind {
        CredentialKind::GcpServiceAccount => {
            let sa = GcpServiceAccount::parse(req.secret).map_err(|e| bad("-", e.to_string()))?;
            let url = req.token_url.unwrap_or(&sa.token_uri).to_string();
            let body = oauth::google_jwt_bearer_body(&sa, crate::units::now_unix())
                .map_err(|e| bad(&url, e))?;
            (url, body)
        }
        CredentialKind::AzureEntra => {
            let entra = AzureEntra::parse(req.secret).map_err(|e| bad("-", e.to_string()))?;
            let authority = req.authority.unwrap_or(oauth::AZURE_PUBLIC_AUTHORITY);
            let url = oauth::entra_token_url(authority, &entra);
            (url, oauth::entra_client_credentials_body(&entra))
        }
        other => {
            return Err(bad(
                "-",
                format!("credential kind {other} does not use an OAuth2 token"),
            ));
        }
    };
    if !url.starts_with("https://") {
        return Err(TokenError {
            endpoint: url,
            reason: "token endpoints are reached only over https".into(),
            refused: false,
        });
    }
    Ok((url, body))
}

/// `e` and its sources, for an unreachable endpoint (hyper's top error says only "client
/// error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
