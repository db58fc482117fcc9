//! The Anthropic family (Messages API): the model is the JSON body's top-level `model`; the
//! capability comes from the REST path words ([`super::openai::rest_capability`]); the usage
//! object leaves cached and cache-written tokens out of `input_tokens` (Anthropic's
//! prompt-caching documentation); the key goes in `x-api-key`, with `anthropic-version` added
//! when the app sent none.

use super::usage::UsageFields;
use super::{Capability, ModelSource};

/// `x-api-key: {key}`.
pub(super) const AUTH: Option<(&str, &str)> = Some(("x-api-key", "{key}"));

/// The read-only call `keyward cred test` makes: List Models (`GET /v1/models`).
pub(super) const TEST_PATH: &str = "/v1/models";

/// Added when absent: the API refuses requests without a version.
pub(super) const DEFAULT_HEADERS: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

/// Messages API `usage`: `input_tokens` excludes `cache_read_input_tokens` and
/// `cache_creation_input_tokens`.
pub(super) const USAGE: UsageFields = UsageFields {
    keys: &["usage"],
    input: &["input_tokens"],
    output: &["output_tokens"],
    total: &[],
    cache_read: &["cache_read_input_tokens"],
    cache_read_nested: &[],
    cache_write: &["cache_creation_input_tokens"],
    extra_input: &[],
    extra_output: &[],
    cache_outside_input: true,
};

/// The model is always in the body.
pub(super) fn model_source(_segs: &[&str]) -> ModelSource {
    ModelSource::JsonBody
}

/// The capability of a REST path.
pub(super) fn capability(segs: &[&str]) -> Capability {
    super::openai::rest_capability(segs)
}
