//! Durations as written in Bowline's and Istio's APIs alike: Go's syntax
//! (`30s`, `1.5s`, `100ms`, `1h30m`), which is what Istio's users write and
//! what the API server's CEL `duration()` reads.

use std::time::Duration;

/// The duration `text` says, or `None` when it is not one (or negative).
pub fn parse(text: &str) -> Option<Duration> {
    let nanos = go_parse_duration::parse_duration(text).ok()?;
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_read() {
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-1s"), None);
    }
}
