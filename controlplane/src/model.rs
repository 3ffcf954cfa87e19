//! The mesh as translation sees it: services with their ports and
//! endpoints, the Istio config, and the proxy asking — in plain types built
//! from Kubernetes objects (discovery fills them; tests write them
//! directly). A [`Snapshot`] is immutable; discovery makes a new one per
//! change, sharing the parts that did not change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bowline_api::install::OutboundTrafficMode;
use bowline_api::networking::{
    DestinationRuleSpec, GatewaySpec, ServiceEntrySpec, SidecarSpec, VirtualServiceSpec,
};
use bowline_api::security::{AuthorizationPolicySpec, PeerAuthenticationSpec};

/// The cluster's DNS suffix.
pub const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// Everything translation reads, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Kubernetes Services and ServiceEntry hosts, by hostname.
    pub services: Arc<BTreeMap<String, Service>>,
    /// The endpoints of each service, by hostname.
    pub endpoints: Arc<BTreeMap<String, Vec<Endpoint>>>,
    pub virtual_services: Arc<Vec<Config<VirtualServiceSpec>>>,
    pub destination_rules: Arc<Vec<Config<DestinationRuleSpec>>>,
    pub gateways: Arc<Vec<Config<GatewaySpec>>>,
    pub service_entries: Arc<Vec<Config<ServiceEntrySpec>>>,
    pub sidecars: Arc<Vec<Config<SidecarSpec>>>,
    pub peer_authentications: Arc<Vec<Config<PeerAuthenticationSpec>>>,
    pub authorization_policies: Arc<Vec<Config<AuthorizationPolicySpec>>>,
    /// Pods, by `namespace/name`: who a connecting proxy is.
    pub workloads: Arc<BTreeMap<String, Workload>>,
    /// TLS Secrets (gateway and DestinationRule credentials), by
    /// `namespace/name`.
    pub secrets: Arc<BTreeMap<String, TlsSecret>>,
    pub mesh: Arc<Mesh>,
}

impl Snapshot {
    /// The service accounts the endpoints of `host` run as, each once: the
    /// identities mesh TLS toward it accepts.
    pub fn service_accounts(&self, host: &str) -> BTreeSet<&str> {
        self.endpoints
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|e| e.service_account.as_deref())
            .collect()
    }

    /// Whether some service's endpoints run as other service accounts here
    /// than in `before`: its clusters accept other identities, so a change
    /// of endpoints alone is more than endpoints to its callers (Istio
    /// makes it a full push too).
    pub fn identities_differ(&self, before: &Snapshot) -> bool {
        if Arc::ptr_eq(&self.endpoints, &before.endpoints) {
            return false;
        }
        let hosts: BTreeSet<&String> = self
            .endpoints
            .keys()
            .chain(before.endpoints.keys())
            .collect();
        hosts
            .into_iter()
            .any(|host| self.service_accounts(host) != before.service_accounts(host))
    }
}

/// A Secret's certificate, key and CA, in PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSecret {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ca: Option<String>,
}

/// A pod, as far as a proxy's identity goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub labels: BTreeMap<String, String>,
    pub ip: String,
    pub service_account: String,
}

/// The mesh-wide settings translation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Mesh {
    /// Where mesh-wide config lives (`istio-system`).
    pub root_namespace: String,
    pub trust_domain: String,
    pub outbound: OutboundTrafficMode,
    /// Where proxies write access logs (`accessLogFile`), and whether as
    /// JSON (`accessLogEncoding`); none when unset.
    pub access_log: Option<AccessLogSettings>,
    /// Where proxies send spans and how many requests they trace
    /// (`enableTracing`, `defaultConfig.tracing`); none when tracing is
    /// off or no collector is named.
    pub tracing: Option<TracingSettings>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TracingSettings {
    /// The OTLP/gRPC collector's host (a service's FQDN) and port.
    pub host: String,
    pub port: u16,
    /// The percentage of requests traced (Istio's default is 1).
    pub sampling: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogSettings {
    pub path: String,
    pub json: bool,
}

impl Default for Mesh {
    fn default() -> Self {
        Self {
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
            outbound: OutboundTrafficMode::AllowAny,
            access_log: None,
            tracing: None,
        }
    }
}

/// An Istio config object: its spec, and where and when it was made (the
/// oldest wins where two conflict, as in Istio).
#[derive(Clone, Debug, PartialEq)]
pub struct Config<T> {
    pub name: String,
    pub namespace: String,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    pub spec: T,
}

impl<T> Config<T> {
    pub fn new(name: &str, namespace: &str, spec: T) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            created: 0,
            spec,
        }
    }
}

/// The oldest of `configs` (then by namespace and name): Istio's winner
/// where several apply.
pub fn oldest<'a, T>(configs: impl IntoIterator<Item = &'a Config<T>>) -> Option<&'a Config<T>> {
    configs
        .into_iter()
        .min_by(|a, b| (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name)))
}

/// A proxy asking for configuration: a workload's sidecar or a gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// The node id it connected with.
    pub id: String,
    pub kind: ProxyKind,
    pub namespace: String,
    /// Its pod's labels (Sidecar and Gateway selectors, `sourceLabels`).
    pub labels: BTreeMap<String, String>,
    pub ip: String,
    /// Whether its traffic is captured (iptables) onto 15001 and 15006;
    /// a proxy with `INTERCEPTION_MODE: NONE` in its metadata gets no
    /// virtual listeners, only those it binds.
    pub captured: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    Sidecar,
    Gateway,
}

/// `host` as written in config in `namespace`, made a full name: a short
/// name (no dot) is a Service of that namespace; anything else, wildcards
/// included, stands as written.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" {
        host.to_string()
    } else {
        format!("{host}.{namespace}.{DOMAIN_SUFFIX}")
    }
}

/// Whether config naming `pattern` (full name or `*.suffix`, or `*`)
/// applies to `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Config by the hosts it names (resolved in its namespace): exact hosts
/// looked up directly, wildcards tried in turn. Built once per scope, so
/// that finding a service's rule or route does not scan all config.
#[derive(Debug)]
pub struct HostIndex<'s, T> {
    exact: std::collections::HashMap<String, Vec<&'s Config<T>>>,
    wildcard: Vec<(String, &'s Config<T>)>,
}

impl<'s, T> HostIndex<'s, T> {
    /// `hosts` gives the hosts each config names, as written.
    pub fn new(
        configs: impl IntoIterator<Item = &'s Config<T>>,
        hosts: impl Fn(&'s Config<T>) -> Vec<&'s str>,
    ) -> Self {
        let mut index = Self {
            exact: Default::default(),
            wildcard: Vec::new(),
        };
        for config in configs {
            for host in hosts(config) {
                let host = resolve_host(host, &config.namespace);
                if host.starts_with('*') {
                    index.wildcard.push((host, config));
                } else {
                    index.exact.entry(host).or_default().push(config);
                }
            }
        }
        index
    }

    /// The configs naming `host`, exactly or by a wildcard (each once).
    pub fn find(&self, host: &str) -> Vec<&'s Config<T>> {
        let mut found: Vec<&'s Config<T>> = self.exact.get(host).cloned().unwrap_or_default();
        for (pattern, config) in &self.wildcard {
            if host_matches(pattern, host) && !found.iter().any(|c| std::ptr::eq(*c, *config)) {
                found.push(config);
            }
        }
        found
    }
}

/// Whether every `key: value` of `selector` is among `labels`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Kubernetes Service (or a ServiceEntry host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `<name>.<namespace>.svc.cluster.local`, or a ServiceEntry's host.
    pub hostname: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    /// The virtual IP, when it has one (headless Services do not).
    pub address: Option<String>,
    /// A ServiceEntry's MESH_EXTERNAL host: no mTLS toward it.
    pub external: bool,
    pub resolution: Resolution,
}

/// How a proxy finds a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resolution {
    /// From the control plane (EDS): Kubernetes endpoints, STATIC entries.
    #[default]
    Endpoints,
    /// The proxy resolves the endpoints' names (ServiceEntry DNS).
    Dns,
    /// To wherever the connection was going (ServiceEntry NONE).
    Passthrough,
}

impl Service {
    /// A Kubernetes Service `name` in `namespace`.
    pub fn kubernetes(name: &str, namespace: &str, ports: Vec<ServicePort>) -> Self {
        Self {
            hostname: format!("{name}.{namespace}.{DOMAIN_SUFFIX}"),
            namespace: namespace.into(),
            ports,
            address: None,
            external: false,
            resolution: Resolution::Endpoints,
        }
    }

    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
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
    /// Whether a sidecar serves it (`security.istio.io/tlsMode: istio`):
    /// auto-mTLS sends it mutual TLS.
    pub sidecar: bool,
    /// The ServiceAccount its workload runs as: mesh TLS toward the
    /// service accepts only these identities.
    pub service_account: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, service_account: Option<&str>) -> Endpoint {
        Endpoint {
            address: address.into(),
            service_port: 80,
            port: 8080,
            labels: BTreeMap::new(),
            ready: false,
            sidecar: true,
            service_account: service_account.map(Into::into),
        }
    }

    fn with(endpoints: &[Endpoint]) -> Snapshot {
        Snapshot {
            endpoints: Arc::new(
                [(
                    "echo.split.svc.cluster.local".to_string(),
                    endpoints.to_vec(),
                )]
                .into(),
            ),
            ..Snapshot::default()
        }
    }

    #[test]
    fn only_a_new_or_gone_service_account_changes_identities() {
        let v1 = endpoint("10.0.0.1", Some("echo-v1"));
        let before = with(std::slice::from_ref(&v1));
        // Another pod of the same account, or a readiness change: endpoints.
        let mut ready = v1.clone();
        ready.ready = true;
        assert!(!with(&[ready, endpoint("10.0.0.2", Some("echo-v1"))]).identities_differ(&before));
        // A pod of another account (echo-v2), or one whose pod was not
        // known before: its service's clusters accept another identity.
        let v2 = endpoint("10.0.0.3", Some("echo-v2"));
        assert!(with(&[v1.clone(), v2.clone()]).identities_differ(&before));
        let unknown = with(&[v1.clone(), endpoint("10.0.0.3", None)]);
        assert!(!unknown.identities_differ(&before));
        assert!(with(&[v1.clone(), v2]).identities_differ(&unknown));
        // The last pod of an account gone, or the service with it.
        assert!(Snapshot::default().identities_differ(&before));
        assert_eq!(
            before.service_accounts("echo.split.svc.cluster.local"),
            ["echo-v1"].into()
        );
    }
}
