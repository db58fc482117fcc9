//! Structured logs: JSON lines on stderr, level from `$KEYWARD_LOG` (default `info`).
//!
//! Nothing that reaches a log line may carry a secret, token, header value or body; callers log
//! ids, names, statuses and reasons only.

/// Installs the global JSON subscriber; a second call is a no-op.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .try_init();
}
