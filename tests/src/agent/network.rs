//! The agent's pod network, as a CNI plugin and kube-proxy would make it on
//! a node — but inside network namespaces only, so no address or rule
//! touches the machine's own network:
//!
//! - a "node" namespace: the node's address ([`NODE_IP`]) and the
//!   `kubernetes` Service's ([`KUBERNETES_SERVICE_IP`]) on its loopback, IP
//!   forwarding on, and kube-proxy's DNAT rules for every Service;
//! - per pod a namespace with `eth0`, the pod's /32 and a default route to
//!   the node (a link-local gateway, as Calico has, which is an address of
//!   the node's own), so that every packet between pods crosses the node's
//!   netfilter;
//! - per pod a hosts file (`/etc/netns/<namespace>/hosts`, which
//!   `ip netns exec` mounts on `/etc/hosts`) naming every Service.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::cluster::{KUBERNETES_SERVICE_IP, SERVICE_CIDR};
use crate::netns::run;

/// The agent node's pod range and its own address. Apart from kwok's range
/// (10.244.0.0/16) and the Services' (10.96.0.0/16), so none collide.
pub const POD_SUBNET: &str = "10.248.0.0/24";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 248, 0, 1);
/// The gateway every pod routes through: an address of the node's own.
const GATEWAY: &str = "169.254.1.1";

/// The node's namespace and the pods'; removed when dropped.
#[derive(Debug)]
pub struct PodNetwork {
    prefix: String,
    node: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Pod network namespace → its address and its Kubernetes namespace.
    pods: BTreeMap<String, (Ipv4Addr, String)>,
    next_link: u32,
    /// Every Service's ClusterIP, name and namespace, for the hosts files.
    services: Vec<(Ipv4Addr, String, String)>,
}

impl PodNetwork {
    /// The node namespace, named after `prefix` (unique per agent).
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let node = format!("{prefix}-node");
        run(&["ip", "netns", "add", &node]).context("ip netns add (needs root and iproute2)")?;
        let network = Self {
            prefix: prefix.to_string(),
            node,
            state: Mutex::new(State::default()),
        };
        let n = &network.node;
        ip(n, &["link", "set", "lo", "up"])?;
        // The gateway is the node's own address too: the node answers pods'
        // ARP for it, and it is where their packets enter the node.
        for address in [NODE_IP, KUBERNETES_SERVICE_IP, GATEWAY.parse()?] {
            ip(n, &["addr", "add", &format!("{address}/32"), "dev", "lo"])?;
        }
        run(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        // ClusterIPs are the node's own until DNAT sends them on: what the
        // node itself dials (the API server's tunnel) needs a route before
        // the rules apply, and a Service with no endpoints refuses at once.
        ip(n, &["route", "add", "local", SERVICE_CIDR, "dev", "lo"])?;
        network.write_service_rules(&[], &[])?;
        Ok(network)
    }

    /// The node's namespace.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A network namespace for a pod of Kubernetes namespace `namespace`,
    /// with the next free address; returns its name and address.
    pub fn add_pod(&self, namespace: &str) -> anyhow::Result<(String, Ipv4Addr)> {
        let (ns, address, link, services) = {
            let mut state = self.state.lock().expect("network state");
            let used: HashSet<Ipv4Addr> = state.pods.values().map(|(ip, _)| *ip).collect();
            let ip = (2..255u8)
                .map(|i| Ipv4Addr::new(10, 248, 0, i))
                .find(|ip| !used.contains(ip))
                .context("the node's pod range (253 addresses) is full")?;
            state.next_link += 1;
            let link = format!("veth{}", state.next_link);
            let ns = format!("{}-p{}", self.prefix, state.next_link);
            state.pods.insert(ns.clone(), (ip, namespace.to_string()));
            (ns, ip, link, state.services.clone())
        };
        write_hosts(&ns, address, namespace, &services)?;
        run(&["ip", "netns", "add", &ns])?;
        let n = &self.node;
        ip(
            n,
            &[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip(n, &["link", "set", &link, "up"])?;
        ip(n, &["route", "add", &format!("{address}/32"), "dev", &link])?;
        ip(&ns, &["link", "set", "lo", "up"])?;
        ip(
            &ns,
            &["addr", "add", &format!("{address}/32"), "dev", "eth0"],
        )?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        ip(
            &ns,
            &["route", "add", GATEWAY, "dev", "eth0", "scope", "link"],
        )?;
        ip(
            &ns,
            &["route", "add", "default", "via", GATEWAY, "dev", "eth0"],
        )?;
        Ok((ns, address))
    }

    /// Removes a pod's namespace (its veth goes with it).
    pub fn remove_pod(&self, ns: &str) {
        self.state.lock().expect("network state").pods.remove(ns);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .status();
        let _ = std::fs::remove_dir_all(etc_dir(ns));
    }

    /// Rewrites kube-proxy's rules and every pod's hosts file for
    /// `services` and their `slices`.
    pub fn sync_services(
        &self,
        services: &[std::sync::Arc<Service>],
        slices: &[std::sync::Arc<EndpointSlice>],
    ) -> anyhow::Result<()> {
        self.write_service_rules(services, slices)?;
        let named: Vec<(Ipv4Addr, String, String)> = services
            .iter()
            .filter_map(|s| {
                Some((
                    cluster_ip(s)?,
                    s.metadata.name.clone()?,
                    s.metadata.namespace.clone()?,
                ))
            })
            .collect();
        let pods = {
            let mut state = self.state.lock().expect("network state");
            state.services = named.clone();
            state.pods.clone()
        };
        for (ns, (ip, namespace)) in pods {
            write_hosts(&ns, ip, &namespace, &named)?;
        }
        Ok(())
    }

    /// kube-proxy's iptables mode, reduced: per Service port a chain that
    /// picks one ready endpoint at random and DNATs to it; traffic a pod
    /// sends to itself through its Service is SNATed to the node so the
    /// answer comes back the same way.
    fn write_service_rules(
        &self,
        services: &[std::sync::Arc<Service>],
        slices: &[std::sync::Arc<EndpointSlice>],
    ) -> anyhow::Result<()> {
        let rules = service_rules(services, slices);
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.node, "iptables-restore"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("iptables-restore")?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("iptables-restore's input")?
            .write_all(rules.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "iptables-restore in {}: {}\n{rules}",
                self.node,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let pods: Vec<String> = self
            .state
            .lock()
            .map(|s| s.pods.keys().cloned().collect())
            .unwrap_or_default();
        for ns in pods.iter().chain([&self.node]) {
            self.remove_pod(ns);
        }
    }
}

/// `ip -n <ns> <args>`.
fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let command: Vec<&str> = ["ip", "-n", ns]
        .iter()
        .copied()
        .chain(args.iter().copied())
        .collect();
    run(&command)?;
    Ok(())
}

fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// A pod's hosts file, naming each Service's ClusterIP as in-cluster DNS
/// with its search path would: `<name>.<namespace>.svc.cluster.local`,
/// `.svc`, `<name>.<namespace>`, and `<name>` alone in the pod's own
/// namespace. Written in place, so that the file `ip netns exec` mounted
/// sees the change.
fn write_hosts(
    ns: &str,
    ip: Ipv4Addr,
    namespace: &str,
    services: &[(Ipv4Addr, String, String)],
) -> anyhow::Result<()> {
    let mut text = format!("127.0.0.1 localhost\n{ip} {ns}\n");
    for (address, name, service_namespace) in services {
        let _ = write!(
            text,
            "{address} {name}.{service_namespace}.svc.cluster.local {name}.{service_namespace}.svc {name}.{service_namespace}"
        );
        if service_namespace == namespace {
            let _ = write!(text, " {name}");
        }
        text.push('\n');
    }
    let dir = etc_dir(ns);
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let path = dir.join("hosts");
    std::fs::write(&path, text).with_context(|| path.display().to_string())
}

fn cluster_ip(service: &Service) -> Option<Ipv4Addr> {
    service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}

/// The `nat` table for `services`: ready endpoints from their slices, by
/// port name.
pub fn service_rules(
    services: &[std::sync::Arc<Service>],
    slices: &[std::sync::Arc<EndpointSlice>],
) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut chain_count = 0;
    for service in services {
        let Some(ip) = cluster_ip(service) else {
            continue;
        };
        let (Some(name), Some(namespace)) = (
            service.metadata.name.as_deref(),
            service.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        let ports = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        for port in ports {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let endpoints = ready_endpoints(slices, namespace, name, port.name.as_deref());
            if endpoints.is_empty() {
                continue;
            }
            chain_count += 1;
            let chain = format!("BL-SVC-{chain_count}");
            let _ = writeln!(chains, ":{chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A BL-SERVICES -d {ip}/32 -p tcp --dport {} -m comment --comment \"{namespace}/{name}:{}\" -j {chain}",
                port.port,
                port.name.as_deref().unwrap_or("")
            );
            let count = endpoints.len();
            for (i, endpoint) in endpoints.iter().enumerate() {
                let remaining = count - i;
                let pick = if remaining > 1 {
                    format!(
                        "-m statistic --mode random --probability {:.5} ",
                        1.0 / remaining as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    rules,
                    "-A {chain} -s {} -j MARK --set-xmark 0x4000/0x4000",
                    endpoint.ip()
                );
                let _ = writeln!(
                    rules,
                    "-A {chain} -p tcp {pick}-j DNAT --to-destination {endpoint}"
                );
            }
        }
    }
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:BL-SERVICES - [0:0]\n{chains}\
         -A PREROUTING -j BL-SERVICES\n-A OUTPUT -j BL-SERVICES\n\
         -A POSTROUTING -m mark --mark 0x4000/0x4000 -j SNAT --to-source {NODE_IP}\n{rules}COMMIT\n"
    )
}

/// The ready endpoints of Service `namespace/name` for the port named
/// `port` (unnamed when the Service has one port) — or, when none is ready,
/// those still serving while they terminate, as kube-proxy does: a rollout
/// whose new pods are not ready yet keeps answering from the old ones.
fn ready_endpoints(
    slices: &[std::sync::Arc<EndpointSlice>],
    namespace: &str,
    name: &str,
    port: Option<&str>,
) -> Vec<SocketAddr> {
    let ready = endpoints_where(slices, namespace, name, port, |c| c.ready.unwrap_or(true));
    if !ready.is_empty() {
        return ready;
    }
    endpoints_where(slices, namespace, name, port, |c| {
        c.serving.unwrap_or(false) && c.terminating.unwrap_or(false)
    })
}

fn endpoints_where(
    slices: &[std::sync::Arc<EndpointSlice>],
    namespace: &str,
    name: &str,
    port: Option<&str>,
    wanted: impl Fn(&k8s_openapi::api::discovery::v1::EndpointConditions) -> bool,
) -> Vec<SocketAddr> {
    let mut endpoints = Vec::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        if slice.metadata.namespace.as_deref() != Some(namespace)
            || labels.and_then(|l| l.get("kubernetes.io/service-name")) != Some(&name.to_string())
            || slice.address_type != "IPv4"
        {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port.unwrap_or(""))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            if !wanted(&conditions) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    endpoints.push(SocketAddr::from((ip, target as u16)));
                }
            }
        }
    }
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// A TCP connection to `address` from inside namespace `ns`: the socket is
/// made on a thread that entered it, then connected from here.
pub async fn connect_in(ns: &str, address: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let path = PathBuf::from("/var/run/netns").join(ns);
    let socket = std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<std::net::TcpStream> {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the namespace")?;
                let fd = nix::sys::socket::socket(
                    nix::sys::socket::AddressFamily::Inet,
                    nix::sys::socket::SockType::Stream,
                    nix::sys::socket::SockFlag::SOCK_NONBLOCK
                        | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                Ok(std::net::TcpStream::from(fd))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket);
    socket
        .connect(address)
        .await
        .with_context(|| format!("connecting to {address} from {ns}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    #[test]
    fn rules_pick_among_ready_endpoints_by_port_name() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "grpc", "port": 9090},
            ]},
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "echo-x", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.248.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.248.0.3"], "conditions": {"ready": true}},
                {"addresses": ["10.248.0.4"], "conditions": {"ready": false}},
            ],
        }))
        .unwrap();
        let rules = service_rules(&[Arc::new(service.clone())], &[Arc::new(slice)]);
        assert!(
            rules.contains("-A BL-SERVICES -d 10.96.0.20/32 -p tcp --dport 80 "),
            "{rules}"
        );
        assert!(
            rules.contains("--probability 0.50000 -j DNAT --to-destination 10.248.0.2:8080"),
            "{rules}"
        );
        assert!(
            rules.contains("-A BL-SVC-1 -p tcp -j DNAT --to-destination 10.248.0.3:8080"),
            "{rules}"
        );
        assert!(!rules.contains("10.248.0.4"), "{rules}");

        // Only a terminating endpoint still serving: used until a ready one
        // comes.
        let draining: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "echo-y", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.248.0.5"],
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.248.0.6"], "conditions": {"ready": false}},
            ],
        }))
        .unwrap();
        let rules = service_rules(&[Arc::new(service.clone())], &[Arc::new(draining)]);
        assert!(
            rules.contains("--to-destination 10.248.0.5:8080"),
            "{rules}"
        );
        assert!(!rules.contains("10.248.0.6"), "{rules}");
        // No endpoints for grpc: no rule, so a connection is refused by
        // nothing answering rather than sent anywhere.
        assert!(!rules.contains("--dport 9090"), "{rules}");
    }
}
