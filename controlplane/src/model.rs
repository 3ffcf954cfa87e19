//! The mesh as translation sees it: services with their ports and
//! endpoints, in plain types built from Kubernetes objects (discovery fills
//! them; tests write them directly).

use std::collections::BTreeMap;

/// The cluster's DNS suffix.
pub const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// A Kubernetes Service (or a ServiceEntry host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.{DOMAIN_SUFFIX}", self.name, self.namespace)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u32,
    pub protocol: Protocol,
}

/// What a port speaks, as Istio selects it: `appProtocol` first, then the
/// port name's prefix (`http`, `http-web`, `grpc-api`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
    /// Not declared: sniffed on outbound.
    Unknown,
}

impl Protocol {
    pub fn select(port_name: &str, app_protocol: Option<&str>) -> Self {
        let from = |name: &str| match name.to_ascii_lowercase().as_str() {
            "http" | "http/1.1" => Some(Self::Http),
            "http2" | "h2c" | "kubernetes.io/h2c" => Some(Self::Http2),
            "grpc" | "grpc-web" => Some(Self::Grpc),
            "https" => Some(Self::Https),
            "tls" => Some(Self::Tls),
            "tcp" | "mongo" | "redis" | "mysql" => Some(Self::Tcp),
            _ => None,
        };
        app_protocol
            .and_then(from)
            .or_else(|| from(port_name.split('-').next().unwrap_or_default()))
            .unwrap_or(Self::Unknown)
    }

    /// Whether requests on it are HTTP, routed by the L7 filters.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }
}

/// One address that serves a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    /// The service port this serves, by number.
    pub service_port: u32,
    /// The port the address listens on.
    pub port: u32,
    /// The pod's labels, which DestinationRule subsets select on.
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
}
