//! The Gemini family (Generative Language API): the model and method are in the path
//! (`/{version}/models/{model}:{method}`), except on the OpenAI-compatible endpoint
//! (`/{version}/openai/...`), which takes the model in the body; the usage is `usageMetadata`
//! (Gemini's `UsageMetadata` reference: thoughts and tool-use prompt tokens are counted apart);
//! the key goes in `x-goog-api-key`, never in `?key=`.

use super::usage::UsageFields;
use super::{Capability, ModelSource, percent_decode};

/// `x-goog-api-key: {key}`.
pub(super) const AUTH: Option<(&str, &str)> = Some(("x-goog-api-key", "{key}"));

/// The read-only call `keyward cred test` makes: `models.list` (`GET /v1beta/models`), one
/// model per page.
pub(super) const TEST_PATH: &str = "/v1beta/models?pageSize=1";

/// `usageMetadata`: `candidatesTokenCount` leaves out `thoughtsTokenCount`, and
/// `promptTokenCount` leaves out `toolUsePromptTokenCount`.
pub(super) const USAGE: UsageFields = UsageFields {
    keys: &["usageMetadata"],
    input: &["promptTokenCount"],
    output: &["candidatesTokenCount"],
    total: &["totalTokenCount"],
    cache_read: &["cachedContentTokenCount"],
    cache_read_nested: &[],
    cache_write: &[],
    extra_input: &["toolUsePromptTokenCount"],
    extra_output: &["thoughtsTokenCount"],
    cache_outside_input: false,
};

/// Where the model is named.
pub(super) fn model_source(segs: &[&str]) -> ModelSource {
    match model_and_method(segs) {
        Some((model, _)) => ModelSource::Path(model),
        // Gemini's OpenAI-compatible endpoint takes the model in the body.
        None if segs.get(1) == Some(&"openai") => ModelSource::JsonBody,
        None => ModelSource::Unknown,
    }
}

/// The capability of a path.
pub(super) fn capability(segs: &[&str]) -> Capability {
    if let Some((_, method)) = model_and_method(segs) {
        return match method {
            None => Capability::Models,
            Some(m) => method_capability(m),
        };
    }
    if segs.get(1) == Some(&"openai") {
        return super::openai::rest_capability(&segs[2..]);
    }
    match segs {
        [_, "models"] => Capability::Models,
        [_, "files", ..] | ["upload", _, "files", ..] => Capability::Files,
        [_, "batches", ..] => Capability::Batches,
        [_, "tunedModels", ..] => Capability::FineTuning,
        _ => Capability::Other,
    }
}

/// Gemini: `/{version}/models/{model}[:{method}]` (also `/{version}/tunedModels/...`), the
/// model percent-decoded. Returns `(model, method)`.
fn model_and_method<'a>(segs: &[&'a str]) -> Option<(String, Option<&'a str>)> {
    match segs {
        [_version, "models", rest] => {
            let (model, method) = match rest.split_once(':') {
                Some((m, meth)) => (m, Some(meth)),
                None => (*rest, None),
            };
            Some((percent_decode(model)?, method))
        }
        _ => None,
    }
}

pub(super) fn method_capability(method: &str) -> Capability {
    match method {
        "generateContent" | "streamGenerateContent" | "generateMessage" => Capability::Chat,
        "generateText" => Capability::Completions,
        "embedContent" | "batchEmbedContents" | "embedText" | "batchEmbedText" => {
            Capability::Embeddings
        }
        "countTokens" | "countMessageTokens" | "countTextTokens" => Capability::Tokens,
        "batchGenerateContent" | "asyncBatchEmbedContent" => Capability::Batches,
        _ => Capability::Other,
    }
}

#[cfg(test)]
mod tests {
    use crate::providers::{
        Capability, Family, ModelSource, capability, model_from_path, model_source,
    };

    #[test]
    fn gemini_model_and_capability_from_path() {
        use Capability::*;
        let cases = [
            (
                "/v1beta/models/gemini-1.5-pro:generateContent",
                Some("gemini-1.5-pro"),
                Chat,
            ),
            (
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                Some("gemini-2.0-flash"),
                Chat,
            ),
            (
                "/v1/models/gemini-pro:generateContent",
                Some("gemini-pro"),
                Chat,
            ),
            (
                "/v1beta/models/text-embedding-004:embedContent",
                Some("text-embedding-004"),
                Embeddings,
            ),
            (
                "/v1beta/models/text-embedding-004:batchEmbedContents",
                Some("text-embedding-004"),
                Embeddings,
            ),
            (
                "/v1beta/models/gemini-pro:countTokens",
                Some("gemini-pro"),
                Tokens,
            ),
            (
                "/v1beta/models/gemini-pro:batchGenerateContent",
                Some("gemini-pro"),
                Batches,
            ),
            ("/v1beta/models/imagen-3:predict", Some("imagen-3"), Other),
            (
                "/v1beta/models/gemini%2D1.5:generateContent",
                Some("gemini-1.5"),
                Chat,
            ),
            ("/v1beta/models/gemini-pro", Some("gemini-pro"), Models),
            ("/v1beta/models", None, Models),
            ("/v1beta/files", None, Files),
            ("/upload/v1beta/files", None, Files),
            ("/v1beta/tunedModels", None, FineTuning),
            ("/v1beta/cachedContents", None, Other),
            ("/v1beta/openai/chat/completions", None, Chat),
            ("/v1beta/openai/embeddings", None, Embeddings),
        ];
        for (path, model, cap) in cases {
            assert_eq!(
                model_from_path(Family::Gemini, path).as_deref(),
                model,
                "{path}"
            );
            assert_eq!(capability(Family::Gemini, path), cap, "{path}");
        }
        assert_eq!(
            model_source(Family::Gemini, "/v1beta/openai/chat/completions"),
            ModelSource::JsonBody
        );
        assert_eq!(
            model_source(Family::Gemini, "/v1beta/files"),
            ModelSource::Unknown
        );
    }
}
