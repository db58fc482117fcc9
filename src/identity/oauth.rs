//! OAuth2 token requests for the token kinds (README, "Vertex AI", "Azure OpenAI with Entra
//! ID"): the request body each grant sends, and the reading of a token endpoint's answer.
//!
//! - `gcp-service-account`: the JWT bearer grant (RFC 7523) as Google documents it for service
//!   accounts (<https://developers.google.com/identity/protocols/oauth2/service-account>): an
//!   RS256 JWT with `iss` = the service account email, `scope`, `aud` = the key's `token_uri`,
//!   `iat` and `exp` (one hour), signed with the account's private key.
//! - `azure-entra`: the client credentials grant of the Microsoft identity platform
//!   (<https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow>),
//!   posted to `{authority}/{tenant}/oauth2/v2.0/token`.
//!
//! Everything here is pure: the caller sends the body and hands back the answer. Bodies and
//! tokens live in locked memory; errors name the endpoint and what it said, never a secret.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::cache::Fresh;
use super::kind::{AzureEntra, GcpServiceAccount};
use crate::seal::Secret;

/// The scope of a Vertex AI access token.
pub const GOOGLE_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The scope of an Azure OpenAI (Cognitive Services) token.
pub const AZURE_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// The public Microsoft Entra ID authority.
pub const AZURE_PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Lifetime asked for a service account assertion (Google's maximum).
const ASSERTION_LIFETIME_S: i64 = 3600;
/// Largest token-endpoint answer read.
pub const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// A token request that did not yield a token. Cloneable: the cache hands one failure to every
/// request that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("token endpoint {endpoint}: {reason}")]
pub struct TokenError {
    /// The token URL (scheme, host, path; no query).
    pub endpoint: String,
    /// What went wrong, with the endpoint's `error` code and description when it gave them.
    pub reason: String,
    /// True when the endpoint refused the credential itself (`invalid_client`,
    /// `invalid_grant`, `unauthorized_client`): rotating it is the fix.
    pub refused: bool,
}

/// The form body of a service account's JWT bearer grant, signed now (`now` in Unix seconds).
pub fn google_jwt_bearer_body(sa: &GcpServiceAccount, now: i64) -> Result<Secret, String> {
    let assertion = google_assertion(sa, now)?;
    let mut body = Vec::with_capacity(128 + assertion.len());
    body.extend_from_slice(
        b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=",
    );
    // A JWT is base64url and dots: nothing to percent-encode.
    body.extend_from_slice(assertion.expose_secret());
    Ok(Secret::from_vec(body))
}

/// The signed assertion (`header.claims.signature`, base64url), in locked memory: it is a
/// credential for as long as it is valid.
pub fn google_assertion(sa: &GcpServiceAccount, now: i64) -> Result<Secret, String> {
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &sa.private_key_id {
        header["kid"] = Value::String(kid.clone());
    }
    let claims = serde_json::json!({
        "iss": sa.client_email,
        "scope": GOOGLE_SCOPE,
        "aud": sa.token_uri,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_S,
    });
    let mut signing_input = URL_SAFE_NO_PAD.encode(header.to_string());
    signing_input.push('.');
    signing_input.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
    let key = ring::signature::RsaKeyPair::from_pkcs8(sa.private_key_der.expose_secret())
        .map_err(|_| "the service account's private key is not a usable RSA key".to_string())?;
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the service account assertion failed".to_string())?;
    signing_input.push('.');
    signing_input.push_str(&URL_SAFE_NO_PAD.encode(&signature));
    Ok(Secret::from_vec(signing_input.into_bytes()))
}

/// `{authority}/{tenant}/oauth2/v2.0/token` for an app registration.
pub fn entra_token_url(authority: &str, entra: &AzureEntra) -> String {
    format!(
        "{}/{}/oauth2/v2.0/token",
        authority.trim_end_matches('/'),
        entra.tenant_id
    )
}

/// The form body of an Entra ID client credentials grant for Azure OpenAI.
pub fn entra_client_credentials_body(entra: &AzureEntra) -> Secret {
    let mut body = Vec::with_capacity(256 + 3 * entra.client_secret.len());
    body.extend_from_slice(b"grant_type=client_credentials&client_id=");
    form_encode(entra.client_id.as_bytes(), &mut body);
    body.extend_from_slice(b"&scope=");
    form_encode(AZURE_SCOPE.as_bytes(), &mut body);
    body.extend_from_slice(b"&client_secret=");
    form_encode(entra.client_secret.expose_secret(), &mut body);
    Secret::from_vec(body)
}

/// `application/x-www-form-urlencoded` encoding of `raw`, appended to `out`.
fn form_encode(raw: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in raw {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
    }
}

/// Reads a token endpoint's answer (`status`, JSON `body`): the access token and its lifetime
/// on success, else the endpoint's `error` and `error_description` (RFC 6749 §5.2), with every
/// part of `secrets` cut out of the description.
pub fn read_token_response(
    endpoint: &str,
    status: u16,
    body: &[u8],
    secrets: &[Secret],
) -> Result<Fresh<Secret>, TokenError> {
    let fail = |reason: String, refused: bool| TokenError {
        endpoint: endpoint.to_string(),
        reason,
        refused,
    };
    let parsed: Option<serde_json::Map<String, Value>> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    };
    let Some(mut map) = parsed else {
        return Err(fail(
            format!("answered {status} without a JSON object; is the token URL right?"),
            false,
        ));
    };
    if !(200..300).contains(&status) || !map.contains_key("access_token") {
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
        let code = text("error").unwrap_or_else(|| "no error code".into());
        let refused = matches!(
            code.as_str(),
            "invalid_client" | "invalid_grant" | "unauthorized_client" | "invalid_scope"
        );
        let description = text("error_description")
            .map(|d| format!(" ({})", without_secrets(&d, secrets)))
            .unwrap_or_default();
        // The code is echoed too, so it gets the same cut as the description.
        let code: String = without_secrets(&code, secrets)
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        return Err(fail(
            format!("refused the credential with {status} {code}{description}"),
            refused,
        ));
    }
    let lifetime = match map.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        // Entra ID's v1 endpoint writes it as a string.
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| fail("answered without a numeric expires_in".into(), false))?;
    let token = match map.remove("access_token") {
        Some(Value::String(t)) => Secret::from_vec(t.into_bytes()),
        _ => {
            return Err(fail(
                "answered with a non-string access_token".into(),
                false,
            ));
        }
    };
    if token.is_empty()
        || !token
            .expose_secret()
            .iter()
            .all(|b| (0x21..=0x7e).contains(b))
    {
        return Err(fail(
            "answered with an access_token that cannot travel in a header".into(),
            false,
        ));
    }
    Ok(Fresh {
        value: token,
        lifetime: Duration::from_secs(lifetime),
    })
}

/// `text` (an endpoint's description) with every occurrence of a secret replaced and cut to
/// 300 characters.
fn without_secrets(text: &str, secrets: &[Secret]) -> String {
    let mut text = text.to_string();
    for s in secrets {
        if let Ok(s) = std::str::from_utf8(s.expose_secret())
            && s.len() >= 4
        {
            text = text.replace(s, "[REDACTED]");
        }
    }
    text.chars()
        .take(300)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra(secret: &str) -> AzureEntra {
        AzureEntra {
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            client_secret: Secret::from_slice(secret.as_bytes()),
        }
    }

    #[test]
    fn the_entra_body_is_form_encoded_and_the_url_is_per_tenant() {
        let e = entra("a~b.c_d-e+f/g=");
        let body = entra_client_credentials_body(&e);
        assert_eq!(
            std::str::from_utf8(body.expose_secret()).unwrap(),
            "grant_type=client_credentials&client_id=11111111-2222-3333-4444-555555555555\
             &scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default\
             &client_secret=a~b.c_d-e%2Bf%2Fg%3D"
        );
        assert_eq!(
            entra_token_url("https://login.microsoftonline.us/", &e),
            "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[test]
    fn token_answers_are_read_and_refusals_named_without_secrets() {
        let ok = read_token_response(
            "https://t",
            200,
            br#"{"token_type":"Bearer","expires_in":"3599","access_token":"eyJ0.abc"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(ok.value.expose_secret(), b"eyJ0.abc");
        assert_eq!(ok.lifetime, Duration::from_secs(3599));
        let secret = Secret::from_slice(b"Q~s3cr3t-value");
        let err = read_token_response(
            "https://login/t/oauth2/v2.0/token",
            401,
            concat!(
                r#"{"error":"invalid_client","error_description":"#,
                r#""AADSTS7000215: Invalid client secret provided: Q~s3cr3t-value"}"#
            )
            .as_bytes(),
            &[secret],
        )
        .unwrap_err();
        assert!(err.refused);
        let text = err.to_string();
        assert!(
            text.contains("https://login/t/oauth2/v2.0/token")
                && text.contains("invalid_client")
                && text.contains("AADSTS7000215")
                && !text.contains("s3cr3t"),
            "{text}"
        );
        // An endpoint that puts the secret in the error code itself.
        let echoed = read_token_response(
            "https://t",
            400,
            br#"{"error":"Q~s3cr3t-value"}"#,
            &[Secret::from_slice(b"Q~s3cr3t-value")],
        )
        .unwrap_err();
        assert!(!echoed.to_string().contains("s3cr3t"), "{echoed}");
        let html = read_token_response("https://t", 404, b"<html>", &[]).unwrap_err();
        assert!(!html.refused && html.reason.contains("404"), "{html}");
        let no_expiry = read_token_response("https://t", 200, br#"{"access_token":"x"}"#, &[]);
        assert!(no_expiry.unwrap_err().reason.contains("expires_in"));
    }
}
