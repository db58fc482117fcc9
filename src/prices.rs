//! What a call costs: the shipped price table, `[[prices]]` rows from the config, the lookup
//! by target and model glob, and the cost of a call's token usage in integer micro-USD.
//!
//! Prices are USD per million tokens, kept as integer pico-USD per token (USD per million ×
//! 10⁶) so a call's cost is exact integer arithmetic, rounded once to the nearest micro-USD.
//! The shipped figures are the providers' public list prices (standard tier, prompts up to
//! 200k tokens where the price is tiered) as of [`SHIPPED_AS_OF`]; anything else — negotiated
//! rates, batch discounts, other models — belongs in `[[prices]]`.

use serde::Serialize;

use crate::audit::usage::Usage;
use crate::scope::glob_match;

/// The date the shipped figures were taken from the providers' price pages.
pub const SHIPPED_AS_OF: &str = "2025-08-15";

/// One price row: a target, a model glob and four prices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Price {
    /// Target name (`openai`, `anthropic`, ...), matched exactly.
    pub target: String,
    /// Model glob (`*` any run, `?` one character), e.g. `gpt-4o-mini*`.
    pub model: String,
    /// Uncached input, pico-USD per token (= micro-USD per million tokens).
    pub input: u64,
    /// Input read from the provider's prompt cache, pico-USD per token.
    pub cached_input: u64,
    /// Input written to the provider's prompt cache, pico-USD per token.
    pub cache_write: u64,
    /// Output (reasoning included), pico-USD per token.
    pub output: u64,
    /// When the figures were taken (`YYYY-MM-DD`), if known.
    pub as_of: Option<String>,
    /// `shipped` or `config`.
    pub source: &'static str,
}

impl Price {
    /// The cost of `usage` at this price, in micro-USD, rounded to the nearest. Uncached input
    /// is `input_tokens` less the cached and cache-written parts.
    pub fn cost_micros(&self, usage: &Usage) -> u64 {
        let cached = usage.cached_input_tokens.unwrap_or(0);
        let written = usage.cache_write_tokens.unwrap_or(0);
        let plain = usage
            .input_tokens
            .unwrap_or(0)
            .saturating_sub(cached)
            .saturating_sub(written);
        let pico = u128::from(plain) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
            + u128::from(written) * u128::from(self.cache_write)
            + u128::from(usage.output_tokens.unwrap_or(0)) * u128::from(self.output);
        ((pico + 500_000) / 1_000_000).min(u128::from(u64::MAX)) as u64
    }

    /// The row as `keyward prices` shows it: prices back in USD per million tokens.
    pub fn to_json(&self) -> serde_json::Value {
        let usd = |p: u64| p as f64 / 1e6;
        serde_json::json!({
            "target": self.target,
            "model": self.model,
            "input": usd(self.input),
            "cached_input": usd(self.cached_input),
            "cache_write": usd(self.cache_write),
            "output": usd(self.output),
            "as_of": self.as_of,
            "source": self.source,
        })
    }
}

/// USD per million tokens → pico-USD per token. `None` for a negative, non-finite or absurd
/// (over 1,000,000 USD per million tokens) figure.
pub fn pico_per_token(usd_per_million: f64) -> Option<u64> {
    (usd_per_million.is_finite() && (0.0..=1_000_000.0).contains(&usd_per_million))
        .then(|| (usd_per_million * 1e6).round() as u64)
}

/// The shipped rows plus the config's, and the lookup.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    rows: Vec<Price>,
}

impl PriceTable {
    /// The shipped table extended and overridden by `config` rows.
    pub fn new(config: Vec<Price>) -> PriceTable {
        let mut rows = shipped();
        rows.extend(config);
        PriceTable { rows }
    }

    /// Every row, shipped first then the config's, optionally of one target.
    pub fn rows<'a>(&'a self, target: Option<&'a str>) -> impl Iterator<Item = &'a Price> + 'a {
        self.rows
            .iter()
            .filter(move |p| target.is_none_or(|t| p.target == t))
    }

    /// The price of `model` on `target`: among the rows whose glob matches, the most specific
    /// (most literal characters) wins; on a tie the config beats the shipped table and a later
    /// row beats an earlier one.
    pub fn lookup(&self, target: &str, model: &str) -> Option<&Price> {
        let specificity = |p: &Price| p.model.chars().filter(|c| !matches!(c, '*' | '?')).count();
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, p)| p.target == target && glob_match(&p.model, model))
            .max_by_key(|(i, p)| (specificity(p), *i))
            .map(|(_, p)| p)
    }
}

/// The shipped rows: (target, model glob, input, cached input, cache write, output), USD per
/// million tokens, from the providers' public price pages on [`SHIPPED_AS_OF`]. Anthropic's
/// cache write is the 5-minute cache rate (1.25 × input), its cache read 0.1 × input.
const SHIPPED: &[(&str, &str, f64, f64, f64, f64)] = &[
    // OpenAI
    ("openai", "gpt-5*", 1.25, 0.125, 0.0, 10.0),
    ("openai", "gpt-5-mini*", 0.25, 0.025, 0.0, 2.0),
    ("openai", "gpt-5-nano*", 0.05, 0.005, 0.0, 0.40),
    ("openai", "gpt-4.1*", 2.0, 0.50, 0.0, 8.0),
    ("openai", "gpt-4.1-mini*", 0.40, 0.10, 0.0, 1.60),
    ("openai", "gpt-4.1-nano*", 0.10, 0.025, 0.0, 0.40),
    ("openai", "gpt-4o*", 2.50, 1.25, 0.0, 10.0),
    ("openai", "gpt-4o-mini*", 0.15, 0.075, 0.0, 0.60),
    ("openai", "o1*", 15.0, 7.50, 0.0, 60.0),
    ("openai", "o1-mini*", 1.10, 0.55, 0.0, 4.40),
    ("openai", "o3*", 2.0, 0.50, 0.0, 8.0),
    ("openai", "o3-mini*", 1.10, 0.55, 0.0, 4.40),
    ("openai", "o4-mini*", 1.10, 0.275, 0.0, 4.40),
    ("openai", "text-embedding-3-small", 0.02, 0.02, 0.0, 0.0),
    ("openai", "text-embedding-3-large", 0.13, 0.13, 0.0, 0.0),
    // Anthropic
    ("anthropic", "claude-opus-4*", 15.0, 1.50, 18.75, 75.0),
    ("anthropic", "claude-sonnet-4*", 3.0, 0.30, 3.75, 15.0),
    ("anthropic", "claude-3-7-sonnet*", 3.0, 0.30, 3.75, 15.0),
    ("anthropic", "claude-3-5-sonnet*", 3.0, 0.30, 3.75, 15.0),
    ("anthropic", "claude-3-5-haiku*", 0.80, 0.08, 1.0, 4.0),
    ("anthropic", "claude-3-haiku*", 0.25, 0.03, 0.30, 1.25),
    // Gemini (prompts up to 200k tokens)
    ("gemini", "gemini-2.5-pro*", 1.25, 0.31, 0.0, 10.0),
    ("gemini", "gemini-2.5-flash*", 0.30, 0.075, 0.0, 2.50),
    ("gemini", "gemini-2.5-flash-lite*", 0.10, 0.025, 0.0, 0.40),
    ("gemini", "gemini-2.0-flash*", 0.10, 0.025, 0.0, 0.40),
    ("gemini", "gemini-2.0-flash-lite*", 0.075, 0.075, 0.0, 0.30),
];

fn shipped() -> Vec<Price> {
    SHIPPED
        .iter()
        .map(
            |&(target, model, input, cached_input, cache_write, output)| Price {
                target: target.into(),
                model: model.into(),
                input: pico_per_token(input).expect("shipped price"),
                cached_input: pico_per_token(cached_input).expect("shipped price"),
                cache_write: pico_per_token(cache_write).expect("shipped price"),
                output: pico_per_token(output).expect("shipped price"),
                as_of: Some(SHIPPED_AS_OF.into()),
                source: "shipped",
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cached: u64, write: u64, output: u64) -> Usage {
        Usage {
            input_tokens: Some(input),
            cached_input_tokens: Some(cached),
            cache_write_tokens: Some(write),
            output_tokens: Some(output),
            total_tokens: Some(input + output),
        }
    }

    #[test]
    fn most_specific_glob_wins_and_config_overrides_on_a_tie() {
        let t = PriceTable::new(vec![]);
        assert_eq!(
            t.lookup("openai", "gpt-4o-mini-2024-07-18").unwrap().model,
            "gpt-4o-mini*"
        );
        assert_eq!(
            t.lookup("openai", "gpt-4o-2024-08-06").unwrap().model,
            "gpt-4o*"
        );
        assert_eq!(
            t.lookup("gemini", "gemini-2.5-flash-lite").unwrap().model,
            "gemini-2.5-flash-lite*"
        );
        assert!(t.lookup("openai", "my-finetune").is_none());
        assert!(
            t.lookup("azure-openai", "gpt-4o").is_none(),
            "targets match exactly"
        );

        let custom = |model: &str, input: f64| Price {
            target: "openai".into(),
            model: model.into(),
            input: pico_per_token(input).unwrap(),
            cached_input: 0,
            cache_write: 0,
            output: 0,
            as_of: None,
            source: "config",
        };
        let t = PriceTable::new(vec![custom("gpt-4o*", 2.0), custom("*", 9.0)]);
        let p = t.lookup("openai", "gpt-4o").unwrap();
        assert_eq!((p.source, p.input), ("config", 2_000_000));
        // The shipped gpt-4o-mini* row is more specific than the config's gpt-4o*.
        assert_eq!(t.lookup("openai", "gpt-4o-mini").unwrap().source, "shipped");
        assert_eq!(t.lookup("openai", "my-finetune").unwrap().input, 9_000_000);
    }

    #[test]
    fn cost_is_exact_integer_micro_usd() {
        let t = PriceTable::new(vec![]);
        // Anthropic Sonnet: 7 plain × 3 + 9,800 cached × 0.30 + 1,200 written × 3.75 + 50 × 15
        // = 21 + 2,940 + 4,500 + 750 = 8,211 micro-USD.
        let sonnet = t.lookup("anthropic", "claude-sonnet-4-5").unwrap();
        assert_eq!(sonnet.cost_micros(&usage(11_007, 9_800, 1_200, 50)), 8_211);
        // gpt-4o-mini: 1 plain token at 0.15 = 0.15 micro-USD, rounds to 0; 4 → 0.6 → 1.
        let mini = t.lookup("openai", "gpt-4o-mini").unwrap();
        assert_eq!(mini.cost_micros(&usage(1, 0, 0, 0)), 0);
        assert_eq!(mini.cost_micros(&usage(4, 0, 0, 0)), 1);
        // One million output tokens of gpt-4o cost exactly 10 USD.
        let gpt4o = t.lookup("openai", "gpt-4o").unwrap();
        assert_eq!(gpt4o.cost_micros(&usage(0, 0, 0, 1_000_000)), 10_000_000);
        // Cache counts larger than the input (a broken report) do not underflow: 0 plain,
        // 9 cached × 1.25 = 11.25 → 11.
        assert_eq!(gpt4o.cost_micros(&usage(5, 9, 9, 0)), 11);
    }

    #[test]
    fn figures_outside_the_sane_range_are_refused() {
        assert_eq!(pico_per_token(2.5), Some(2_500_000));
        assert_eq!(pico_per_token(0.0), Some(0));
        for bad in [-0.01, f64::NAN, f64::INFINITY, 2e6] {
            assert_eq!(pico_per_token(bad), None, "{bad}");
        }
    }
}
