//! The Vertex AI family: publisher models are named in the path
//! (`/{version}/projects/{project}/locations/{location}/publishers/{publisher}/models/
//! {model}:{method}`), Google's own models with Gemini's methods (`generateContent`,
//! `streamGenerateContent`, `countTokens`, `predict`), partner models such as Anthropic's
//! with `rawPredict` and `streamRawPredict`; the OpenAI-compatible endpoint
//! (`.../endpoints/openapi/...`) takes the model in the body. Usage is Gemini's `usageMetadata`
//! or, for Anthropic models, Anthropic's `usage`, both read by [`super::usage`]. Requests carry
//! an OAuth2 access token that keyward mints from a `gcp-service-account` credential.

use super::{Capability, ModelSource, percent_decode};

/// `Authorization: Bearer {token}`.
pub(super) const AUTH: Option<(&str, &str)> = super::openai::AUTH;

/// The read-only call `keyward cred test` makes: list Google's publisher models in the Model
/// Garden (`GET /v1beta1/publishers/google/models`), one per page; it needs no project in the
/// path, only a token the API accepts.
pub(super) const TEST_PATH: &str = "/v1beta1/publishers/google/models?pageSize=1";

/// Where the model is named.
pub(super) fn model_source(segs: &[&str]) -> ModelSource {
    match model_and_method(segs) {
        Some((model, _)) => ModelSource::Path(model),
        None if openapi(segs).is_some() => ModelSource::JsonBody,
        None => ModelSource::Unknown,
    }
}

/// The capability of a path.
pub(super) fn capability(segs: &[&str]) -> Capability {
    if let Some((model, method)) = model_and_method(segs) {
        return match method {
            None => Capability::Models,
            Some(m) => method_capability(&model, m),
        };
    }
    match openapi(segs) {
        Some(rest) => super::openai::rest_capability(rest),
        None => Capability::Other,
    }
}

/// `/{version}/projects/{p}/locations/{l}/publishers/{publisher}/models/{model}[:{method}]`,
/// the model percent-decoded (`gemini-2.0-flash`, `claude-sonnet-4@20250514`). Returns
/// `(model, method)`.
fn model_and_method<'a>(segs: &[&'a str]) -> Option<(String, Option<&'a str>)> {
    match segs {
        [
            _version,
            "projects",
            _,
            "locations",
            _,
            "publishers",
            _,
            "models",
            rest,
        ] => {
            let (model, method) = match rest.split_once(':') {
                Some((m, meth)) => (m, Some(meth)),
                None => (*rest, None),
            };
            Some((percent_decode(model)?, method))
        }
        _ => None,
    }
}

/// The rest of an OpenAI-compatible path:
/// `/{version}/projects/{p}/locations/{l}/endpoints/openapi/...`.
fn openapi<'a>(segs: &'a [&'a str]) -> Option<&'a [&'a str]> {
    match segs {
        [
            _version,
            "projects",
            _,
            "locations",
            _,
            "endpoints",
            "openapi",
            rest @ ..,
        ] => Some(rest),
        _ => None,
    }
}

/// What a publisher-model method does. `predict` serves embedding and image models as well as
/// others, so its capability comes from the model's name; Anthropic's token counter is the
/// `count-tokens` model.
fn method_capability(model: &str, method: &str) -> Capability {
    match method {
        "rawPredict" | "streamRawPredict" if model == "count-tokens" => Capability::Tokens,
        "rawPredict" | "streamRawPredict" => Capability::Chat,
        "predict" if model.contains("embedding") => Capability::Embeddings,
        "predict" if model.starts_with("imagen") || model.starts_with("imagegeneration") => {
            Capability::Images
        }
        "predict" => Capability::Other,
        other => super::gemini::method_capability(other),
    }
}

#[cfg(test)]
mod tests {
    use crate::providers::{
        Capability, Family, ModelSource, capability, model_from_path, model_source,
    };

    #[test]
    fn vertex_model_and_capability_from_path() {
        use Capability::*;
        let base = "/v1/projects/p-1/locations/us-east5/publishers";
        for (path, model, cap) in [
            (
                "google/models/gemini-2.0-flash:generateContent",
                "gemini-2.0-flash",
                Chat,
            ),
            (
                "google/models/gemini-2.5-pro:streamGenerateContent",
                "gemini-2.5-pro",
                Chat,
            ),
            (
                "google/models/gemini-2.5-pro:countTokens",
                "gemini-2.5-pro",
                Tokens,
            ),
            (
                "anthropic/models/claude-sonnet-4@20250514:rawPredict",
                "claude-sonnet-4@20250514",
                Chat,
            ),
            (
                "anthropic/models/claude-3-haiku%4020240307:streamRawPredict",
                "claude-3-haiku@20240307",
                Chat,
            ),
            (
                "anthropic/models/count-tokens:rawPredict",
                "count-tokens",
                Tokens,
            ),
            (
                "google/models/text-embedding-005:predict",
                "text-embedding-005",
                Embeddings,
            ),
            (
                "google/models/imagen-3.0-generate-002:predict",
                "imagen-3.0-generate-002",
                Images,
            ),
            ("google/models/gemini-2.0-flash", "gemini-2.0-flash", Models),
        ] {
            let path = format!("{base}/{path}");
            assert_eq!(
                model_from_path(Family::Vertex, &path).as_deref(),
                Some(model),
                "{path}"
            );
            assert_eq!(capability(Family::Vertex, &path), cap, "{path}");
        }
        let openapi = "/v1/projects/p/locations/l/endpoints/openapi/chat/completions";
        assert_eq!(model_source(Family::Vertex, openapi), ModelSource::JsonBody);
        assert_eq!(capability(Family::Vertex, openapi), Chat);
        assert_eq!(
            model_source(Family::Vertex, "/v1/projects/p"),
            ModelSource::Unknown
        );
        assert_eq!(capability(Family::Vertex, "/v1/projects/p"), Other);
    }
}
