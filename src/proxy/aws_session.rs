//! Session credentials for `aws-assume-role` credentials (README, "Bedrock"): STS `AssumeRole`
//! with the stored role ARN and external id, signed with keyward's own AWS identity (the chain
//! of [`crate::custody::aws_kms`]: environment, web identity, container, IMDSv2), over verified
//! TLS only. The answers are kept in the derived-secret cache ([`DerivedCache`]) in locked
//! memory until shortly before they expire; one STS call serves a burst of requests.
//!
//! This module does the I/O for one derived secret and nothing else: it must not choose
//! credentials or touch requests, and its errors name the endpoint, the role and STS's error
//! code, never a secret.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::custody::aws_kms::{self, CredentialChain, Url};
use crate::identity::kind::AwsAssumeRole;
use crate::identity::{DerivedCache, Fresh};
use crate::seal::Secret;

/// Requested session length (STS's default; the role's maximum may be longer).
const SESSION_SECONDS: u64 = 3600;

/// Session credentials of an assumed role, in locked memory.
pub struct SessionCredentials {
    /// `ASIA…`.
    pub access_key_id: String,
    /// The session's signing secret.
    pub secret_access_key: Secret,
    /// The session token sent as `x-amz-security-token`.
    pub session_token: Secret,
}

/// Which cached session: credential id and version.
type Key = (String, u32);

/// Assumed-role sessions per credential version, and keyward's own AWS identity.
#[derive(Default)]
pub struct AwsSessions {
    /// Keyward's own credentials, found on first use.
    base: Mutex<Option<Arc<CredentialChain>>>,
    /// Session credentials by credential version.
    cache: DerivedCache<Key, SessionCredentials, String>,
}

impl std::fmt::Debug for AwsSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSessions")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Where to assume a role.
pub struct StsTarget<'a> {
    /// `https://HOST[:PORT]`.
    pub endpoint: &'a str,
    /// Region of the signature.
    pub region: &'a str,
    /// Extra CA bundle for the endpoint (the target's `ca_file`).
    pub ca_file: Option<&'a PathBuf>,
}

impl AwsSessions {
    /// The session for credential `id` version `version` assuming `role`, from the cache or
    /// from STS. The error says what failed and where, without secrets.
    pub async fn session(
        &self,
        id: &str,
        version: u32,
        role: AwsAssumeRole,
        sts: StsTarget<'_>,
    ) -> Result<Arc<SessionCredentials>, String> {
        let key = (id.to_string(), version);
        let endpoint = sts.endpoint.to_string();
        let region = sts.region.to_string();
        let ca_file = sts.ca_file.cloned();
        let session_name = format!("keyward-{id}");
        self.cache
            .get(&key, || async move {
                let base = self.base_chain(&region, ca_file.clone()).await?;
                tokio::task::spawn_blocking(move || {
                    assume_role(&base, &role, &endpoint, &region, ca_file, &session_name)
                })
                .await
                .map_err(|e| format!("the STS call did not finish: {e}"))?
            })
            .await
    }

    /// Drops the sessions of every credential version `keep` refuses (deleted, revoked,
    /// retired).
    pub fn retain(&self, mut keep: impl FnMut(&str, u32) -> bool) {
        self.cache.retain(|(id, version)| keep(id, *version));
    }

    /// Credential versions with a session in the cache.
    pub fn cached(&self) -> usize {
        self.cache.held()
    }

    /// Forgets a session the upstream refused, so the next request assumes the role again.
    pub async fn invalidate(&self, id: &str, version: u32, value: &Arc<SessionCredentials>) {
        self.cache
            .invalidate(&(id.to_string(), version), value)
            .await;
    }

    async fn base_chain(
        &self,
        region: &str,
        ca_file: Option<PathBuf>,
    ) -> Result<Arc<CredentialChain>, String> {
        if let Some(chain) = crate::lock(&self.base).clone() {
            return Ok(chain);
        }
        let region = region.to_string();
        let chain = tokio::task::spawn_blocking(move || {
            let tls = Arc::new(aws_kms::tls_config(ca_file.as_deref()).map_err(|e| e.to_string())?);
            CredentialChain::from_env(&region, tls, &crate::config::process_env)
                .map_err(|e| format!("keyward's own AWS identity (to assume roles): {e}"))
        })
        .await
        .map_err(|e| format!("finding keyward's own AWS identity did not finish: {e}"))??;
        let chain = Arc::new(chain);
        *crate::lock(&self.base) = Some(chain.clone());
        Ok(chain)
    }
}

/// One STS `AssumeRole` call (Query API, `Version=2011-06-15`), blocking.
fn assume_role(
    base: &CredentialChain,
    role: &AwsAssumeRole,
    endpoint: &str,
    region: &str,
    ca_file: Option<PathBuf>,
    session_name: &str,
) -> Result<Fresh<SessionCredentials>, String> {
    let arn = &role.role_arn;
    let fail = |reason: String| format!("STS AssumeRole of {arn} at {endpoint}: {reason}");
    let url = Url::parse(endpoint).map_err(&fail)?;
    if !url.tls {
        return Err(fail("the endpoint must be https://".into()));
    }
    let tls = Arc::new(aws_kms::tls_config(ca_file.as_deref()).map_err(|e| fail(e.to_string()))?);
    let creds = base.get().map_err(|e| fail(e.to_string()))?;
    let mut form = String::from("Action=AssumeRole&Version=2011-06-15&RoleArn=");
    form.push_str(&aws_kms::form_escape(arn));
    form.push_str("&RoleSessionName=");
    form.push_str(&aws_kms::form_escape(
        &session_name[..session_name.len().min(64)],
    ));
    form.push_str(&format!("&DurationSeconds={SESSION_SECONDS}"));
    if let Some(external) = &role.external_id {
        form.push_str("&ExternalId=");
        form.push_str(&aws_kms::form_escape(external));
    }
    let content_type = "application/x-www-form-urlencoded";
    let signed = aws_kms::sign(
        &creds,
        region,
        "sts",
        &url,
        &[("content-type", content_type)],
        form.as_bytes(),
    )
    .map_err(|e| fail(format!("signing failed: {e}")))?;
    let mut headers: Vec<(&str, &str)> = vec![("content-type", content_type)];
    headers.extend(signed.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let started = SystemTime::now();
    let response = aws_kms::http(&tls, "POST", &url, &headers, form.as_bytes()).map_err(&fail)?;
    let text = std::str::from_utf8(&response.body).unwrap_or("");
    if response.status != 200 {
        let code = aws_kms::xml_text(text, "Code").unwrap_or("an unknown error");
        let message: String = aws_kms::xml_text(text, "Message")
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        return Err(fail(format!(
            "failed with {code} (HTTP {}){}{message}",
            response.status,
            if message.is_empty() { "" } else { ": " }
        )));
    }
    let field = |tag: &str| {
        aws_kms::xml_text(text, tag).ok_or_else(|| fail(format!("the answer has no {tag}")))
    };
    let expires = field("Expiration").and_then(|t| {
        aws_kms::parse_time(t).ok_or_else(|| fail("its Expiration is not a time".into()))
    })?;
    let lifetime = expires
        .duration_since(started)
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(12 * 3600));
    Ok(Fresh {
        value: SessionCredentials {
            access_key_id: field("AccessKeyId")?.to_string(),
            secret_access_key: Secret::from_slice(field("SecretAccessKey")?.as_bytes()),
            session_token: Secret::from_slice(field("SessionToken")?.as_bytes()),
        },
        lifetime,
    })
}
