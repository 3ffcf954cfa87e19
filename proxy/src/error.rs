//! The proxy's one error type.

/// What can go wrong in the proxy. Configuration errors name the resource
/// and the field; they reject that resource alone (a NACK, or a bootstrap
/// file that does not load) and never what already serves.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{variable}: {message}")]
    Environment { variable: String, message: String },

    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a bootstrap file: {message}")]
    Bootstrap { path: String, message: String },

    /// A resource the proxy cannot serve, with the field at fault.
    #[error("{kind} {name}: {field}: {message}")]
    Resource {
        kind: &'static str,
        name: String,
        field: String,
        message: String,
    },

    #[error("binding {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An invalid field of a resource.
    pub fn resource(
        kind: &'static str,
        name: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Resource {
            kind,
            name: name.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
