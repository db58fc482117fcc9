//! The OpenAI family: OpenAI and every OpenAI-compatible preset (mistral, cohere, groq,
//! openrouter, deepseek, xai, together, ollama). The model is the JSON body's top-level
//! `model`; the capability comes from the words of the REST path (the same map serves the
//! Anthropic family, Azure after its deployment, and Gemini's OpenAI-compatible endpoint); the
//! usage is the `usage` object of the Chat Completions and Responses APIs; the key goes in
//! `Authorization: Bearer`.

use super::usage::UsageFields;
use super::{Capability, ModelSource};

/// `Authorization: Bearer {key}`.
pub(super) const AUTH: Option<(&str, &str)> = Some(("authorization", "Bearer {key}"));

/// The read-only call `keyward cred test` makes: List models (`GET /v1/models`).
pub(super) const TEST_PATH: &str = "/v1/models";

/// Chat Completions (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details`) and
/// Responses (`input_tokens`, `output_tokens`, `input_tokens_details`) `usage` objects.
pub(super) const USAGE: UsageFields = UsageFields {
    keys: &["usage"],
    input: &["input_tokens", "prompt_tokens"],
    output: &["output_tokens", "completion_tokens"],
    total: &["total_tokens"],
    cache_read: &[],
    cache_read_nested: &[
        ("prompt_tokens_details", "cached_tokens"),
        ("input_tokens_details", "cached_tokens"),
    ],
    cache_write: &[],
    extra_input: &[],
    extra_output: &[],
    cache_outside_input: false,
};

/// The model is always in the body.
pub(super) fn model_source(_segs: &[&str]) -> ModelSource {
    ModelSource::JsonBody
}

/// The capability of a REST path.
pub(super) fn capability(segs: &[&str]) -> Capability {
    rest_capability(segs)
}

/// REST-style paths (OpenAI, Anthropic, Azure after the deployment, Cohere, Mistral, ollama).
/// More specific words are checked first: `messages/count_tokens` is tokens, `messages/batches`
/// batches, `chat/moderations` moderations, `fim/completions` completions.
pub(super) fn rest_capability(segs: &[&str]) -> Capability {
    let has = |words: &[&str]| segs.iter().any(|s| words.contains(s));
    if has(&["count_tokens", "tokenize", "detokenize"]) {
        Capability::Tokens
    } else if has(&["batches"]) {
        Capability::Batches
    } else if has(&["moderations"]) {
        Capability::Moderations
    } else if has(&["fine_tuning", "fine-tunes", "fine_tunes"]) {
        Capability::FineTuning
    } else if has(&["fim"]) {
        Capability::Completions
    } else if has(&["chat", "responses", "messages"]) {
        Capability::Chat
    } else if has(&["completions", "complete", "generate"]) {
        Capability::Completions
    } else if has(&["embeddings", "embed", "embedding"]) {
        Capability::Embeddings
    } else if has(&["images"]) {
        Capability::Images
    } else if has(&["audio"]) {
        Capability::Audio
    } else if has(&["files", "uploads"]) {
        Capability::Files
    } else if has(&["models", "tags"]) {
        Capability::Models
    } else {
        Capability::Other
    }
}

#[cfg(test)]
mod tests {
    use crate::providers::{Capability, Family, capability};

    #[test]
    fn openai_and_anthropic_capabilities() {
        use Capability::*;
        let cases = [
            (Family::OpenAi, "/v1/chat/completions", Chat),
            (Family::OpenAi, "/v1/responses", Chat),
            (Family::OpenAi, "/v1/responses/resp_1/input_items", Chat),
            (Family::OpenAi, "/v1/completions", Completions),
            (Family::OpenAi, "/v1/fim/completions", Completions),
            (Family::OpenAi, "/v1/embeddings", Embeddings),
            (Family::OpenAi, "/v1/images/generations", Images),
            (Family::OpenAi, "/v1/audio/transcriptions", Audio),
            (Family::OpenAi, "/v1/moderations", Moderations),
            (Family::OpenAi, "/v1/chat/moderations", Moderations),
            (Family::OpenAi, "/v1/models", Models),
            (Family::OpenAi, "/v1/models/gpt-4o", Models),
            (Family::OpenAi, "/v1/files/file-1/content", Files),
            (Family::OpenAi, "/v1/uploads", Files),
            (Family::OpenAi, "/v1/batches", Batches),
            (Family::OpenAi, "/v1/fine_tuning/jobs", FineTuning),
            (Family::OpenAi, "/v1/assistants", Other),
            (Family::OpenAi, "/v2/chat", Chat),
            (Family::OpenAi, "/v1/embed", Embeddings),
            (Family::OpenAi, "/v1/tokenize", Tokens),
            (Family::OpenAi, "/api/chat", Chat),
            (Family::OpenAi, "/api/generate", Completions),
            (Family::OpenAi, "/api/tags", Models),
            (Family::Anthropic, "/v1/messages", Chat),
            (Family::Anthropic, "/v1/messages/count_tokens", Tokens),
            (Family::Anthropic, "/v1/messages/batches", Batches),
            (Family::Anthropic, "/v1/complete", Completions),
            (Family::Anthropic, "/v1/models", Models),
            (Family::None, "/v1/chat/completions", Other),
        ];
        for (family, path, want) in cases {
            assert_eq!(capability(family, path), want, "{family} {path}");
        }
    }
}
