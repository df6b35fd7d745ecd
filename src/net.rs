//! What every listening port does when `accept` fails: say so and pause,
//! rather than spin on an error that is still there (out of file
//! descriptors and the like).

use std::time::Duration;

/// How long a port waits after a failed accept.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Logs a failed accept on `port` and waits [`ACCEPT_PAUSE`].
pub async fn accept_failed(port: &str, error: &std::io::Error) {
    tracing::warn!(port, %error, "accept failed");
    tokio::time::sleep(ACCEPT_PAUSE).await;
}
