//! Provider targets: the built-in presets, config overrides and custom targets, and one pure
//! injection function per auth scheme. No I/O here.

use std::path::PathBuf;

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
    /// Extra PEM CA bundle trusted for this target.
    pub ca_file: Option<PathBuf>,
}

/// Every target keyward can reach: presets merged with the config's `[targets.*]`.
#[derive(Debug, Clone, Default)]
pub struct Targets {}

/// A `[targets.*]` entry that cannot be used; `key` is the dotted config key.
#[derive(Debug, Clone)]
pub struct TargetConfigError {
    /// Dotted config key, e.g. `targets.azure-openai.base_url`.
    pub key: String,
    /// What is wrong and what is expected.
    pub reason: String,
}

impl Targets {
    /// Merges presets with config overrides and custom targets, validating each.
    pub fn resolve(
        _specs: &std::collections::BTreeMap<String, TargetSpec>,
    ) -> Result<Targets, TargetConfigError> {
        Ok(Targets {})
    }
}
