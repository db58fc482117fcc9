//! Token usage for `request.completed`: the normalised counts ([`Usage`]) and the streaming
//! reader of a response's usage report ([`UsageTap`]), which lives with the provider families
//! in [`crate::providers::usage`].

pub use crate::providers::usage::{Usage, UsageTap};
