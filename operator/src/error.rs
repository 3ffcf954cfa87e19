//! The operator's one error type, and what each kind of error means for
//! retrying.

use std::time::Duration;

/// What went wrong while reconciling a MeshInstallation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec asks for something that cannot be done; retrying will not
    /// help until it changes. The message names the field and says what to do.
    #[error("{0}")]
    InvalidSpec(String),

    /// The API server refused a rendered object as invalid (HTTP 422): that
    /// comes from the spec too (a resource quantity that does not parse, say).
    #[error("applying {object}: {message}")]
    Rejected { object: String, message: String },

    /// A request to the API server failed; worth retrying.
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },

    /// Something in the cluster has to finish first; retried.
    #[error("{0}")]
    Waiting(String),

    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// An object could not be encoded; a bug in the operator.
    #[error("encoding {what}: {source}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }

    /// Whether the spec must change before this can succeed: such errors
    /// make the installation Stalled and are not retried.
    pub fn is_invalid_spec(&self) -> bool {
        match self {
            Self::InvalidSpec(_) | Self::Rejected { .. } => true,
            Self::Finalizer(inner) => matches!(
                inner.as_ref(),
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e)
                    if e.is_invalid_spec()
            ),
            _ => false,
        }
    }

    /// A short, fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "invalid_spec",
            Self::Rejected { .. } => "rejected",
            Self::Kube { .. } => "kube",
            Self::Waiting(_) => "waiting",
            Self::Finalizer(_) => "finalizer",
            Self::Encode { .. } => "encode",
        }
    }

    /// The reason a condition carries for this error.
    pub fn condition_reason(&self) -> &'static str {
        if self.is_invalid_spec() {
            "InvalidSpec"
        } else {
            "ApplyFailed"
        }
    }
}

/// How long to wait before retrying after the `attempt`-th consecutive
/// transient failure: 1 s doubling to 5 minutes.
pub fn backoff(attempt: u32) -> Duration {
    let doubled = 1u64 << attempt.saturating_sub(1).min(9);
    Duration::from_secs(doubled).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_five_minutes() {
        let waits: Vec<u64> = (1..=11).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }
}
