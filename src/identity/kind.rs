//! Credential kinds and their secret documents (README, "Credential kinds").
//!
//! An `api-key` secret is the provider key itself. Every other kind's secret is a JSON document
//! that keyward checks when it is added or rotated, seals whole like any key, and parses again
//! (into locked memory) only when it has to derive something from it. Errors name the field
//! that is missing or wrong and what to paste instead; they never hold a byte of the secret,
//! which is why `serde_json`'s own messages (which quote values) are never passed on.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};
use zeroize::Zeroize;

use crate::seal::Secret;

/// What a credential's secret is, and so what keyward does with it per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CredentialKind {
    /// A static key, injected as is in the target's auth header.
    #[default]
    ApiKey,
    /// `{"access_key_id","secret_access_key","session_token"?}`: requests are SigV4-signed.
    AwsAccessKey,
    /// `{"role_arn","external_id"?}`: keyward assumes the role with STS and signs with the
    /// session credentials.
    AwsAssumeRole,
    /// A Google service account JSON key: keyward mints OAuth2 access tokens (JWT bearer grant).
    GcpServiceAccount,
    /// `{"tenant_id","client_id","client_secret"}`: keyward gets Entra ID tokens (client
    /// credentials grant).
    AzureEntra,
}

/// Every kind, in the order the README lists them.
pub const ALL_KINDS: &[CredentialKind] = &[
    CredentialKind::ApiKey,
    CredentialKind::AwsAccessKey,
    CredentialKind::AwsAssumeRole,
    CredentialKind::GcpServiceAccount,
    CredentialKind::AzureEntra,
];

impl CredentialKind {
    /// The spelling used by `--kind`, the store, bundles and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "api-key",
            CredentialKind::AwsAccessKey => "aws-access-key",
            CredentialKind::AwsAssumeRole => "aws-assume-role",
            CredentialKind::GcpServiceAccount => "gcp-service-account",
            CredentialKind::AzureEntra => "azure-entra",
        }
    }

    /// True for the kinds whose secret is a JSON document rather than a key.
    pub fn is_document(self) -> bool {
        self != CredentialKind::ApiKey
    }

    /// What the secret on standard input must be, for prompts and errors.
    pub fn expected_input(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "the provider key",
            CredentialKind::AwsAccessKey => concat!(
                r#"{"access_key_id":"AKIA…","secret_access_key":"…","session_token":"…"}"#,
                " (session_token optional)"
            ),
            CredentialKind::AwsAssumeRole => concat!(
                r#"{"role_arn":"arn:aws:iam::ACCOUNT:role/NAME","external_id":"…"}"#,
                " (external_id optional)"
            ),
            CredentialKind::GcpServiceAccount => {
                "the service account JSON key file, as downloaded from the Google Cloud console \
                 (IAM → Service accounts → Keys → Add key → JSON)"
            }
            CredentialKind::AzureEntra => concat!(
                r#"{"tenant_id":"…","client_id":"…","client_secret":"…"}"#,
                " of an Entra ID app registration"
            ),
        }
    }

    /// Checks `secret` against this kind's document rules and returns the masked preview to
    /// store beside it. For a document kind the preview masks its non-secret identifier (access
    /// key id, role ARN, service account email, client id), never a secret field.
    pub fn check(self, secret: &Secret) -> Result<String, KindError> {
        Ok(match self {
            CredentialKind::ApiKey => crate::seal::preview(secret),
            CredentialKind::AwsAccessKey => preview_of(&AwsAccessKey::parse(secret)?.access_key_id),
            CredentialKind::AwsAssumeRole => preview_of(&AwsAssumeRole::parse(secret)?.role_arn),
            CredentialKind::GcpServiceAccount => {
                preview_of(&GcpServiceAccount::parse(secret)?.client_email)
            }
            CredentialKind::AzureEntra => preview_of(&AzureEntra::parse(secret)?.client_id),
        })
    }

    /// Every secret part of a `secret` of this kind that a response must not carry: the key
    /// itself for `api-key`; the secret fields of a document (`whole`), and the base64 lines of a
    /// service account's private key (`fragments`), so that pieces of it are found too. A
    /// document's other fields are not secret, and any echo of the whole document holds one of
    /// these parts. A role to assume holds no secret.
    pub fn secret_parts(self, secret: &Secret) -> SecretParts {
        let mut parts = SecretParts::default();
        match self {
            CredentialKind::ApiKey => parts.whole.push(Secret::from_slice(secret.expose_secret())),
            CredentialKind::AwsAssumeRole => {}
            CredentialKind::AwsAccessKey => {
                if let Ok(doc) = AwsAccessKey::parse(secret) {
                    parts.whole.push(doc.secret_access_key);
                    parts.whole.extend(doc.session_token);
                }
            }
            CredentialKind::GcpServiceAccount => {
                if let Ok(doc) = GcpServiceAccount::parse(secret) {
                    parts.fragments = pem_lines(&doc.private_key_pem);
                }
            }
            CredentialKind::AzureEntra => {
                if let Ok(doc) = AzureEntra::parse(secret) {
                    parts.whole.push(doc.client_secret);
                }
            }
        }
        parts
    }
}

/// The secret parts of a credential (see [`CredentialKind::secret_parts`]), in locked memory.
#[derive(Default)]
pub struct SecretParts {
    /// Secrets a response may carry in any encoding.
    pub whole: Vec<Secret>,
    /// Lines of a private key, found raw or in a JSON string.
    pub fragments: Vec<Secret>,
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--kind` (or stored kind) that is not one of [`ALL_KINDS`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown credential kind `{0}`: use one of {list}", list = kind_list())]
pub struct UnknownKind(pub String);

fn kind_list() -> String {
    ALL_KINDS
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for CredentialKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<CredentialKind, UnknownKind> {
        ALL_KINDS
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.chars().take(64).collect()))
    }
}

/// A secret document that does not fit its kind. The message names the field and the fix,
/// never a value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the {kind} secret {problem}; pipe {expected} on standard input")]
pub struct KindError {
    /// The kind the document was checked against.
    pub kind: CredentialKind,
    /// What is wrong (`is missing field \`client_email\``, ...).
    pub problem: String,
    /// What the input must be.
    expected: &'static str,
}

impl KindError {
    fn new(kind: CredentialKind, problem: impl Into<String>) -> KindError {
        KindError {
            kind,
            problem: problem.into(),
            expected: kind.expected_input(),
        }
    }
}

fn preview_of(identifier: &str) -> String {
    crate::seal::preview(&Secret::from_slice(identifier.as_bytes()))
}

/// A field name as it may appear in an error: printable, short.
fn shown(name: &str) -> String {
    name.chars()
        .take(40)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

// === documents ===

/// A parsed document: its fields by name, to be taken out one by one. The tree lives in the
/// ordinary heap for as long as a parse takes (the binary's allocator wipes freed memory); every
/// secret field is moved into locked memory.
struct Doc {
    kind: CredentialKind,
    fields: Map<String, Value>,
}

impl Doc {
    fn parse(kind: CredentialKind, secret: &Secret) -> Result<Doc, KindError> {
        let fields = match serde_json::from_slice::<Value>(secret.expose_secret()) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(KindError::new(kind, "is not a JSON object")),
            Err(e) => {
                return Err(KindError::new(
                    kind,
                    format!(
                        "is not valid JSON (syntax error at line {} column {})",
                        e.line(),
                        e.column()
                    ),
                ));
            }
        };
        Ok(Doc { kind, fields })
    }

    /// Refuses fields outside `known`, so a misspelt optional field is not silently ignored.
    fn no_unknown(&self, known: &[&str]) -> Result<(), KindError> {
        match self.fields.keys().find(|k| !known.contains(&k.as_str())) {
            Some(extra) => Err(KindError::new(
                self.kind,
                format!(
                    "has an unknown field `{}` (known fields: {})",
                    shown(extra),
                    known.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    fn take(&mut self, name: &str, required: bool) -> Result<Option<String>, KindError> {
        match self.fields.remove(name) {
            None | Some(Value::Null) if required => Err(KindError::new(
                self.kind,
                format!("is missing field `{name}`"),
            )),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => {
                Err(KindError::new(self.kind, format!("has an empty `{name}`")))
            }
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(KindError::new(
                self.kind,
                format!("field `{name}` must be a string"),
            )),
        }
    }

    fn required(&mut self, name: &str) -> Result<String, KindError> {
        Ok(self.take(name, true)?.expect("required fields are present"))
    }

    /// A field that is a secret: moved into locked memory, the heap copy wiped.
    fn secret(&mut self, name: &str, required: bool) -> Result<Option<Secret>, KindError> {
        let Some(text) = self.take(name, required)? else {
            return Ok(None);
        };
        let secret = Secret::from_vec(text.into_bytes());
        if let Some(pos) = secret
            .expose_secret()
            .iter()
            .position(|b| !(0x21..=0x7e).contains(b))
        {
            return Err(KindError::new(
                self.kind,
                format!(
                    "field `{name}` has a space, control or non-ASCII character at position \
                     {pos}; copy the value exactly"
                ),
            ));
        }
        Ok(Some(secret))
    }

    fn fail(&self, problem: impl Into<String>) -> KindError {
        KindError::new(self.kind, problem)
    }
}

impl Drop for Doc {
    fn drop(&mut self) {
        for (_, v) in std::mem::take(&mut self.fields) {
            if let Value::String(mut s) = v {
                s.zeroize();
            }
        }
    }
}

/// The `aws-access-key` document.
pub struct AwsAccessKey {
    /// `AKIA…` or `ASIA…`; not a secret (it names the key).
    pub access_key_id: String,
    /// The signing secret.
    pub secret_access_key: Secret,
    /// STS session token, for temporary credentials.
    pub session_token: Option<Secret>,
}

impl AwsAccessKey {
    /// Parses and checks an `aws-access-key` secret.
    pub fn parse(secret: &Secret) -> Result<AwsAccessKey, KindError> {
        let mut doc = Doc::parse(CredentialKind::AwsAccessKey, secret)?;
        doc.no_unknown(&["access_key_id", "secret_access_key", "session_token"])?;
        let access_key_id = doc.required("access_key_id")?;
        if !(16..=128).contains(&access_key_id.len())
            || !access_key_id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(doc.fail(
                "field `access_key_id` is not an AWS access key id (16-128 upper-case letters \
                 and digits, like AKIA…)",
            ));
        }
        let secret_access_key = doc.secret("secret_access_key", true)?.expect("required");
        let session_token = doc.secret("session_token", false)?;
        Ok(AwsAccessKey {
            access_key_id,
            secret_access_key,
            session_token,
        })
    }
}

/// The `aws-assume-role` document.
pub struct AwsAssumeRole {
    /// `arn:aws:iam::ACCOUNT:role/NAME` (any partition).
    pub role_arn: String,
    /// The external id the role's trust policy asks for.
    pub external_id: Option<String>,
}

impl AwsAssumeRole {
    /// Parses and checks an `aws-assume-role` secret.
    pub fn parse(secret: &Secret) -> Result<AwsAssumeRole, KindError> {
        let mut doc = Doc::parse(CredentialKind::AwsAssumeRole, secret)?;
        doc.no_unknown(&["role_arn", "external_id"])?;
        let role_arn = doc.required("role_arn")?;
        let parts: Vec<&str> = role_arn.splitn(6, ':').collect();
        let valid = parts.len() == 6
            && parts[0] == "arn"
            && parts[1].starts_with("aws")
            && parts[2] == "iam"
            && parts[4].len() == 12
            && parts[4].bytes().all(|b| b.is_ascii_digit())
            && parts[5].starts_with("role/")
            && parts[5].len() > 5
            && role_arn.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(doc.fail(
                "field `role_arn` is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)",
            ));
        }
        let external_id = doc.take("external_id", false)?;
        if let Some(id) = &external_id
            && (!(2..=1224).contains(&id.len())
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+=,.@:/-_".contains(&b)))
        {
            return Err(doc.fail(
                "field `external_id` must be 2-1224 characters of letters, digits and +=,.@:/-_",
            ));
        }
        Ok(AwsAssumeRole {
            role_arn,
            external_id,
        })
    }
}

/// The `gcp-service-account` document: the fields of a Google service account JSON key that
/// the JWT bearer grant needs
/// (<https://developers.google.com/identity/protocols/oauth2/service-account>).
pub struct GcpServiceAccount {
    /// The service account's email: the JWT issuer.
    pub client_email: String,
    /// The key's id, sent as the JWT `kid`.
    pub private_key_id: Option<String>,
    /// The RSA private key, PKCS#8 DER.
    pub private_key_der: Secret,
    /// The private key as given (PEM), for scrubbing.
    pub private_key_pem: Secret,
    /// The OAuth2 token endpoint (`https://oauth2.googleapis.com/token`).
    pub token_uri: String,
    /// The project the key belongs to, when the file names one.
    pub project_id: Option<String>,
}

impl GcpServiceAccount {
    /// Parses and checks a `gcp-service-account` secret, including that its private key is a
    /// usable RSA key.
    pub fn parse(secret: &Secret) -> Result<GcpServiceAccount, KindError> {
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject;

        let mut doc = Doc::parse(CredentialKind::GcpServiceAccount, secret)?;
        match doc.take("type", true)?.as_deref() {
            Some("service_account") => {}
            _ => {
                return Err(doc.fail(
                    "has a `type` other than `service_account` (user credentials and external \
                     account configurations are not service account keys)",
                ));
            }
        }
        let client_email = doc.required("client_email")?;
        if !client_email.contains('@') || !client_email.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(doc.fail("field `client_email` is not an email address"));
        }
        let private_key_id = doc.take("private_key_id", false)?;
        if let Some(id) = &private_key_id
            && !id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(doc.fail("field `private_key_id` must be letters and digits"));
        }
        let token_uri = doc.required("token_uri")?;
        if !token_uri.starts_with("https://") || !token_uri.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(doc.fail("field `token_uri` must be an https:// URL"));
        }
        let project_id = doc.take("project_id", false)?;
        let pem = doc.take("private_key", true)?.expect("required");
        let private_key_pem = Secret::from_vec(pem.into_bytes());
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(private_key_pem.expose_secret()).map_err(|_| {
                doc.fail(
                    "field `private_key` is not a PEM `PRIVATE KEY` (PKCS#8) block; keep the \
                     `\\n` line breaks of the downloaded file",
                )
            })?;
        let private_key_der = Secret::from_slice(der.secret_pkcs8_der());
        drop(der);
        if ring::signature::RsaKeyPair::from_pkcs8(private_key_der.expose_secret()).is_err() {
            return Err(doc.fail("field `private_key` is not a usable RSA private key"));
        }
        Ok(GcpServiceAccount {
            client_email,
            private_key_id,
            private_key_der,
            private_key_pem,
            token_uri,
            project_id,
        })
    }
}

/// The base64 lines of a PEM block (16 characters or more), each a secret on its own.
fn pem_lines(pem: &Secret) -> Vec<Secret> {
    pem.expose_secret()
        .split(|&b| b == b'\n' || b == b'\r')
        .filter(|line| line.len() >= 16 && !line.starts_with(b"-----"))
        .map(Secret::from_slice)
        .collect()
}

/// The `azure-entra` document: an Entra ID app registration's client credentials.
pub struct AzureEntra {
    /// Directory (tenant) id: a GUID or a domain such as `contoso.onmicrosoft.com`.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// Client secret value.
    pub client_secret: Secret,
}

impl AzureEntra {
    /// Parses and checks an `azure-entra` secret.
    pub fn parse(secret: &Secret) -> Result<AzureEntra, KindError> {
        let mut doc = Doc::parse(CredentialKind::AzureEntra, secret)?;
        doc.no_unknown(&["tenant_id", "client_id", "client_secret"])?;
        let tenant_id = doc.required("tenant_id")?;
        // It becomes a path segment of the token URL.
        if tenant_id.len() > 256
            || !tenant_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(doc.fail(
                "field `tenant_id` must be the directory (tenant) id: a GUID or a domain like \
                 contoso.onmicrosoft.com",
            ));
        }
        let client_id = doc.required("client_id")?;
        if client_id.len() > 256
            || !client_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(doc.fail(
                "field `client_id` must be the application (client) id, a GUID like \
                 00000000-0000-0000-0000-000000000000",
            ));
        }
        let client_secret = doc.secret("client_secret", true)?.expect("required");
        Ok(AzureEntra {
            tenant_id,
            client_id,
            client_secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Secret {
        Secret::from_slice(text.as_bytes())
    }

    #[test]
    fn kinds_round_trip_their_spelling() {
        for k in ALL_KINDS {
            assert_eq!(k.as_str().parse::<CredentialKind>().unwrap(), *k);
        }
        let err = "gcp".parse::<CredentialKind>().unwrap_err().to_string();
        assert!(err.contains("gcp-service-account"), "{err}");
    }

    #[test]
    fn document_errors_name_the_field_and_never_the_value() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETzz";
        let id = "AKIAIOSFODNN7EXAMPLE";
        let uri = r#""token_uri":"https://o/t""#;
        let sa = r#""type":"service_account","client_email":"a@b""#;
        let cases = [
            (
                CredentialKind::AwsAccessKey,
                format!(r#"{{"secret_access_key":"{secret}"}}"#),
                "missing field `access_key_id`",
            ),
            (
                CredentialKind::AwsAccessKey,
                format!(r#"{{"access_key_id":"akia{secret}","secret_access_key":"x"}}"#),
                "`access_key_id` is not an AWS access key id",
            ),
            (
                CredentialKind::AwsAccessKey,
                format!(r#"{{"access_key_id":"{id}","secret_access_key":{{"v":"{secret}"}}}}"#),
                "`secret_access_key` must be a string",
            ),
            (
                CredentialKind::AwsAccessKey,
                format!(
                    r#"{{"access_key_id":"{id}","secret_access_key":"{secret}","sesion":"x"}}"#
                ),
                "unknown field `sesion`",
            ),
            (
                CredentialKind::AzureEntra,
                format!(r#"{{"tenant_id":"t","client_id":"c","client_secret":"{secret} "}}"#),
                "`client_secret` has a space",
            ),
            (
                CredentialKind::AzureEntra,
                format!(r#"{{"tenant_id":"a/b","client_id":"c","client_secret":"{secret}"}}"#),
                "`tenant_id` must be the directory",
            ),
            (
                CredentialKind::AwsAssumeRole,
                r#"{"role_arn":"arn:aws:iam::123:user/x"}"#.to_string(),
                "`role_arn` is not an IAM role ARN",
            ),
            (
                CredentialKind::GcpServiceAccount,
                format!(r#"{{"type":"authorized_user","refresh_token":"{secret}"}}"#),
                "`type` other than `service_account`",
            ),
            (
                CredentialKind::GcpServiceAccount,
                format!(r#"{{{sa},{uri},"private_key":"{secret}"}}"#),
                "`private_key` is not a PEM",
            ),
            (
                CredentialKind::AzureEntra,
                format!(r#"{{"client_secret":"{secret}""#),
                "not valid JSON",
            ),
            (
                CredentialKind::AzureEntra,
                format!(r#""{secret}""#),
                "not a JSON object",
            ),
        ];
        for (kind, input, want) in cases {
            let err = kind.check(&s(&input)).unwrap_err().to_string();
            assert!(err.contains(want), "{kind}: {err}");
            assert!(err.contains("standard input"), "{err}");
            assert!(!err.contains(&secret[..12]), "{kind} error leaks: {err}");
        }
    }

    #[test]
    fn previews_mask_the_identifier_not_the_secret() {
        let doc = concat!(
            r#"{"access_key_id":"AKIAIOSFODNN7EXAMPLE","#,
            r#""secret_access_key":"wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY","#,
            r#""session_token":"FwoGZXIvYXdzEJr"}"#
        );
        let preview = CredentialKind::AwsAccessKey.check(&s(doc)).unwrap();
        assert_eq!(preview, "AKIA…MPLE");
        let parts = CredentialKind::AwsAccessKey.secret_parts(&s(doc));
        let parts: Vec<&[u8]> = parts.whole.iter().map(|p| p.expose_secret()).collect();
        assert!(parts.contains(&&b"wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"[..]));
        assert!(parts.contains(&&b"FwoGZXIvYXdzEJr"[..]));
        let entra = concat!(
            r#"{"tenant_id":"contoso.onmicrosoft.com","#,
            r#""client_id":"11111111-2222-3333-4444-555555555555","#,
            r#""client_secret":"Q~abcdefghijklmnop"}"#
        );
        assert_eq!(
            CredentialKind::AzureEntra.check(&s(entra)).unwrap(),
            "1111…5555"
        );
        let role =
            r#"{"role_arn":"arn:aws:iam::123456789012:role/bedrock-invoke","external_id":"kw-1"}"#;
        assert_eq!(
            CredentialKind::AwsAssumeRole.check(&s(role)).unwrap(),
            "arn:…voke"
        );
    }
}
