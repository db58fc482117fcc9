//! Provider targets: the built-in presets (README, "Targets"), config overrides and custom
//! targets, their validation, and the one pure function that prepares upstream request headers
//! and injects a key (pingora's `upstream_request_filter`, without the I/O).
//!
//! What keyward knows about each provider family lives in that family's file: its capability
//! map, where it names the model (path or JSON body), its usage fields and its auth header
//! (`openai`, `anthropic`, `gemini`, `vertex`, `azure`). JSON bodies are read by the one
//! streaming scanner module, [`json_scan`]; responses' token counts by [`usage`].
//!
//! `providers` must not do I/O beyond reading a target's `ca_file` while the config is
//! validated, must not choose credentials, and must never put key bytes in an error, a log line
//! or a `Debug` string.

mod anthropic;
mod azure;
pub mod bedrock;
mod gemini;
pub mod json_scan;
mod openai;
pub mod usage;
mod vertex;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use zeroize::Zeroizing;

use crate::identity::CredentialKind;
use crate::seal::Secret;
use crate::wire::{
    HOP_BY_HOP, MAX_DECODE_PASSES, percent_decode_once, strip_hop_by_hop_and_keyward,
};

/// A `[targets.NAME]` table from the config file: overrides a preset, or defines a target.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Upstream base URL (`https://host[:port][/prefix]`).
    pub base_url: Option<String>,
    /// Header the key goes into.
    pub auth_header: Option<String>,
    /// Header value template containing `{key}`.
    pub auth_format: Option<String>,
    /// How model and capability are read: openai|anthropic|gemini|azure|none.
    pub family: Option<String>,
    /// Extra PEM CA bundle trusted for this target (and for its STS endpoint).
    pub ca_file: Option<PathBuf>,
    /// Vertex AI region (`us-central1`, `europe-west4`, `global`): the base URL becomes
    /// `https://{location}-aiplatform.googleapis.com`.
    pub location: Option<String>,
    /// OAuth2 token URL for `gcp-service-account` credentials, instead of the key file's
    /// `token_uri` (a VPC endpoint, a test server); https only.
    pub token_url: Option<String>,
    /// Entra ID authority for `azure-entra` credentials (`https://login.microsoftonline.us`,
    /// `https://login.chinacloudapi.cn`, ...; default the public cloud's); https only.
    pub authority: Option<String>,
    /// AWS region of a `bedrock` target (SigV4 signing, and the default base URL).
    pub region: Option<String>,
    /// STS endpoint for `aws-assume-role` credentials of a `bedrock` target
    /// (`https://HOST[:PORT]`; default `https://sts.{region}.amazonaws.com`).
    pub sts_endpoint: Option<String>,
}

/// How a target's requests are read for model and capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// OpenAI-compatible: model in the JSON body.
    OpenAi,
    /// Anthropic Messages API: model in the JSON body.
    Anthropic,
    /// Google Gemini: model in the path (`/v1beta/models/{model}:{method}`).
    Gemini,
    /// Vertex AI: publisher model in the path
    /// (`/v1/projects/{p}/locations/{l}/publishers/{publisher}/models/{model}:{method}`).
    Vertex,
    /// Azure OpenAI: deployment in the path (`/openai/deployments/{deployment}/...`).
    Azure,
    /// Amazon Bedrock runtime: model id in the path (`/model/{modelId}/{method}`), requests
    /// signed with SigV4.
    Bedrock,
    /// Opaque upstream: no model, capability `other`.
    None,
}

impl Family {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::OpenAi => "openai",
            Family::Anthropic => "anthropic",
            Family::Gemini => "gemini",
            Family::Vertex => "vertex",
            Family::Azure => "azure",
            Family::Bedrock => "bedrock",
            Family::None => "none",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A family name that is not one of openai|anthropic|gemini|azure|none.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown family `{0}`: use one of openai, anthropic, gemini, vertex, azure, none, bedrock")]
pub struct UnknownFamily(pub String);

impl FromStr for Family {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Family, UnknownFamily> {
        Ok(match s {
            "openai" => Family::OpenAi,
            "anthropic" => Family::Anthropic,
            "gemini" => Family::Gemini,
            "vertex" => Family::Vertex,
            "azure" => Family::Azure,
            "bedrock" => Family::Bedrock,
            "none" => Family::None,
            other => return Err(UnknownFamily(other.to_string())),
        })
    }
}

// === capability and model, per family ===

/// What a request does, in the vocabulary of the README ("Targets").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// Chat-style generation (chat/completions, responses, messages, generateContent).
    Chat,
    /// Legacy text completions.
    Completions,
    /// Embeddings.
    Embeddings,
    /// Image generation and editing.
    Images,
    /// Speech and transcription.
    Audio,
    /// Moderation.
    Moderations,
    /// Listing or reading models.
    Models,
    /// File upload and management.
    Files,
    /// Batch jobs.
    Batches,
    /// Fine-tuning jobs.
    FineTuning,
    /// Token counting.
    Tokens,
    /// Anything else.
    Other,
}

/// Every capability, in vocabulary order.
pub const ALL_CAPABILITIES: [Capability; 12] = [
    Capability::Chat,
    Capability::Completions,
    Capability::Embeddings,
    Capability::Images,
    Capability::Audio,
    Capability::Moderations,
    Capability::Models,
    Capability::Files,
    Capability::Batches,
    Capability::FineTuning,
    Capability::Tokens,
    Capability::Other,
];

impl Capability {
    /// The vocabulary spelling (`fine_tuning`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Chat => "chat",
            Capability::Completions => "completions",
            Capability::Embeddings => "embeddings",
            Capability::Images => "images",
            Capability::Audio => "audio",
            Capability::Moderations => "moderations",
            Capability::Models => "models",
            Capability::Files => "files",
            Capability::Batches => "batches",
            Capability::FineTuning => "fine_tuning",
            Capability::Tokens => "tokens",
            Capability::Other => "other",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A capability name outside the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown capability `{0}`: use one of chat, completions, embeddings, images, audio, \
     moderations, models, files, batches, fine_tuning, tokens, other"
)]
pub struct UnknownCapability(pub String);

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Capability, UnknownCapability> {
        ALL_CAPABILITIES
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCapability(s.to_string()))
    }
}

/// Where a request's model is named, for a family and provider path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// In the path (Gemini model, Azure deployment).
    Path(String),
    /// In the JSON body's top-level `"model"`: feed the body to a [`json_scan::ModelScanner`].
    JsonBody,
    /// This family or endpoint names no model.
    Unknown,
}

/// Splits a provider path into its non-empty segments.
fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Percent-decodes a path segment naming a model; `None` if it is malformed or empty.
fn percent_decode(s: &str) -> Option<String> {
    let out = percent_decode_once(s.as_bytes(), true, false)?;
    String::from_utf8(out).ok().filter(|m| !m.is_empty())
}

/// Where the model of a request to `provider_path` is found for `family`.
pub fn model_source(family: Family, provider_path: &str) -> ModelSource {
    let segs = segments(provider_path);
    match family {
        Family::OpenAi => openai::model_source(&segs),
        Family::Anthropic => anthropic::model_source(&segs),
        Family::Gemini => gemini::model_source(&segs),
        Family::Vertex => vertex::model_source(&segs),
        Family::Azure => azure::model_source(&segs),
        Family::Bedrock => bedrock::model_source(&segs),
        Family::None => ModelSource::Unknown,
    }
}

/// The model named in the path (Gemini model, Azure deployment), if this family puts it there.
pub fn model_from_path(family: Family, provider_path: &str) -> Option<String> {
    match model_source(family, provider_path) {
        ModelSource::Path(m) => Some(m),
        _ => None,
    }
}

/// The capability a request to `provider_path` exercises for `family`.
pub fn capability(family: Family, provider_path: &str) -> Capability {
    let segs = segments(provider_path);
    match family {
        Family::None => Capability::Other,
        Family::OpenAi => openai::capability(&segs),
        Family::Anthropic => anthropic::capability(&segs),
        Family::Gemini => gemini::capability(&segs),
        Family::Vertex => vertex::capability(&segs),
        Family::Azure => azure::capability(&segs),
        Family::Bedrock => bedrock::capability(&segs),
    }
}

/// The provider path (with its query) of the cheapest read-only call a `family` target
/// answers, for `keyward cred test` (README, "Testing a credential"): a models list where the
/// API has one. `None` for the `none` family, whose API keyward does not know.
///
/// A target whose base URL already ends in `/v1` (a custom OpenAI-compatible server configured
/// as `https://host/v1`) is asked for `/models`, so the prefix is not doubled.
pub fn test_path(target: &Target) -> Option<&'static str> {
    match target.family {
        Family::OpenAi if target.upstream.path_prefix.ends_with("/v1") => Some("/models"),
        Family::OpenAi => Some(openai::TEST_PATH),
        Family::Anthropic => Some(anthropic::TEST_PATH),
        Family::Gemini => Some(gemini::TEST_PATH),
        Family::Vertex => Some(vertex::TEST_PATH),
        Family::Azure => Some(azure::TEST_PATH),
        Family::Bedrock => Some(bedrock::TEST_PATH),
        Family::None => None,
    }
}

// === targets ===

/// Where a target's requests go. Only these parts ever decide the upstream scheme, host and
/// port; the request contributes nothing but a validated path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` (loopback only) or `https`.
    pub scheme: Scheme,
    /// `host[:port]` exactly as configured (the port is omitted when it is the default).
    pub authority: Authority,
    /// Host name or IP address without IPv6 brackets, for TLS server name checks.
    pub host: String,
    /// Port to connect to (the scheme default when the URL gives none).
    pub port: u16,
    /// Path prefix without a trailing slash (`""` or `/openai`, `/api`, ...).
    pub path_prefix: String,
}

impl Upstream {
    /// Whether the connection uses TLS.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

/// How the key is presented to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    /// The key goes into `header` as `prefix{key}suffix`.
    Header {
        /// Header name (lowercase).
        header: HeaderName,
        /// Template text before `{key}`.
        prefix: String,
        /// Template text after `{key}`.
        suffix: String,
    },
    /// The request is signed with AWS Signature Version 4 (`bedrock` targets).
    SigV4 {
        /// Signing name of the service (`bedrock`).
        service: &'static str,
        /// AWS region (`us-east-1`).
        region: String,
        /// STS endpoint for assumed roles.
        sts_endpoint: String,
    },
    /// The upstream takes no key (e.g. a local ollama).
    None,
}

/// One upstream keyward can reach, fully validated.
#[derive(Debug, Clone)]
pub struct Target {
    /// The name used in request paths (`/{name}/...`) and credentials.
    pub name: String,
    /// Scheme, authority and path prefix of the upstream.
    pub upstream: Upstream,
    /// How the key is injected.
    pub auth: AuthScheme,
    /// How model and capability are read.
    pub family: Family,
    /// Extra PEM CA bundle trusted for this target, besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Headers added when the app did not send them.
    pub default_headers: Vec<(HeaderName, HeaderValue)>,
    /// OAuth2 token URL for service account credentials (`token_url`).
    pub token_url: Option<String>,
    /// Entra ID authority for `azure-entra` credentials (`authority`).
    pub authority: Option<String>,
}

/// Every target keyward can reach: presets merged with the config's `[targets.*]`.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// Usable targets by name.
    by_name: BTreeMap<String, Target>,
    /// Presets that exist but need configuration before use, with the reason.
    unconfigured: BTreeMap<String, String>,
}

/// A `[targets.*]` entry that cannot be used; `key` is the dotted config key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TargetConfigError {
    /// Dotted config key, e.g. `targets.azure-openai.base_url`.
    pub key: String,
    /// What is wrong and what is expected.
    pub reason: String,
}

/// Why a request's target name cannot be served.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TargetLookupError {
    /// No preset or configured target has this name.
    #[error(
        "unknown target `{name}`: use a preset ({presets}) or define [targets.{name}] in the config"
    )]
    Unknown {
        /// The requested name.
        name: String,
        /// The preset names, comma-separated.
        presets: String,
    },
    /// A preset that cannot be used until the config completes it.
    #[error("target `{name}` is not configured: {reason}")]
    NotConfigured {
        /// The requested name.
        name: String,
        /// What the operator must add.
        reason: String,
    },
}

/// The key could not be injected. Never carries key bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// The stored key contains bytes that cannot appear in an HTTP header value.
    #[error(
        "the credential for target `{target}` contains bytes that are not allowed in the \
         `{header}` header (control characters or newlines); rotate it with the exact key text"
    )]
    InvalidKeyBytes {
        /// The target name.
        target: String,
        /// The auth header name.
        header: String,
    },
    /// A SigV4 signature could not be made (never carries key bytes).
    #[error(
        "the request for target `{target}` could not be signed with SigV4: {reason}; check the \
         credential with `keyward cred list` and rotate it if its fields are wrong"
    )]
    Signing {
        /// The target name.
        target: String,
        /// What failed.
        reason: String,
    },
}

// === impl Targets ===

/// `(name, base_url, auth header, auth format, family)`; `None` base URL means it must be
/// configured.
type Preset = (
    &'static str,
    Option<&'static str>,
    Option<(&'static str, &'static str)>,
    Family,
);

const BEARER: Option<(&str, &str)> = openai::AUTH;

/// The built-in presets (README, "Targets").
const PRESETS: &[Preset] = &[
    (
        "openai",
        Some("https://api.openai.com"),
        BEARER,
        Family::OpenAi,
    ),
    (
        "anthropic",
        Some("https://api.anthropic.com"),
        anthropic::AUTH,
        Family::Anthropic,
    ),
    (
        "gemini",
        Some("https://generativelanguage.googleapis.com"),
        gemini::AUTH,
        Family::Gemini,
    ),
    ("vertex", None, vertex::AUTH, Family::Vertex),
    ("azure-openai", None, azure::AUTH, Family::Azure),
    (
        "mistral",
        Some("https://api.mistral.ai"),
        BEARER,
        Family::OpenAi,
    ),
    (
        "cohere",
        Some("https://api.cohere.com"),
        BEARER,
        Family::OpenAi,
    ),
    (
        "groq",
        Some("https://api.groq.com/openai"),
        BEARER,
        Family::OpenAi,
    ),
    (
        "openrouter",
        Some("https://openrouter.ai/api"),
        BEARER,
        Family::OpenAi,
    ),
    (
        "deepseek",
        Some("https://api.deepseek.com"),
        BEARER,
        Family::OpenAi,
    ),
    ("xai", Some("https://api.x.ai"), BEARER, Family::OpenAi),
    (
        "together",
        Some("https://api.together.xyz"),
        BEARER,
        Family::OpenAi,
    ),
    (
        "ollama",
        Some("http://127.0.0.1:11434"),
        None,
        Family::OpenAi,
    ),
];

/// The preset whose base URL follows from its `region` (README, "Bedrock").
const BEDROCK: &str = "bedrock";

const AZURE_HINT: &str = "set it to https://YOUR-RESOURCE.openai.azure.com";
const VERTEX_HINT: &str =
    "or set location = \"us-central1\" (the region of your Vertex AI endpoint)";

/// `https://{location}-aiplatform.googleapis.com` (`https://aiplatform.googleapis.com` for
/// `global`), for a location of lower-case letters, digits and dashes.
fn vertex_base_url(location: &str) -> Result<String, TargetConfigError> {
    let valid = !location.is_empty()
        && location.len() <= 40
        && location
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(err(
            "vertex",
            "location",
            format!(
                "`{}` is not a Vertex AI location; write it like \"us-central1\" or \"global\"",
                location.escape_debug()
            ),
        ));
    }
    Ok(if location == "global" {
        "https://aiplatform.googleapis.com".into()
    } else {
        format!("https://{location}-aiplatform.googleapis.com")
    })
}

/// Checks and copies `token_url` and `authority`: https URLs without query or user info.
fn token_endpoints(
    name: &str,
    spec: &TargetSpec,
    target: &mut Target,
) -> Result<(), TargetConfigError> {
    for (field, value, slot) in [
        ("token_url", &spec.token_url, &mut target.token_url),
        ("authority", &spec.authority, &mut target.authority),
    ] {
        let Some(url) = value else { continue };
        let upstream = parse_base_url(url).map_err(|r| err(name, field, r))?;
        if !upstream.is_https() {
            return Err(err(
                name,
                field,
                format!("`{url}` must be an https URL: tokens are fetched over verified TLS only"),
            ));
        }
        *slot = Some(url.trim_end_matches('/').to_string());
    }
    Ok(())
}

impl Targets {
    /// Merges presets with config overrides and custom targets, validating each.
    pub fn resolve(specs: &BTreeMap<String, TargetSpec>) -> Result<Targets, TargetConfigError> {
        let mut targets = Targets::default();
        for &(name, base, auth, family) in PRESETS {
            let spec = specs.get(name);
            let located = match spec.and_then(|s| s.location.as_deref()) {
                Some(location) if family == Family::Vertex => Some(vertex_base_url(location)?),
                Some(_) => {
                    return Err(err(
                        name,
                        "location",
                        "location applies to the vertex target only".into(),
                    ));
                }
                None => None,
            };
            let base_url = spec
                .and_then(|s| s.base_url.clone())
                .or(located)
                .or(base.map(str::to_string));
            let hint = if family == Family::Vertex {
                VERTEX_HINT
            } else {
                AZURE_HINT
            };
            let Some(base_url) = base_url else {
                if spec.is_some() {
                    return Err(err(
                        name,
                        "base_url",
                        format!("target `{name}` has no default base URL; {hint}"),
                    ));
                }
                targets.unconfigured.insert(
                    name.to_string(),
                    format!("add [targets.{name}] with base_url; {hint}"),
                );
                continue;
            };
            let spec = spec.cloned().unwrap_or_default();
            let auth = match (
                spec.auth_header.as_deref(),
                spec.auth_format.as_deref(),
                auth,
            ) {
                (None, None, preset) => preset.map(|(h, f)| (h.to_string(), f.to_string())),
                (Some(h), Some(f), _) => Some((h.to_string(), f.to_string())),
                (Some(h), None, Some((_, f))) => Some((h.to_string(), f.to_string())),
                (None, Some(f), Some((h, _))) => Some((h.to_string(), f.to_string())),
                (Some(_), None, None) | (None, Some(_), None) => {
                    return Err(err(
                        name,
                        "auth_header",
                        format!(
                            "target `{name}` sends no key by default; give both auth_header \
                             and auth_format to add one"
                        ),
                    ));
                }
            };
            let family = match &spec.family {
                None => family,
                Some(f) => parse_family(name, f)?,
            };
            let mut target = build(name, &base_url, auth, family, &spec)?;
            token_endpoints(name, &spec, &mut target)?;
            targets.by_name.insert(name.to_string(), target);
        }
        match specs.get(BEDROCK) {
            None => {
                targets.unconfigured.insert(
                    BEDROCK.to_string(),
                    format!(
                        "add [targets.{BEDROCK}] with region; {}",
                        bedrock::REGION_HINT
                    ),
                );
            }
            Some(spec) => {
                let family = match &spec.family {
                    None => Family::Bedrock,
                    Some(f) => parse_family(BEDROCK, f)?,
                };
                if family == Family::Bedrock && spec.region.is_some() {
                    // A bad region would otherwise surface as a bad base URL.
                    bedrock::signing_config(spec)
                        .map_err(|(field, reason)| err(BEDROCK, field, reason))?;
                }
                let regional = spec.region.as_deref().map(bedrock::default_base_url);
                let Some(base_url) = spec.base_url.as_deref().or(regional.as_deref()) else {
                    return Err(err(BEDROCK, "region", bedrock::REGION_HINT.into()));
                };
                let auth = match (spec.auth_header.as_deref(), spec.auth_format.as_deref()) {
                    (Some(h), Some(f)) => Some((h.to_string(), f.to_string())),
                    _ => None,
                };
                let target = build(BEDROCK, base_url, auth, family, spec)?;
                targets.by_name.insert(BEDROCK.to_string(), target);
            }
        }
        for (name, spec) in specs {
            if is_preset(name) {
                continue;
            }
            validate_name(name)?;
            let Some(base_url) = spec.base_url.as_deref() else {
                return Err(err(
                    name,
                    "base_url",
                    format!(
                        "custom target `{name}` needs base_url, like \
                         \"https://llm.internal.example/v1\""
                    ),
                ));
            };
            let auth = match (spec.auth_header.as_deref(), spec.auth_format.as_deref()) {
                (None, None) => None,
                (Some(h), Some(f)) => Some((h.to_string(), f.to_string())),
                (Some(_), None) => {
                    return Err(err(
                        name,
                        "auth_format",
                        "auth_header is set but auth_format is missing; add e.g. \
                         auth_format = \"Bearer {key}\" (or remove both for no key)"
                            .into(),
                    ));
                }
                (None, Some(_)) => {
                    return Err(err(
                        name,
                        "auth_header",
                        "auth_format is set but auth_header is missing; add e.g. \
                         auth_header = \"Authorization\" (or remove both for no key)"
                            .into(),
                    ));
                }
            };
            let family = match &spec.family {
                None => Family::None,
                Some(f) => parse_family(name, f)?,
            };
            if spec.location.is_some() {
                return Err(err(
                    name,
                    "location",
                    "location applies to the vertex preset only; give base_url".into(),
                ));
            }
            let mut target = build(name, base_url, auth, family, spec)?;
            token_endpoints(name, spec, &mut target)?;
            targets.by_name.insert(name.clone(), target);
        }
        Ok(targets)
    }

    /// The target called `name`, if it is usable.
    pub fn get(&self, name: &str) -> Option<&Target> {
        self.by_name.get(name)
    }

    /// The target called `name`, or an error that tells the app (or operator) what is wrong.
    pub fn lookup(&self, name: &str) -> Result<&Target, TargetLookupError> {
        if let Some(t) = self.by_name.get(name) {
            return Ok(t);
        }
        if let Some(reason) = self.unconfigured.get(name) {
            return Err(TargetLookupError::NotConfigured {
                name: name.to_string(),
                reason: reason.clone(),
            });
        }
        Err(TargetLookupError::Unknown {
            name: name.chars().take(64).collect(),
            presets: PRESETS
                .iter()
                .map(|p| p.0)
                .chain([BEDROCK])
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Every usable target, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.by_name.values()
    }
}

/// The credential kinds a target's requests can be authorized with (README, "Credential
/// kinds"), decided by its family: SigV4 kinds for `bedrock`, service accounts for `vertex`,
/// Entra ID besides keys for `azure`, keys everywhere else.
pub fn accepted_kinds(target: &Target) -> &'static [CredentialKind] {
    use CredentialKind::*;
    match target.family.as_str() {
        "bedrock" => &[AwsAccessKey, AwsAssumeRole],
        "vertex" => &[GcpServiceAccount],
        "azure" => &[ApiKey, AzureEntra],
        _ => &[ApiKey],
    }
}

/// Refuses a credential of `kind` for `target` with the kinds it does take.
pub fn check_kind(target: &Target, kind: CredentialKind) -> Result<(), String> {
    let accepted = accepted_kinds(target);
    if accepted.contains(&kind) {
        return Ok(());
    }
    let names: Vec<&str> = accepted.iter().map(|k| k.as_str()).collect();
    Err(format!(
        "target `{}` (family {}) does not take {kind} credentials; use --kind {}",
        target.name,
        target.family,
        names.join(" or --kind ")
    ))
}

/// Whether `name` is a built-in preset (usable or not).
pub fn is_preset(name: &str) -> bool {
    PRESETS.iter().any(|p| p.0 == name) || name == BEDROCK
}

fn err(name: &str, field: &str, reason: String) -> TargetConfigError {
    TargetConfigError {
        key: format!("targets.{name}.{field}"),
        reason,
    }
}

fn parse_family(name: &str, family: &str) -> Result<Family, TargetConfigError> {
    family
        .parse()
        .map_err(|e: UnknownFamily| err(name, "family", e.to_string()))
}

/// Target names: 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit.
/// The route check uses the same rule, so a request can only name a target that could exist.
pub fn is_target_name(name: &str) -> bool {
    name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn validate_name(name: &str) -> Result<(), TargetConfigError> {
    if is_target_name(name) {
        Ok(())
    } else {
        Err(TargetConfigError {
            key: format!("targets.{name}"),
            reason: format!(
                "target name `{name}` must be 1-64 characters of a-z, 0-9, '.', '_', '-' and \
                 start with a letter or digit"
            ),
        })
    }
}

fn build(
    name: &str,
    base_url: &str,
    auth: Option<(String, String)>,
    family: Family,
    spec: &TargetSpec,
) -> Result<Target, TargetConfigError> {
    let ca_file = spec.ca_file.clone();
    let upstream = parse_base_url(base_url).map_err(|reason| err(name, "base_url", reason))?;
    if family != Family::Bedrock {
        for (field, set) in [
            ("region", spec.region.is_some()),
            ("sts_endpoint", spec.sts_endpoint.is_some()),
        ] {
            if set {
                return Err(err(
                    name,
                    field,
                    format!("{field} only applies to family = \"bedrock\" targets; remove it"),
                ));
            }
        }
    }
    let auth = match auth {
        None if family == Family::Bedrock => {
            let (region, sts_endpoint) = bedrock::signing_config(spec)
                .map_err(|(field, reason)| err(name, field, reason))?;
            AuthScheme::SigV4 {
                service: bedrock::SIGNING_NAME,
                region,
                sts_endpoint,
            }
        }
        Some(_) if family == Family::Bedrock => {
            return Err(err(
                name,
                "auth_header",
                "bedrock targets sign each request with SigV4; remove auth_header and \
                 auth_format"
                    .into(),
            ));
        }
        None => AuthScheme::None,
        Some((header, format)) => {
            let header = parse_auth_header(&header).map_err(|r| err(name, "auth_header", r))?;
            let (prefix, suffix) =
                parse_auth_format(&format).map_err(|r| err(name, "auth_format", r))?;
            AuthScheme::Header {
                header,
                prefix,
                suffix,
            }
        }
    };
    if let Some(path) = &ca_file {
        check_ca_file(path).map_err(|r| err(name, "ca_file", r))?;
    }
    let family_headers: &[(&str, &str)] = match family {
        Family::Anthropic => anthropic::DEFAULT_HEADERS,
        _ => &[],
    };
    let default_headers = family_headers
        .iter()
        .map(|&(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
        .collect();
    Ok(Target {
        name: name.to_string(),
        upstream,
        auth,
        family,
        ca_file,
        default_headers,
        token_url: None,
        authority: None,
    })
}

/// Parses and checks a base URL; the error is the reason, for `targets.NAME.base_url`.
fn parse_base_url(text: &str) -> Result<Upstream, String> {
    let example = "write it like https://host[:port][/path]";
    if text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!(
            "`{text}` contains spaces or control characters; {example}"
        ));
    }
    if text.contains('?') || text.contains('#') {
        return Err(format!(
            "`{text}` has a query or fragment; a base URL may only have scheme, host, port and \
             path"
        ));
    }
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("`{text}` is not a URL ({e}); {example}"))?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::HTTPS,
        Some("http") => Scheme::HTTP,
        Some(other) => {
            return Err(format!(
                "scheme `{other}` is not supported; use https (or http for a loopback host)"
            ));
        }
        None => return Err(format!("`{text}` has no scheme; {example}")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{text}` has no host; {example}"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{text}` contains user information (`user@`); put credentials in keyward, not in \
             the URL"
        ));
    }
    let host_raw = authority.host();
    if host_raw.is_empty() {
        return Err(format!("`{text}` has no host; {example}"));
    }
    let host = host_raw
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host_raw)
        .to_string();
    let port = match authority.port_u16() {
        Some(p) => p,
        None if authority.as_str().ends_with(':') => {
            return Err(format!("`{text}` has an empty port; {example}"));
        }
        None if scheme == Scheme::HTTPS => 443,
        None => 80,
    };
    if port == 0 {
        return Err(format!("`{text}` has port 0; give a real port"));
    }
    if scheme == Scheme::HTTP && !is_loopback_host(&host) {
        return Err(format!(
            "http is only allowed for loopback hosts (127.0.0.0/8, ::1, localhost), so a key \
             never crosses the network in cleartext; use https://{}",
            authority.as_str()
        ));
    }
    if scheme == Scheme::HTTPS && rustls_pki_types::ServerName::try_from(host.as_str()).is_err() {
        return Err(format!(
            "`{host}` is not a valid host name or IP address for TLS"
        ));
    }
    let path = uri.path();
    let prefix = path.trim_end_matches('/');
    if !prefix.is_empty() {
        for seg in prefix[1..].split('/') {
            if seg.is_empty() || seg.bytes().all(|b| b == b'.') {
                return Err(format!(
                    "path `{path}` has an empty, `.` or `..` segment; write the path plainly"
                ));
            }
            if seg.contains(['%', '\\']) {
                return Err(format!(
                    "path `{path}` contains `%` or `\\`; write the path without encoding"
                ));
            }
        }
    }
    Ok(Upstream {
        scheme,
        authority,
        host,
        port,
        path_prefix: prefix.to_string(),
    })
}

/// Loopback hosts are the only ones a key may reach over cleartext http.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Headers the data plane strips or owns: the key must not be injected into any of them.
fn is_reserved_header(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
        || matches!(name.as_str(), "host" | "content-length" | "accept-encoding")
        || name.as_str().starts_with("keyward-")
}

fn parse_auth_header(text: &str) -> Result<HeaderName, String> {
    let header = HeaderName::from_bytes(text.as_bytes()).map_err(|_| {
        format!("`{text}` is not a valid HTTP header name (letters, digits and -, no spaces)")
    })?;
    if is_reserved_header(&header) {
        return Err(format!(
            "`{text}` is a connection-level or keyward header and cannot carry a key; use e.g. \
             Authorization"
        ));
    }
    Ok(header)
}

fn parse_auth_format(text: &str) -> Result<(String, String), String> {
    let mut parts = text.split("{key}");
    let (Some(prefix), Some(suffix), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "`{text}` must contain `{{key}}` exactly once, like \"Bearer {{key}}\""
        ));
    };
    if HeaderValue::from_str(&format!("{prefix}x{suffix}")).is_err() {
        return Err(format!(
            "`{text}` contains characters not allowed in a header value (control characters \
             or non-ASCII)"
        ));
    }
    Ok((prefix.to_string(), suffix.to_string()))
}

fn check_ca_file(path: &std::path::Path) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let shown = path.display();
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read CA file {shown}: {e}"))?;
    let mut count = 0usize;
    for cert in iter {
        cert.map_err(|e| format!("CA file {shown} is not valid PEM: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!(
            "CA file {shown} holds no certificate; it must contain at least one \
             -----BEGIN CERTIFICATE----- block"
        ));
    }
    Ok(())
}

// === injection ===

/// Every header an SDK may carry its own credential in.
const CLIENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
];

/// Headers by which a front proxy tells a backend where a request came from or where to route
/// it, and the URL and method overrides some frameworks honour. The app is not a proxy: a
/// gateway in front of a custom target could route on them and take the key to another backend
/// or another method. Listed in the README; every name starting with a prefix in
/// [`FORWARDING_PREFIXES`] goes too.
pub const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "via",
    "x-real-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "cf-connecting-ipv6",
    "fastly-client-ip",
    "x-proxyuser-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "client-ip",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-original-uri",
    "x-original-method",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-http-host-override",
];

/// Prefixes of forwarding and proxy-routing header families (`X-Forwarded-For`, `-Host`,
/// `-Proto`, `-Prefix`, ...; Envoy's `x-envoy-original-path`, `x-envoy-internal`, ...).
pub const FORWARDING_PREFIXES: &[&str] = &["x-forwarded-", "x-envoy-"];

/// True for a header in [`FORWARDING_HEADERS`] or with a prefix in [`FORWARDING_PREFIXES`].
pub fn is_forwarding_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    FORWARDING_HEADERS.contains(&name) || FORWARDING_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Makes `headers` fit to send upstream: removes app credentials, hop-by-hop headers, `Host`,
/// `Accept-Encoding`, forwarding and override headers ([`is_forwarding_header`]) and
/// `keyward-*` headers, adds the target's default headers when absent,
/// and puts `key` into the target's auth header marked sensitive.
///
/// This is the one place the key is exposed on the request path: it has to become header bytes.
pub fn prepare_upstream_headers(
    target: &Target,
    headers: &mut HeaderMap,
    key: &Secret,
) -> Result<(), InjectError> {
    prepare_upstream_headers_as(target, &target.auth, headers, key)
}

/// `Authorization: Bearer {key}`: how every target takes an OAuth2 access token.
pub fn bearer_auth() -> AuthScheme {
    AuthScheme::Header {
        header: http::header::AUTHORIZATION,
        prefix: "Bearer ".into(),
        suffix: String::new(),
    }
}

/// [`prepare_upstream_headers`] with `auth` instead of the target's own scheme: an access
/// token derived from a credential goes in as [`bearer_auth`] whatever header the target takes
/// keys in.
pub fn prepare_upstream_headers_as(
    target: &Target,
    auth: &AuthScheme,
    headers: &mut HeaderMap,
    key: &Secret,
) -> Result<(), InjectError> {
    strip_client_headers(headers);
    for (name, value) in &target.default_headers {
        if !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    if let AuthScheme::Header {
        header,
        prefix,
        suffix,
    } = auth
    {
        let raw = key.expose_secret();
        let mut buf = Zeroizing::new(Vec::with_capacity(prefix.len() + raw.len() + suffix.len()));
        buf.extend_from_slice(prefix.as_bytes());
        buf.extend_from_slice(raw);
        buf.extend_from_slice(suffix.as_bytes());
        // The error from `http` holds no bytes, but build ours anyway so nothing of the key can
        // ever travel with it.
        let mut value =
            HeaderValue::from_bytes(&buf).map_err(|_| InjectError::InvalidKeyBytes {
                target: target.name.clone(),
                header: header.as_str().to_string(),
            })?;
        value.set_sensitive(true);
        headers.insert(header.clone(), value);
    }
    Ok(())
}

/// AWS credentials a request is signed with: a stored `aws-access-key` or the session
/// credentials of an assumed role.
pub struct AwsSigningKey<'a> {
    /// `AKIA…` / `ASIA…` (not a secret).
    pub access_key_id: &'a str,
    /// The signing secret.
    pub secret_access_key: &'a Secret,
    /// The STS session token of temporary credentials.
    pub session_token: Option<&'a Secret>,
}

/// The headers an AWS SDK adds to prove its own signature: they describe the app's signing
/// (with its client token as access key id) and never reach the upstream.
const AWS_AUTH_HEADERS: &[&str] = &["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

/// [`prepare_upstream_headers`] for SigV4 targets: strips what the app must not pass on
/// (including its own `Authorization` and `x-amz-date`, `x-amz-security-token`,
/// `x-amz-content-sha256`) and adds a fresh SigV4 signature (`authorization`, `x-amz-date`,
/// `x-amz-security-token` for session credentials; the first and last marked sensitive) over
/// `method`, `uri` (the upstream URI; the path is URI-encoded once more in the canonical
/// request, as AWS computes it for every service but S3), `host`, `content-type`, the other
/// `x-amz*` headers, and `body_sha256` (hex SHA-256 of the whole body), at `time`.
///
/// This is one of the two places a stored secret is exposed on the request path: SigV4 derives
/// its signing key from it.
pub fn prepare_signed_headers(
    target: &Target,
    method: &http::Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    body_sha256: &str,
    key: &AwsSigningKey<'_>,
    time: std::time::SystemTime,
) -> Result<(), InjectError> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let AuthScheme::SigV4 {
        service, region, ..
    } = &target.auth
    else {
        return Err(signing_error(target, "the target is not a SigV4 target"));
    };
    strip_client_headers(headers);
    for name in AWS_AUTH_HEADERS {
        headers.remove(*name);
    }
    let signed: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(n, _)| n.as_str() == "content-type" || n.as_str().starts_with("x-amz"))
        .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))
        .collect();
    let secret = Zeroizing::new(
        String::from_utf8(key.secret_access_key.expose_secret().to_vec())
            .map_err(|_| signing_error(target, "the secret access key is not UTF-8"))?,
    );
    let token = match key.session_token {
        Some(t) => Some(Zeroizing::new(
            String::from_utf8(t.expose_secret().to_vec())
                .map_err(|_| signing_error(target, "the session token is not UTF-8"))?,
        )),
        None => None,
    };
    let identity = aws_credential_types::Credentials::new(
        key.access_key_id,
        secret.as_str(),
        token.as_ref().map(|t| t.to_string()),
        None,
        "keyward",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| signing_error(target, &e.to_string()))?
        .into();
    let request = SignableRequest::new(
        method.as_str(),
        uri.to_string(),
        signed.into_iter(),
        SignableBody::Precomputed(body_sha256.to_string()),
    )
    .map_err(|e| signing_error(target, &e.to_string()))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| signing_error(target, &e.to_string()))?
        .into_parts();
    for (name, value) in instructions.headers() {
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| signing_error(target, "the signature is not a header value"))?;
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| signing_error(target, "the signature header name is invalid"))?;
        if name != "x-amz-date" {
            value.set_sensitive(true);
        }
        headers.insert(name, value);
    }
    Ok(())
}

fn signing_error(target: &Target, reason: &str) -> InjectError {
    InjectError::Signing {
        target: target.name.clone(),
        reason: reason.to_string(),
    }
}

/// Removes everything an app must not pass through to an upstream (README, "What an app cannot
/// do").
fn strip_client_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop_and_keyward(headers);
    // One pass over the names present (stored lowercase, as the lists are written) instead of
    // a lookup per listed name.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            is_forwarding_header(n)
                || matches!(n.as_str(), "host" | "accept-encoding")
                || CLIENT_CREDENTIAL_HEADERS.contains(&n.as_str())
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Query parameter names (compared case-insensitively, after percent-decoding) that carry
/// credentials in some provider API.
const QUERY_CREDENTIALS: &[&str] = &[
    "key",
    "api_key",
    "api-key",
    "apikey",
    "x-goog-api-key",
    "access_token",
    "oauth_token",
];

/// Returns `query` without credential parameters (Gemini's `key` and the like); other
/// parameters are kept byte for byte and in order.
pub fn strip_query_credentials(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            let name = percent_decode_lossy(name).to_ascii_lowercase();
            !QUERY_CREDENTIALS.contains(&name.as_str())
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes `%XX` (and `+` as space, as form decoders do) until nothing changes, so `%6Bey` and
/// `%256Bey` are both recognised as `key` whatever number of times an upstream decodes.
/// Bounded like the route check, which already refuses deeper nesting.
fn percent_decode_lossy(s: &str) -> String {
    let mut cur = s.as_bytes().to_vec();
    for _ in 0..=MAX_DECODE_PASSES {
        let next = percent_decode_once(&cur, false, true).expect("lenient decoding never fails");
        if next == cur {
            break;
        }
        cur = next;
    }
    String::from_utf8_lossy(&cur).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"sk-test-SECRETVALUE-1234";

    fn presets() -> Targets {
        Targets::resolve(&BTreeMap::new()).unwrap()
    }

    fn specs(text: &str) -> BTreeMap<String, TargetSpec> {
        #[derive(serde::Deserialize)]
        struct File {
            targets: BTreeMap<String, TargetSpec>,
        }
        toml::from_str::<File>(text).unwrap().targets
    }

    fn resolve_err(text: &str) -> TargetConfigError {
        Targets::resolve(&specs(text)).unwrap_err()
    }

    fn hostile_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer kw_clienttoken"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-api-key", "kw_clienttoken"),
            ("api-key", "kw_clienttoken"),
            ("x-goog-api-key", "kw_clienttoken"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("host", "evil.example"),
            ("accept-encoding", "gzip"),
            ("keyward-workflow", "wf"),
            ("keyward-anything", "x"),
            ("content-type", "application/json"),
            ("openai-organization", "org-1"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=10.0.0.1;host=evil.example"),
            ("x-original-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-envoy-original-path", "/admin"),
            ("via", "1.1 evil"),
            ("x-real-ip", "10.0.0.1"),
            ("true-client-ip", "10.0.0.1"),
            ("x-forwardedness", "kept: not a forwarding header"),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        h
    }

    fn inject(target: &str, headers: &mut HeaderMap) {
        let t = presets();
        let key = Secret::from_slice(KEY);
        prepare_upstream_headers(t.get(target).unwrap(), headers, &key).unwrap();
    }

    #[test]
    fn every_preset_injects_its_header_and_format() {
        let want = [
            (
                "openai",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            ("anthropic", Some(("x-api-key", "sk-test-SECRETVALUE-1234"))),
            (
                "gemini",
                Some(("x-goog-api-key", "sk-test-SECRETVALUE-1234")),
            ),
            (
                "mistral",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            (
                "cohere",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            (
                "groq",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            (
                "openrouter",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            (
                "deepseek",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            (
                "xai",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            (
                "together",
                Some(("authorization", "Bearer sk-test-SECRETVALUE-1234")),
            ),
            ("ollama", None),
        ];
        for (name, expect) in want {
            let mut h = hostile_headers();
            inject(name, &mut h);
            let auth_names = ["authorization", "x-api-key", "x-goog-api-key", "api-key"];
            match expect {
                Some((header, value)) => {
                    let got = h.get_all(header).iter().collect::<Vec<_>>();
                    assert_eq!(got.len(), 1, "{name}");
                    assert_eq!(got[0].as_bytes(), value.as_bytes(), "{name}");
                    assert!(got[0].is_sensitive(), "{name}");
                    for other in auth_names.iter().filter(|n| **n != header) {
                        assert!(h.get(*other).is_none(), "{name} kept {other}");
                    }
                }
                None => {
                    for other in auth_names {
                        assert!(h.get(other).is_none(), "{name} kept {other}");
                    }
                }
            }
        }
        let t = presets();
        assert!(t.get("azure-openai").is_none());
        let gemini = t.get("gemini").unwrap();
        assert_eq!(
            gemini.upstream.authority.as_str(),
            "generativelanguage.googleapis.com"
        );
        assert_eq!(t.get("groq").unwrap().upstream.path_prefix, "/openai");
        assert_eq!(t.get("openrouter").unwrap().upstream.path_prefix, "/api");
        let ollama = t.get("ollama").unwrap();
        assert_eq!(
            (ollama.upstream.host.as_str(), ollama.upstream.port),
            ("127.0.0.1", 11434)
        );
        assert!(!ollama.upstream.is_https());
        assert_eq!(t.get("openai").unwrap().upstream.port, 443);
        // azure-openai and vertex need their endpoint from the config.
        assert!(t.get("vertex").is_none());
        assert_eq!(t.iter().count(), PRESETS.len() - 2);
    }

    #[test]
    fn vertex_takes_its_base_url_from_the_location() {
        let t = Targets::resolve(&specs(
            "[targets.vertex]\nlocation = \"europe-west4\"\n\
             token_url = \"https://private.googleapis.com/token/\"",
        ))
        .unwrap();
        let v = t.get("vertex").unwrap();
        assert_eq!(
            v.upstream.authority.as_str(),
            "europe-west4-aiplatform.googleapis.com"
        );
        assert_eq!(v.family, Family::Vertex);
        assert_eq!(
            v.token_url.as_deref(),
            Some("https://private.googleapis.com/token")
        );
        assert_eq!(accepted_kinds(v), &[CredentialKind::GcpServiceAccount]);
        let global = Targets::resolve(&specs("[targets.vertex]\nlocation = \"global\"")).unwrap();
        assert_eq!(
            global.get("vertex").unwrap().upstream.authority.as_str(),
            "aiplatform.googleapis.com"
        );
        let err = Targets::lookup(&presets(), "vertex")
            .unwrap_err()
            .to_string();
        assert!(err.contains("location = \"us-central1\""), "{err}");
    }

    #[test]
    fn every_known_family_has_a_read_only_test_call_and_prefixes_are_not_doubled() {
        let t = Targets::resolve(&specs(
            "[targets.azure-openai]\nbase_url = \"https://x.openai.azure.com\"\n\
             [targets.bedrock]\nregion = \"us-east-1\"\n\
             [targets.vertex]\nlocation = \"us-central1\"\n\
             [targets.local]\nbase_url = \"https://llm.internal.example/v1\"\nfamily = \"openai\"\n\
             [targets.opaque]\nbase_url = \"https://opaque.example\"\nfamily = \"none\"",
        ))
        .unwrap();
        let path = |name: &str| test_path(t.get(name).unwrap());
        assert_eq!(path("openai"), Some("/v1/models"));
        assert_eq!(path("groq"), Some("/v1/models")); // under its /openai prefix
        assert_eq!(path("local"), Some("/models")); // base URL ends in /v1
        assert_eq!(path("anthropic"), Some("/v1/models"));
        assert_eq!(path("gemini"), Some("/v1beta/models?pageSize=1"));
        assert_eq!(
            path("azure-openai"),
            Some("/openai/models?api-version=2024-10-21")
        );
        assert_eq!(
            path("vertex"),
            Some("/v1beta1/publishers/google/models?pageSize=1")
        );
        assert_eq!(path("bedrock"), Some("/async-invoke?maxResults=1"));
        assert_eq!(path("opaque"), None);
        // Each is a read-only models-list call for its family, never a billed one.
        for name in ["openai", "anthropic", "gemini", "azure-openai"] {
            let target = t.get(name).unwrap();
            let p = test_path(target).unwrap();
            let p = p.split('?').next().unwrap();
            assert_eq!(
                capability(target.family, p),
                Capability::Models,
                "{name} {p}"
            );
        }
    }

    #[test]
    fn azure_with_base_url_uses_api_key_header() {
        let t = Targets::resolve(&specs(
            "[targets.azure-openai]\nbase_url = \"https://res.openai.azure.com\"",
        ))
        .unwrap();
        let azure = t.get("azure-openai").unwrap();
        assert_eq!(azure.family, Family::Azure);
        let mut h = hostile_headers();
        prepare_upstream_headers(azure, &mut h, &Secret::from_slice(KEY)).unwrap();
        assert_eq!(h.get("api-key").unwrap().as_bytes(), KEY);
        assert!(h.get("authorization").is_none());
    }

    #[test]
    fn client_credentials_hop_by_hop_and_keyward_headers_are_removed() {
        // Stored header names are lowercase and the lists are compared as written.
        for name in CLIENT_CREDENTIAL_HEADERS {
            assert_eq!(*name, name.to_ascii_lowercase());
        }
        let mut h = hostile_headers();
        inject("openai", &mut h);
        for gone in [
            "proxy-authorization",
            "x-api-key",
            "api-key",
            "x-goog-api-key",
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "host",
            "accept-encoding",
            "keyward-workflow",
            "keyward-anything",
            "x-forwarded-host",
            "x-forwarded-for",
            "x-forwarded-prefix",
            "forwarded",
            "x-original-url",
            "x-http-method-override",
            "x-envoy-original-path",
            "via",
            "x-real-ip",
            "true-client-ip",
        ] {
            assert!(h.get(gone).is_none(), "{gone} survived");
        }
        assert!(h.get("x-forwardedness").is_some());
        assert_eq!(h.get("content-type").unwrap(), "application/json");
        assert_eq!(h.get("openai-organization").unwrap(), "org-1");
        assert!(
            !h.iter()
                .any(|(_, v)| v.as_bytes().windows(5).any(|w| w == b"kw_cl"))
        );
    }

    #[test]
    fn anthropic_version_is_added_only_when_absent() {
        let mut h = HeaderMap::new();
        inject("anthropic", &mut h);
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        let mut h = HeaderMap::new();
        h.insert("anthropic-version", HeaderValue::from_static("2024-01-01"));
        inject("anthropic", &mut h);
        assert_eq!(h.get_all("anthropic-version").iter().count(), 1);
        assert_eq!(h.get("anthropic-version").unwrap(), "2024-01-01");
        let mut h = HeaderMap::new();
        inject("openai", &mut h);
        assert!(h.get("anthropic-version").is_none());
    }

    #[test]
    fn debug_of_injected_headers_does_not_show_the_key() {
        let mut h = hostile_headers();
        inject("openai", &mut h);
        let shown = format!("{h:?}");
        assert!(shown.contains("Sensitive"), "{shown}");
        assert!(!shown.contains("SECRETVALUE"), "{shown}");
    }

    #[test]
    fn key_that_is_not_a_header_value_is_an_error_without_the_key() {
        let t = presets();
        for bad in [&b"sk-abc\r\nX-Evil: 1"[..], b"sk-\0nul", b"sk-\x7fdel"] {
            let mut h = HeaderMap::new();
            let e = prepare_upstream_headers(
                t.get("openai").unwrap(),
                &mut h,
                &Secret::from_slice(bad),
            )
            .unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(!text.contains("sk-"), "{text}");
            assert!(
                text.contains("openai") && text.contains("authorization"),
                "{text}"
            );
            assert!(h.get("authorization").is_none());
        }
    }

    #[test]
    fn query_credentials_are_stripped_and_the_rest_kept_in_order() {
        assert_eq!(strip_query_credentials("key=AIza123&alt=sse"), "alt=sse");
        assert_eq!(strip_query_credentials("alt=sse&KEY=x&b=2"), "alt=sse&b=2");
        assert_eq!(strip_query_credentials("%6Bey=x&%256bey=y&a=1"), "a=1");
        assert_eq!(
            strip_query_credentials("api-version=2024-06-01&api-key=x&api_key=y&apikey=z"),
            "api-version=2024-06-01"
        );
        assert_eq!(
            strip_query_credentials("access_token=t&oauth_token=u&key"),
            ""
        );
        assert_eq!(
            strip_query_credentials("keys=1&monkey=2&&x=%zz"),
            "keys=1&monkey=2&x=%zz"
        );
        assert_eq!(strip_query_credentials(""), "");
    }

    #[test]
    fn preset_override_changes_only_the_given_keys() {
        let t = Targets::resolve(&specs(
            "[targets.openai]\nbase_url = \"https://openai-proxy.internal.example/v1/\"\n\
             [targets.anthropic]\nauth_header = \"X-Other-Key\"",
        ))
        .unwrap();
        let openai = t.get("openai").unwrap();
        assert_eq!(
            openai.upstream.authority.as_str(),
            "openai-proxy.internal.example"
        );
        assert_eq!(openai.upstream.path_prefix, "/v1");
        assert_eq!(openai.family, Family::OpenAi);
        assert!(
            matches!(&openai.auth, AuthScheme::Header { header, prefix, .. }
            if header == "authorization" && prefix == "Bearer ")
        );
        let anthropic = t.get("anthropic").unwrap();
        assert!(
            matches!(&anthropic.auth, AuthScheme::Header { header, prefix, suffix }
            if header == "x-other-key" && prefix.is_empty() && suffix.is_empty())
        );
        assert_eq!(anthropic.upstream.authority.as_str(), "api.anthropic.com");
    }

    #[test]
    fn custom_target_with_and_without_auth() {
        let t = Targets::resolve(&specs(
            "[targets.local-llm]\nbase_url = \"https://llm.internal.example:8443/v1\"\n\
             auth_header = \"Authorization\"\nauth_format = \"Token {key}!\"\nfamily = \"openai\"\n\
             [targets.vllm]\nbase_url = \"http://[::1]:8000\"",
        ))
        .unwrap();
        let local = t.get("local-llm").unwrap();
        assert_eq!(local.upstream.port, 8443);
        assert_eq!(
            local.upstream.authority.as_str(),
            "llm.internal.example:8443"
        );
        let mut h = HeaderMap::new();
        prepare_upstream_headers(local, &mut h, &Secret::from_slice(b"abc")).unwrap();
        assert_eq!(h.get("authorization").unwrap(), "Token abc!");
        let vllm = t.get("vllm").unwrap();
        assert_eq!(
            (vllm.upstream.host.as_str(), vllm.upstream.port),
            ("::1", 8000)
        );
        assert_eq!(vllm.family, Family::None);
        assert_eq!(vllm.auth, AuthScheme::None);
    }

    #[test]
    fn azure_without_base_url_is_a_config_error_or_a_clear_lookup_error() {
        let e = resolve_err("[targets.azure-openai]\nca_file = \"/nonexistent\"");
        assert_eq!(e.key, "targets.azure-openai.base_url");
        assert!(
            e.reason.contains("https://YOUR-RESOURCE.openai.azure.com"),
            "{e}"
        );
        let e = presets().lookup("azure-openai").unwrap_err().to_string();
        assert!(e.contains("base_url") && e.contains("YOUR-RESOURCE"), "{e}");
        let e = presets().lookup("nope").unwrap_err().to_string();
        assert!(
            e.contains("unknown target `nope`") && e.contains("openai"),
            "{e}"
        );
        assert_eq!(presets().lookup("gemini").unwrap().name, "gemini");
    }

    #[test]
    fn base_url_validation() {
        let cases = [
            ("ftp://x.example", "scheme `ftp`"),
            ("api.example.com", "no scheme"),
            ("https://user:pw@x.example", "user information"),
            ("https://x.example/v1?a=b", "query or fragment"),
            ("https://x.example/v1#frag", "query or fragment"),
            ("http://api.example.com", "loopback"),
            ("http://10.0.0.1:8000", "loopback"),
            ("http://localhost.evil.example", "loopback"),
            ("https://x.example/a/../b", "`..`"),
            ("https://x.example/a//b", "empty"),
            ("https://x.example/a%2fb", "`%`"),
            ("https://x.example:0", "port 0"),
            ("https://x.example:", "empty port"),
            ("https://x .example", "spaces"),
            ("https://", "not a URL"),
        ];
        for (url, want) in cases {
            let e = resolve_err(&format!("[targets.t1]\nbase_url = \"{url}\""));
            assert_eq!(e.key, "targets.t1.base_url", "{url}");
            assert!(e.reason.contains(want), "{url}: {}", e.reason);
        }
        for ok in [
            "http://localhost:1234",
            "http://LOCALHOST",
            "http://127.8.9.10",
            "http://[::1]:80/x",
            "https://10.0.0.1",
        ] {
            Targets::resolve(&specs(&format!("[targets.t1]\nbase_url = \"{ok}\""))).unwrap();
        }
        let e = resolve_err("[targets.openai]\nbase_url = \"http://api.openai.com\"");
        assert_eq!(e.key, "targets.openai.base_url");
    }

    #[test]
    fn default_ports_follow_the_scheme_and_https_hosts_must_be_tls_names() {
        assert_eq!(parse_base_url("http://127.0.0.1/v1").unwrap().port, 80);
        assert_eq!(parse_base_url("http://localhost").unwrap().port, 80);
        assert_eq!(parse_base_url("https://x.example").unwrap().port, 443);
        // A host a URI allows but TLS cannot name (an empty label) is refused for https.
        let e = parse_base_url("https://a..example").unwrap_err();
        assert!(e.contains("not a valid host name"), "{e}");
    }

    #[test]
    fn auth_family_and_name_validation() {
        let base = "base_url = \"https://x.example\"";
        let cases = [
            (
                format!("[targets.t]\n{base}\nauth_header = \"A\""),
                "targets.t.auth_format",
                "auth_format",
            ),
            (
                format!("[targets.t]\n{base}\nauth_format = \"{{key}}\""),
                "targets.t.auth_header",
                "auth_header",
            ),
            (
                format!("[targets.t]\n{base}\nauth_header = \"A B\"\nauth_format = \"{{key}}\""),
                "targets.t.auth_header",
                "not a valid HTTP header name",
            ),
            (
                format!("[targets.t]\n{base}\nauth_header = \"Host\"\nauth_format = \"{{key}}\""),
                "targets.t.auth_header",
                "cannot carry a key",
            ),
            (
                format!(
                    "[targets.t]\n{base}\nauth_header = \"keyward-x\"\nauth_format = \"{{key}}\""
                ),
                "targets.t.auth_header",
                "cannot carry a key",
            ),
            (
                format!("[targets.t]\n{base}\nauth_header = \"A\"\nauth_format = \"Bearer\""),
                "targets.t.auth_format",
                "exactly once",
            ),
            (
                format!(
                    "[targets.t]\n{base}\nauth_header = \"A\"\nauth_format = \"{{key}}{{key}}\""
                ),
                "targets.t.auth_format",
                "exactly once",
            ),
            (
                format!("[targets.t]\n{base}\nauth_header = \"A\"\nauth_format = \"B\\n{{key}}\""),
                "targets.t.auth_format",
                "not allowed",
            ),
            (
                format!("[targets.t]\n{base}\nfamily = \"sagemaker\""),
                "targets.t.family",
                "openai, anthropic, gemini, vertex, azure, none",
            ),
            (
                "[targets.vertex]\nlocation = \"US Central\"".to_string(),
                "targets.vertex.location",
                "like \"us-central1\"",
            ),
            (
                "[targets.openai]\nlocation = \"us-central1\"".to_string(),
                "targets.openai.location",
                "vertex target only",
            ),
            (
                "[targets.vertex]\nlocation = \"us-central1\"\ntoken_url = \"http://127.0.0.1:9/t\""
                    .to_string(),
                "targets.vertex.token_url",
                "https URL",
            ),
            (
                format!("[targets.t]\n{base}\nauthority = \"https://u:p@login.example\""),
                "targets.t.authority",
                "user information",
            ),
            (format!("[targets.Big]\n{base}"), "targets.Big", "a-z"),
            (format!("[targets._x]\n{base}"), "targets._x", "start with"),
            (
                "[targets.t]\nfamily = \"openai\"".to_string(),
                "targets.t.base_url",
                "needs base_url",
            ),
            (
                "[targets.ollama]\nauth_header = \"A\"".to_string(),
                "targets.ollama.auth_header",
                "both",
            ),
        ];
        for (text, key, want) in cases {
            let e = resolve_err(&text);
            assert_eq!(e.key, key, "{text}");
            assert!(e.reason.contains(want), "{text}: {}", e.reason);
        }
        let e = resolve_err("[targets.gemini]\nfamily = \"x\"");
        assert_eq!(e.key, "targets.gemini.family");
    }

    #[test]
    fn ca_file_must_be_pem_with_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
        std::fs::write(&good, cert.cert.pem()).unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let key_only = dir.path().join("key.pem");
        std::fs::write(&key_only, cert.signing_key.serialize_pem()).unwrap();
        let missing = dir.path().join("missing.pem");
        let spec = |p: &std::path::Path| {
            specs(&format!("[targets.openai]\nca_file = \"{}\"", p.display()))
        };
        let t = Targets::resolve(&spec(&good)).unwrap();
        assert_eq!(
            t.get("openai").unwrap().ca_file.as_deref(),
            Some(good.as_path())
        );
        for (path, want) in [
            (&empty, "no certificate"),
            (&key_only, "no certificate"),
            (&missing, "cannot read"),
        ] {
            let e = Targets::resolve(&spec(path)).unwrap_err();
            assert_eq!(e.key, "targets.openai.ca_file");
            assert!(e.reason.contains(want), "{}", e.reason);
        }
    }

    #[test]
    fn bedrock_needs_a_region_and_signs_for_it() {
        let e = presets().lookup("bedrock").unwrap_err().to_string();
        assert!(e.contains("region") && e.contains("bedrock-runtime"), "{e}");
        let t = Targets::resolve(&specs("[targets.bedrock]\nregion = \"eu-central-1\"")).unwrap();
        let b = t.get("bedrock").unwrap();
        assert_eq!(b.family, Family::Bedrock);
        assert_eq!(
            b.upstream.authority.as_str(),
            "bedrock-runtime.eu-central-1.amazonaws.com"
        );
        assert_eq!(
            b.auth,
            AuthScheme::SigV4 {
                service: "bedrock",
                region: "eu-central-1".into(),
                sts_endpoint: "https://sts.eu-central-1.amazonaws.com".into(),
            }
        );
        let t = Targets::resolve(&specs(
            "[targets.bedrock]\nregion = \"us-east-1\"\nbase_url = \"https://127.0.0.1:9\"\n\
             sts_endpoint = \"https://sts.internal.example:8443\"\n\
             [targets.br2]\nbase_url = \"https://vpce.example\"\nfamily = \"bedrock\"\n\
             region = \"us-west-2\"",
        ))
        .unwrap();
        assert_eq!(t.get("bedrock").unwrap().upstream.port, 9);
        assert!(matches!(&t.get("bedrock").unwrap().auth,
            AuthScheme::SigV4 { sts_endpoint, .. }
            if sts_endpoint == "https://sts.internal.example:8443"));
        assert!(matches!(&t.get("br2").unwrap().auth,
            AuthScheme::SigV4 { region, .. } if region == "us-west-2"));
        for (text, key, want) in [
            (
                "[targets.bedrock]\nca_file = \"/x\"",
                "targets.bedrock.region",
                "region",
            ),
            (
                "[targets.bedrock]\nregion = \"US East\"",
                "targets.bedrock.region",
                "AWS region",
            ),
            (
                "[targets.bedrock]\nregion = \"us-east-1\"\nsts_endpoint = \"http://127.0.0.1:1\"",
                "targets.bedrock.sts_endpoint",
                "https",
            ),
            (
                concat!(
                    "[targets.bedrock]\nregion = \"us-east-1\"\n",
                    "auth_header = \"A\"\nauth_format = \"{key}\""
                ),
                "targets.bedrock.auth_header",
                "SigV4",
            ),
            (
                "[targets.openai]\nregion = \"us-east-1\"",
                "targets.openai.region",
                "bedrock",
            ),
            (
                "[targets.b3]\nbase_url = \"https://x.example\"\nfamily = \"bedrock\"",
                "targets.b3.region",
                "region",
            ),
        ] {
            let e = resolve_err(text);
            assert_eq!(e.key, key, "{text}");
            assert!(e.reason.contains(want), "{text}: {}", e.reason);
        }
    }

    #[test]
    fn signing_replaces_the_apps_aws_headers_and_marks_the_signature_sensitive() {
        let t = Targets::resolve(&specs("[targets.bedrock]\nregion = \"us-east-1\"")).unwrap();
        let b = t.get("bedrock").unwrap();
        let mut h = hostile_headers();
        for (n, v) in [
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=kw_clienttoken/x",
            ),
            ("x-amz-date", "19990101T000000Z"),
            ("x-amz-security-token", "app-token"),
            ("x-amz-content-sha256", "app-hash"),
        ] {
            h.insert(n, HeaderValue::from_static(v));
        }
        let secret = Secret::from_slice(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        let token = Secret::from_slice(b"SESSIONTOKENVALUE");
        let key = AwsSigningKey {
            access_key_id: "AKIAIOSFODNN7EXAMPLE",
            secret_access_key: &secret,
            session_token: Some(&token),
        };
        let uri: Uri = "https://bedrock-runtime.us-east-1.amazonaws.com/model/a%3A0/converse"
            .parse()
            .unwrap();
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        prepare_signed_headers(b, &http::Method::POST, &uri, &mut h, "e3b0", &key, time).unwrap();
        let auth = h.get("authorization").unwrap();
        assert!(auth.is_sensitive());
        let auth = auth.to_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20270115/us-east-1/bedrock/"
            ),
            "{auth}"
        );
        assert!(auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token"));
        assert_eq!(h.get("x-amz-date").unwrap(), "20270115T080000Z");
        assert_eq!(h.get("x-amz-security-token").unwrap(), "SESSIONTOKENVALUE");
        assert!(h.get("x-amz-security-token").unwrap().is_sensitive());
        assert!(h.get("x-amz-content-sha256").is_none());
        assert!(h.get("x-api-key").is_none() && h.get("keyward-workflow").is_none());
        let shown = format!("{h:?}");
        assert!(!shown.contains("SESSIONTOKENVALUE") && !shown.contains("wJalr"));
        let openai = t.get("openai").unwrap();
        let e = prepare_signed_headers(openai, &http::Method::POST, &uri, &mut h, "e3", &key, time)
            .unwrap_err();
        assert!(e.to_string().contains("SigV4"), "{e}");
    }

    #[test]
    fn family_round_trips() {
        for f in [
            Family::OpenAi,
            Family::Anthropic,
            Family::Gemini,
            Family::Azure,
            Family::None,
        ] {
            assert_eq!(f.as_str().parse::<Family>().unwrap(), f);
        }
        assert!("OpenAI".parse::<Family>().is_err());
    }

    #[test]
    fn capability_names_round_trip_and_unknown_lists_valid_values() {
        for c in ALL_CAPABILITIES {
            assert_eq!(c.as_str().parse::<Capability>().unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
        }
        let e = "chats".parse::<Capability>().unwrap_err().to_string();
        assert!(
            e.contains("`chats`") && e.contains("fine_tuning") && e.contains("tokens"),
            "{e}"
        );
        assert!("Chat".parse::<Capability>().is_err());
    }
}
