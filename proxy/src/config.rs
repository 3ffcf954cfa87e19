//! The proxy's settings, read once at start-up from the environment the
//! injector and the operator give its container (Istio's variable names)
//! and from the command line. Everything else arrives over xDS, or from a
//! bootstrap file when there is no control plane.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Where the control plane is (`host:port`).
pub const ENV_DISCOVERY_ADDRESS: &str = "DISCOVERY_ADDRESS";
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_INSTANCE_IP: &str = "INSTANCE_IP";
/// The app's probes injection rewrote to the sidecar (JSON by path).
pub const ENV_APP_PROBERS: &str = "ISTIO_KUBE_APP_PROBERS";
pub const ENV_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// The DNS domain of the node id (`<ns>.svc.cluster.local`).
pub const ENV_DNS_DOMAIN: &str = "DNS_DOMAIN";
/// Worker threads; 0 or unset means two (Istio's sidecar default).
pub const ENV_CONCURRENCY: &str = "BOWLINE_PROXY_CONCURRENCY";
/// A bootstrap file: static resources, no control plane needed.
pub const ENV_BOOTSTRAP: &str = "BOWLINE_PROXY_BOOTSTRAP";
/// Where the certificate authority is (`host:port`), when not the control
/// plane's address (Istio's variable). With a bootstrap file, setting it
/// makes the proxy fetch its SVID there.
pub const ENV_CA_ADDRESS: &str = "CA_ADDR";
/// The lifetime asked for the workload certificate (Istio's variable, a
/// duration such as `24h` or `90s`; the CA's default when unset).
pub const ENV_SECRET_TTL: &str = "SECRET_TTL";
/// The trust domain of the SPIFFE ID put in the CSR (the CA decides the
/// certificate's, from the token).
pub const ENV_TRUST_DOMAIN: &str = "TRUST_DOMAIN";
/// Prefix of the variables that become node metadata (Istio's convention:
/// `ISTIO_META_CLUSTER_ID=Kubernetes` → `CLUSTER_ID: Kubernetes`).
pub const ENV_META_PREFIX: &str = "ISTIO_META_";
/// Prefix of the variables whose JSON value becomes node metadata
/// (`ISTIO_METAJSON_LABELS={"app":"reviews"}` → `LABELS`).
pub const ENV_META_JSON_PREFIX: &str = "ISTIO_METAJSON_";
/// The mesh root that the control plane's serving certificate chains to
/// (Istio's variable; the `istio-ca-root-cert` ConfigMap's mount).
pub const ENV_ROOT_CERT: &str = "XDS_ROOT_CA";
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// The ServiceAccount token presented to the control plane, re-read on
/// every connection since the kubelet rotates it.
pub const ENV_TOKEN: &str = "BOWLINE_PROXY_TOKEN_PATH";
pub const DEFAULT_TOKEN: &str = "/var/run/secrets/tokens/istio-token";
/// The name the control plane's certificate must carry, when it is not
/// the host of DISCOVERY_ADDRESS (Istio's variable).
pub const ENV_SERVER_NAME: &str = "ISTIOD_SAN";
/// How long in-flight requests may take to finish once the proxy is asked
/// to stop (Istio's variable; seconds, default 5).
pub const ENV_DRAIN_DURATION: &str = "TERMINATION_DRAIN_DURATION_SECONDS";
/// Where readiness (`/healthz/ready`) is served; Istio's port 15021 on
/// every address unless set, for running several proxies on one host.
pub const ENV_STATUS_ADDRESS: &str = "BOWLINE_PROXY_STATUS_ADDRESS";
/// Where the merged metrics are served (Istio's 15020, which Prometheus
/// scrapes by the pod's `prometheus.io/port` annotation).
pub const ENV_STATS_ADDRESS: &str = "BOWLINE_PROXY_STATS_ADDRESS";
/// Where the proxy's own metrics are served (Envoy's 15090, which Istio's
/// PodMonitors scrape).
pub const ENV_PROMETHEUS_ADDRESS: &str = "BOWLINE_PROXY_PROMETHEUS_ADDRESS";
/// The admin endpoint (Envoy's 127.0.0.1:15000): configuration dump,
/// stats, readiness, log level. Loopback only unless set otherwise.
pub const ENV_ADMIN_ADDRESS: &str = "BOWLINE_PROXY_ADMIN_ADDRESS";

/// Where the settings come from: the process environment, or a map in
/// tests.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
    /// Every variable, for the node metadata prefix.
    fn all(&self) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn all(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
    fn all(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What the proxy is: a workload's sidecar or a gateway (Envoy's node types
/// `sidecar` and `router`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sidecar,
    Gateway,
}

impl Mode {
    /// The node type in the node id.
    pub fn node_type(self) -> &'static str {
        match self {
            Mode::Sidecar => "sidecar",
            Mode::Gateway => "router",
        }
    }
}

/// Where the configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Delta ADS from the control plane.
    Discovery(Discovery),
    /// Static resources in a bootstrap file.
    Bootstrap(PathBuf),
}

/// The control plane and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// `host:port`
    pub address: String,
    /// The DNS name its serving certificate must carry.
    pub server_name: String,
    /// PEM file of the mesh root.
    pub root_cert: PathBuf,
    /// File of the ServiceAccount token.
    pub token: PathBuf,
}

/// Everything the proxy is started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub source: Source,
    /// `sidecar~10.244.0.5~ratings-7d9f.default~default.svc.cluster.local`
    pub node_id: String,
    /// Node metadata (from `ISTIO_META_*` and `ISTIO_METAJSON_*`), what
    /// the control plane is told about this proxy beside its node id.
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub workers: usize,
    /// Readiness, Istio's 15021 by default.
    pub status: SocketAddr,
    /// Merged metrics, 15020.
    pub stats: SocketAddr,
    /// The proxy's metrics, 15090.
    pub prometheus: SocketAddr,
    /// Admin, 127.0.0.1:15000.
    pub admin: SocketAddr,
    /// How long connections may drain after a stop.
    pub drain: std::time::Duration,
    /// Where the workload's certificate comes from, if the proxy asks a CA
    /// for one (else the configuration's own secrets serve).
    pub ca: Option<Ca>,
    /// The app's probes, which the proxy runs for the kubelet.
    pub app_probers: crate::probe::AppProbers,
}

/// The certificate authority and what is asked of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    /// Reached as the control plane is: TLS to the mesh root, the token.
    pub endpoint: Discovery,
    /// The SPIFFE ID asked for (the CA names the token's account anyway).
    pub spiffe_id: Option<String>,
    pub ttl: Option<std::time::Duration>,
}

impl Config {
    /// Reads the settings; `bootstrap` (from the command line) wins over
    /// the environment's.
    pub fn from_env(mode: Mode, bootstrap: Option<PathBuf>, env: &impl Env) -> Result<Self> {
        let namespace = env
            .get(ENV_POD_NAMESPACE)
            .unwrap_or_else(|| "default".into());
        let pod = env
            .get(ENV_POD_NAME)
            .unwrap_or_else(|| "bowline-proxy".into());
        let instance_ip = parsed(env, ENV_INSTANCE_IP, "an IP address")?;
        let ip = instance_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let app_probers = match env.get(ENV_APP_PROBERS) {
            Some(json) => {
                crate::probe::AppProbers::parse(&json, instance_ip).map_err(|message| {
                    Error::Environment {
                        variable: ENV_APP_PROBERS.into(),
                        message,
                    }
                })?
            }
            None => Default::default(),
        };
        let domain = env
            .get(ENV_DNS_DOMAIN)
            .unwrap_or_else(|| format!("{namespace}.svc.cluster.local"));
        let node_id = format!("{}~{ip}~{pod}.{namespace}~{domain}", mode.node_type());

        let source = match bootstrap.or_else(|| env.get(ENV_BOOTSTRAP).map(PathBuf::from)) {
            Some(path) => Source::Bootstrap(path),
            None => {
                let address = env.get(ENV_DISCOVERY_ADDRESS).ok_or_else(|| Error::Environment {
                    variable: ENV_DISCOVERY_ADDRESS.into(),
                    message: "not set: set the control plane's host:port, or give a bootstrap file (--bootstrap)".into(),
                })?;
                Source::Discovery(discovery_at(env, address, ENV_DISCOVERY_ADDRESS)?)
            }
        };
        let ca_endpoint = match (&source, env.get(ENV_CA_ADDRESS)) {
            (_, Some(address)) => Some(discovery_at(env, address, ENV_CA_ADDRESS)?),
            (Source::Discovery(discovery), None) => Some(discovery.clone()),
            (Source::Bootstrap(_), None) => None,
        };
        let ttl = env
            .get(ENV_SECRET_TTL)
            .map(|ttl| {
                go_duration(&ttl).ok_or_else(|| Error::Environment {
                    variable: ENV_SECRET_TTL.into(),
                    message: format!("{ttl:?} is not a duration (like 24h or 90s)"),
                })
            })
            .transpose()?;
        let trust_domain = env
            .get(ENV_TRUST_DOMAIN)
            .unwrap_or_else(|| "cluster.local".into());
        let ca = ca_endpoint.map(|endpoint| Ca {
            endpoint,
            spiffe_id: env
                .get(ENV_SERVICE_ACCOUNT)
                .map(|sa| format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")),
            ttl,
        });
        let workers = parsed(env, ENV_CONCURRENCY, "a number of threads")?.unwrap_or(0);
        let drain = parsed(env, ENV_DRAIN_DURATION, "a number of seconds")?.unwrap_or(5);
        let address = |name, ip, port| -> Result<SocketAddr> {
            Ok(parsed(env, name, "an address (ip:port)")?
                .unwrap_or(SocketAddr::new(IpAddr::V4(ip), port)))
        };
        let status = address(ENV_STATUS_ADDRESS, Ipv4Addr::UNSPECIFIED, 15021)?;
        let stats = address(ENV_STATS_ADDRESS, Ipv4Addr::UNSPECIFIED, 15020)?;
        let prometheus = address(ENV_PROMETHEUS_ADDRESS, Ipv4Addr::UNSPECIFIED, 15090)?;
        let admin = address(ENV_ADMIN_ADDRESS, Ipv4Addr::LOCALHOST, 15000)?;
        let mut metadata = BTreeMap::new();
        for (variable, value) in env.all() {
            if let Some(key) = variable.strip_prefix(ENV_META_JSON_PREFIX) {
                let value = serde_json::from_str(&value).map_err(|e| Error::Environment {
                    variable: variable.clone(),
                    message: format!("not JSON: {e}"),
                })?;
                metadata.insert(key.to_string(), value);
            } else if let Some(key) = variable.strip_prefix(ENV_META_PREFIX) {
                metadata.insert(key.to_string(), serde_json::Value::String(value));
            }
        }
        metadata.insert("NAMESPACE".into(), namespace.into());
        if let Some(account) = env.get(ENV_SERVICE_ACCOUNT) {
            metadata.insert("SERVICE_ACCOUNT".into(), account.into());
        }
        Ok(Self {
            mode,
            source,
            node_id,
            metadata,
            workers: if workers == 0 { 2 } else { workers },
            status,
            stats,
            prometheus,
            admin,
            drain: std::time::Duration::from_secs(drain),
            ca,
            app_probers,
        })
    }
}

/// The variable `name` parsed, if set; an error names the variable and
/// what it should hold.
fn parsed<T>(env: &impl Env, name: &str, what: &str) -> Result<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    env.get(name)
        .map(|text| {
            text.parse().map_err(|e| Error::Environment {
                variable: name.into(),
                message: format!("{text:?} is not {what}: {e}"),
            })
        })
        .transpose()
}

/// The control plane (or CA) at `address` (`host:port`, read from
/// `variable`), reached with the mesh root and the ServiceAccount token.
fn discovery_at(env: &impl Env, address: String, variable: &str) -> Result<Discovery> {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        _ => {
            return Err(Error::Environment {
                variable: variable.into(),
                message: format!("{address:?} is not host:port"),
            });
        }
    };
    Ok(Discovery {
        server_name: env.get(ENV_SERVER_NAME).unwrap_or(host),
        root_cert: env
            .get(ENV_ROOT_CERT)
            .unwrap_or_else(|| DEFAULT_ROOT_CERT.into())
            .into(),
        token: env
            .get(ENV_TOKEN)
            .unwrap_or_else(|| DEFAULT_TOKEN.into())
            .into(),
        address,
    })
}

/// A Go-style duration (`24h`, `90s`, `1h30m`, `500ms`).
fn go_duration(text: &str) -> Option<std::time::Duration> {
    let nanos = go_parse_duration::parse_duration(text).ok()?;
    u64::try_from(nanos)
        .ok()
        .map(std::time::Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_sidecar_reads_the_injected_environment() {
        let config = Config::from_env(
            Mode::Sidecar,
            None,
            &env(&[
                (ENV_DISCOVERY_ADDRESS, "istiod.istio-system.svc:15012"),
                (ENV_POD_NAME, "ratings-7d9f"),
                (ENV_POD_NAMESPACE, "shop"),
                (ENV_INSTANCE_IP, "10.244.0.5"),
                (ENV_SERVICE_ACCOUNT, "ratings"),
                ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
                ("ISTIO_METAJSON_LABELS", r#"{"app":"ratings"}"#),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.node_id,
            "sidecar~10.244.0.5~ratings-7d9f.shop~shop.svc.cluster.local"
        );
        assert_eq!(config.metadata["CLUSTER_ID"], "Kubernetes");
        assert_eq!(config.metadata["SERVICE_ACCOUNT"], "ratings");
        assert_eq!(
            config.metadata["LABELS"],
            serde_json::json!({"app": "ratings"})
        );
        assert_eq!(config.workers, 2);
        match config.source {
            Source::Discovery(d) => {
                assert_eq!(d.address, "istiod.istio-system.svc:15012");
                assert_eq!(d.server_name, "istiod.istio-system.svc");
                assert_eq!(d.root_cert, PathBuf::from(DEFAULT_ROOT_CERT));
                assert_eq!(d.token, PathBuf::from(DEFAULT_TOKEN));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bootstrap_file_needs_no_control_plane() {
        let config = Config::from_env(
            Mode::Gateway,
            Some("/etc/bowline/bootstrap.yaml".into()),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(
            config.source,
            Source::Bootstrap("/etc/bowline/bootstrap.yaml".into())
        );
        assert!(config.node_id.starts_with("router~"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let error = Config::from_env(Mode::Sidecar, None, &env(&[])).unwrap_err();
        assert!(
            error.to_string().starts_with("DISCOVERY_ADDRESS: not set"),
            "{error}"
        );
        let error = Config::from_env(
            Mode::Sidecar,
            Some("b.yaml".into()),
            &env(&[(ENV_CONCURRENCY, "many")]),
        )
        .unwrap_err();
        assert!(
            error.to_string().starts_with("BOWLINE_PROXY_CONCURRENCY:"),
            "{error}"
        );
    }
}
