//! Shared fixtures for integration tests. `mock_upstream.rs` must stay usable on its own,
//! because `examples/` and `benches/` include it with `#[path = ...]`.

#![allow(dead_code)]

pub mod daemon;
pub mod hsm;
pub mod kms;
pub mod mock_upstream;
pub mod needs;
pub mod token_endpoint;
pub mod uds;

use daemon::Daemon;
use mock_upstream::MockUpstream;

/// Config TOML: `extra`, then each of `targets` pointed at `mock`, trusting its CA (written
/// into `dir`).
pub fn targets_config(
    mock: &MockUpstream,
    dir: &std::path::Path,
    targets: &[&str],
    extra: &str,
) -> String {
    let ca = mock.write_ca(dir);
    let mut toml = format!("{extra}\n");
    for t in targets {
        toml.push_str(&format!(
            "[targets.{t}]\nbase_url = \"{}\"\nca_file = \"{}\"\n",
            mock.base_url(),
            ca.display()
        ));
    }
    toml
}

/// A mock provider and a real daemon whose `targets` point at it.
pub struct Setup {
    /// The mock provider.
    pub mock: MockUpstream,
    /// The daemon under test.
    pub daemon: Daemon,
    /// A scratch directory that lives as long as the setup (holds the CA file).
    pub dir: tempfile::TempDir,
}

/// Starts a mock provider and a daemon whose `targets` point at it, with `extra` TOML.
pub async fn setup(targets: &[&str], extra: &str) -> Setup {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::builder()
        .config(&targets_config(&mock, dir.path(), targets, extra))
        .start();
    Setup { mock, daemon, dir }
}
