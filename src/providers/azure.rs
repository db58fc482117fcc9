//! The Azure OpenAI family: the model is the deployment in the path
//! (`/openai/deployments/{deployment}/...`), or the body's `model` on the v1, responses and
//! batches APIs; the capability comes from the REST path words after the deployment (never the
//! deployment name itself); usage is OpenAI's; the key goes in `api-key`.

use super::{Capability, ModelSource, percent_decode};

/// `api-key: {key}`.
pub(super) const AUTH: Option<(&str, &str)> = Some(("api-key", "{key}"));

/// The read-only call `keyward cred test` makes: Models - List of the data-plane API
/// (`GET /openai/models`, API version 2024-10-21, the GA version of that date).
pub(super) const TEST_PATH: &str = "/openai/models?api-version=2024-10-21";

/// Where the model is named.
pub(super) fn model_source(segs: &[&str]) -> ModelSource {
    match deployment(segs) {
        Some((dep, _)) => ModelSource::Path(dep),
        // The v1 API, responses and batches name the model in the body.
        None => ModelSource::JsonBody,
    }
}

/// The capability of a path. The deployment name is chosen by the operator and may be any
/// word, so it is never read as a capability.
pub(super) fn capability(segs: &[&str]) -> Capability {
    match deployment(segs) {
        Some((_, rest)) => super::openai::rest_capability(rest),
        None => super::openai::rest_capability(segs),
    }
}

/// Azure: `/openai/deployments/{deployment}/...`. Returns the decoded deployment and the rest.
fn deployment<'a>(segs: &'a [&'a str]) -> Option<(String, &'a [&'a str])> {
    match segs {
        ["openai", "deployments", dep, rest @ ..] => Some((percent_decode(dep)?, rest)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::providers::{
        Capability, Family, ModelSource, capability, model_from_path, model_source,
    };

    #[test]
    fn azure_deployment_is_the_model_and_never_a_capability_word() {
        use Capability::*;
        let cases = [
            (
                "/openai/deployments/gpt4o/chat/completions",
                Some("gpt4o"),
                Chat,
            ),
            (
                "/openai/deployments/embeddings/chat/completions",
                Some("embeddings"),
                Chat,
            ),
            (
                "/openai/deployments/chat/embeddings",
                Some("chat"),
                Embeddings,
            ),
            (
                "/openai/deployments/dalle/images/generations",
                Some("dalle"),
                Images,
            ),
            (
                "/openai/deployments/whisper/audio/transcriptions",
                Some("whisper"),
                Audio,
            ),
            (
                "/openai/deployments/old/completions",
                Some("old"),
                Completions,
            ),
            ("/openai/models", None, Models),
            ("/openai/files", None, Files),
            ("/openai/v1/chat/completions", None, Chat),
        ];
        for (path, model, cap) in cases {
            assert_eq!(
                model_from_path(Family::Azure, path).as_deref(),
                model,
                "{path}"
            );
            assert_eq!(capability(Family::Azure, path), cap, "{path}");
        }
        assert_eq!(
            model_source(Family::Azure, "/openai/v1/responses"),
            ModelSource::JsonBody
        );
        assert_eq!(
            model_from_path(Family::OpenAi, "/openai/deployments/x/chat/completions"),
            None
        );
        assert_eq!(
            model_source(Family::OpenAi, "/v1/chat/completions"),
            ModelSource::JsonBody
        );
        assert_eq!(
            model_source(Family::None, "/v1/chat/completions"),
            ModelSource::Unknown
        );
    }
}
