//! Shared fixtures for integration tests. Each file here must stay usable on its own, because
//! `examples/` and `benches/` include them with `#[path = ...]`.

pub mod daemon;
pub mod mock_upstream;
pub mod uds;
