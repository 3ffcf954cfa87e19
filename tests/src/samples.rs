//! What the sample apps (`sample-echo`, `sample-grpc` in src/bin) share.

use std::time::Duration;

/// A Go-style duration (`500ms`, `2s`), for the samples' flags.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    go_parse_duration::parse_duration(text)
        .ok()
        .and_then(|nanos| u64::try_from(nanos).ok())
        .map(Duration::from_nanos)
        .ok_or_else(|| format!("{text:?} is not a duration such as 500ms or 2s"))
}

/// Resolves at SIGTERM and a few seconds more (`SHUTDOWN_DELAY`, 3s by
/// default): a well-behaved pod keeps serving while its endpoint's removal
/// reaches every client.
pub async fn terminated() {
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        term.recv().await;
    }
    let delay = std::env::var("SHUTDOWN_DELAY")
        .ok()
        .and_then(|d| parse_duration(&d).ok())
        .unwrap_or(Duration::from_secs(3));
    eprintln!("stopping in {delay:?}");
    tokio::time::sleep(delay).await;
}
