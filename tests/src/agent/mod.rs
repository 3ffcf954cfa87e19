//! A node agent for the local cluster: the Node `bowline-node`, whose pods
//! really run. For each pod the scheduler puts there it makes a network
//! namespace with the pod's address, writes its volumes, runs its
//! containers as local processes ([`images`] says which program runs which
//! image) and reports their state and readiness in the pod's status, as a
//! kubelet does; kwok keeps any other Node.
//!
//! Around the pods it plays the rest of a node and its network
//! ([`network`]): kube-proxy's DNAT from Service ClusterIPs to ready
//! endpoints, hosts files naming every Service, the `kubernetes` Service
//! (10.96.0.1:443) forwarded to the API server on loopback, and the API
//! server's way in — its `cluster` egress (webhooks, aggregated APIs,
//! `services/proxy`) goes through an HTTP CONNECT tunnel on a Unix socket
//! into the node's namespace, as through Konnectivity.
//!
//! Everything runs on a thread and runtime of the agent's own; dropping it
//! stops every pod's processes and removes every namespace. Needs root,
//! iproute2, iptables, util-linux (`setpriv`, `mount`).

pub mod images;
pub mod network;
pub mod pod;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_runtime::reflector::{self, Store};
use kube_runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::{Notify, oneshot, watch};

use crate::cluster::{KUBERNETES_SERVICE_IP, KUBERNETES_VERSION};
use network::{NODE_IP, POD_SUBNET, PodNetwork, connect_in};

/// The agent's Node.
pub const NODE_NAME: &str = "bowline-node";

/// A running agent; dropping it stops its pods.
#[derive(Debug)]
pub struct NodeAgent {
    stop: Option<oneshot::Sender<()>>,
    /// Dropping it (or this process ending) tells the janitor to remove the
    /// network namespaces left.
    _janitor: Option<std::process::ChildStdin>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

/// What the agent needs from the cluster it serves.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub kubeconfig: PathBuf,
    /// The API server, which the `kubernetes` Service forwards to.
    pub api_server: SocketAddr,
    /// Where the API server's egress tunnel is served.
    pub egress_socket: PathBuf,
    /// The process group the containers join, so that they stop with the
    /// cluster even when this process dies without dropping anything.
    pub process_group: i32,
}

impl NodeAgent {
    /// Registers the Node, starts serving its pods and returns once the
    /// Node is Ready.
    pub async fn start(options: AgentOptions) -> anyhow::Result<Self> {
        // Not under /tmp: a container may mount a volume there, which would
        // hide the programs bound into this directory.
        let dir = tempfile::Builder::new()
            .prefix("bowline-node-")
            .tempdir_in("/run")?
            .keep();
        std::fs::create_dir_all(dir.join("bin"))?;
        // Containers run as other users: they reach their programs here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::set_permissions(
            dir.join("bin"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let agent_dir = dir.clone();
        let thread = std::thread::Builder::new()
            .name("node-agent".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                runtime.block_on(serve(options, agent_dir, ready_tx, stop_rx));
                // Pods' tasks go with the runtime, their processes with
                // them (kill_on_drop); the namespaces with the network.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })?;
        let agent = Self {
            stop: Some(stop_tx),
            _janitor: janitor(&format!("bln{}", std::process::id()), &dir)?,
            thread: Some(thread),
            dir,
        };
        ready_rx.await.context("the node agent's thread")??;
        Ok(agent)
    }

    /// The log of a container of a pod the agent runs (`kubectl logs`
    /// without a kubelet).
    pub fn log(&self, namespace: &str, pod: &str, container: &str) -> String {
        self.pod_dirs(namespace, pod)
            .filter_map(|dir| std::fs::read_to_string(dir.join(format!("{container}.log"))).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The network namespace of pod `namespace/pod`, to run a command in
    /// it (`ip netns exec`) as from inside the pod.
    pub fn netns(&self, namespace: &str, pod: &str) -> Option<String> {
        self.pod_dirs(namespace, pod)
            .find_map(|dir| std::fs::read_to_string(dir.join("netns")).ok())
    }

    /// The directories of the pods named `namespace/pod` (one per uid) the
    /// agent ran or runs (`pod::Life` makes them).
    fn pod_dirs(&self, namespace: &str, pod: &str) -> impl Iterator<Item = PathBuf> {
        let prefix = format!("{namespace}_{pod}_");
        std::fs::read_dir(self.dir.join("pods"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(move |e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
    }
}

/// A shell in a process group of its own that waits on a pipe only this
/// process writes to; when the pipe closes — a normal drop, or this process
/// dying without one (a shared cluster in a static is never dropped) — it
/// deletes the network namespaces and hosts files named `<prefix>-*` and
/// the agent's directory `dir`.
fn janitor(prefix: &str, dir: &Path) -> anyhow::Result<Option<std::process::ChildStdin>> {
    use std::os::unix::process::CommandExt;
    const SCRIPT: &str = r#"trap '' TERM INT HUP
read -r _
sleep 2
for ns in $(ip netns list | awk '{print $1}'); do
  case "$ns" in "$1"-*) ip netns del "$ns"; rm -rf "/etc/netns/$ns";; esac
done
rm -rf -- "$2""#;
    let mut child = std::process::Command::new("sh")
        .args(["-c", SCRIPT, "bowline-netns-janitor", prefix])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the network namespaces' janitor")?;
    Ok(child.stdin.take())
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn serve(
    options: AgentOptions,
    dir: PathBuf,
    ready: oneshot::Sender<anyhow::Result<()>>,
    stop: oneshot::Receiver<()>,
) {
    let started = async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&options.kubeconfig)?,
            &Default::default(),
        )
        .await?;
        let client = Client::try_from(config)?;
        let network = Arc::new(PodNetwork::new(&format!("bln{}", std::process::id()))?);
        register(&client).await?;
        anyhow::Ok((client, network))
    };
    let (client, network) = match started.await {
        Ok(started) => started,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let node = Arc::new(pod::Node {
        name: NODE_NAME.into(),
        client: client.clone(),
        network: network.clone(),
        dir,
    });
    let services = Services::start(client.clone(), network.clone());
    let tasks = [
        tokio::spawn(heartbeat(client.clone())),
        tokio::spawn(pods(node.clone(), options.process_group)),
        tokio::spawn(forward_kubernetes(network.clone(), options.api_server)),
        tokio::spawn(egress(
            options.egress_socket.clone(),
            network.clone(),
            services.services.clone(),
        )),
    ];
    let _ = ready.send(Ok(()));
    let _ = stop.await;
    for task in tasks {
        task.abort();
    }
    services.task.abort();
}

/// The Node, Ready, with the capacity the scheduler places pods by.
async fn register(client: &Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::from_value(json!({
        "metadata": {
            "name": NODE_NAME,
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "bowline-agent",
            },
        },
        "spec": {"podCIDR": POD_SUBNET, "podCIDRs": [POD_SUBNET]},
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    report_node(&nodes).await?;
    renew_lease(client).await?;
    Ok(())
}

async fn report_node(nodes: &Api<Node>) -> anyhow::Result<()> {
    let now = Time(Timestamp::now());
    let condition = |type_: &str, status: &str, reason: &str| {
        json!({"type": type_, "status": status, "reason": reason,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let status = json!({"status": {
        "conditions": [
            condition("Ready", "True", "KubeletReady"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": NODE_IP.to_string()},
            {"type": "Hostname", "address": NODE_NAME},
        ],
        "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": KUBERNETES_VERSION,
            "containerRuntimeVersion": "bowline-node-agent://0.1",
        },
    }});
    nodes
        .patch_status(
            NODE_NAME,
            &PatchParams::default(),
            &Patch::Strategic(status),
        )
        .await?;
    Ok(())
}

/// The Node's Lease, renewed as a kubelet renews it: the node lifecycle
/// controller takes a Node whose Lease lapses for NotReady.
async fn renew_lease(client: &Client) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": NODE_NAME},
        "spec": {
            "holderIdentity": NODE_NAME,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    leases
        .patch(
            NODE_NAME,
            &PatchParams::apply("bowline-node-agent").force(),
            &Patch::Apply(lease),
        )
        .await?;
    Ok(())
}

async fn heartbeat(client: Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut rounds = 0u32;
    loop {
        tick.tick().await;
        if let Err(e) = renew_lease(&client).await {
            tracing::warn!("renewing the node's lease: {e:#}");
        }
        rounds += 1;
        if rounds.is_multiple_of(6)
            && let Err(e) = report_node(&nodes).await
        {
            tracing::warn!("reporting the node's status: {e:#}");
        }
    }
}

/// Runs every pod bound to the Node, each in a task of its own fed with
/// the pod's updates.
async fn pods(node: Arc<pod::Node>, process_group: i32) {
    let api: Api<Pod> = Api::all(node.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={NODE_NAME}"));
    let mut running: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!("watching the node's pods: {e}");
                continue;
            }
        };
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                match running.get(&uid) {
                    Some(updates) => {
                        let _ = updates.send(Some(pod));
                    }
                    None => {
                        let (updates, receiver) = watch::channel(Some(pod));
                        running.insert(uid, updates);
                        tokio::spawn(pod::run(node.clone(), receiver, process_group));
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(updates) = pod
                    .metadata
                    .uid
                    .as_ref()
                    .and_then(|uid| running.remove(uid))
                {
                    let _ = updates.send(None);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// Services and EndpointSlices, kept in stores; every change rewrites the
/// node's DNAT rules and the pods' hosts files.
struct Services {
    services: Store<Service>,
    task: tokio::task::JoinHandle<()>,
}

impl Services {
    fn start(client: Client, network: Arc<PodNetwork>) -> Self {
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let watch_services = {
            let changed = changed.clone();
            reflector::reflector(
                services_writer,
                watcher(Api::<Service>::all(client.clone()), Default::default()),
            )
            .default_backoff()
            .touched_objects()
            .for_each(move |_| {
                changed.notify_one();
                futures::future::ready(())
            })
        };
        let watch_slices = {
            let changed = changed.clone();
            reflector::reflector(
                slices_writer,
                watcher(Api::<EndpointSlice>::all(client), Default::default()),
            )
            .default_backoff()
            .touched_objects()
            .for_each(move |_| {
                changed.notify_one();
                futures::future::ready(())
            })
        };
        let store_services: Store<Service> = services.clone();
        let sync = async move {
            loop {
                changed.notified().await;
                // A burst of changes (a Deployment scaling) is one rewrite.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let services = store_services.state();
                let slices = slices.state();
                let network = network.clone();
                let result =
                    tokio::task::spawn_blocking(move || network.sync_services(&services, &slices))
                        .await;
                if let Ok(Err(e)) = result {
                    tracing::warn!("writing the node's Service rules: {e:#}");
                }
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(watch_services, watch_slices, sync);
        });
        Self { services, task }
    }
}

/// The `kubernetes` Service: connections to 10.96.0.1:443 in the node's
/// namespace go on to the API server on loopback.
async fn forward_kubernetes(network: Arc<PodNetwork>, api_server: SocketAddr) {
    let listener = match crate::netns::listen_in(
        network.node(),
        SocketAddr::from((KUBERNETES_SERVICE_IP, 443)),
    ) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("serving the kubernetes Service: {e:#}");
            return;
        }
    };
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(api_server).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// The API server's `cluster` egress: HTTP CONNECT on a Unix socket, each
/// tunnel dialled from the node's namespace (so through its Service rules)
/// to the address asked for — an IP, or a Service's DNS name.
async fn egress(path: PathBuf, network: Arc<PodNetwork>, services: Store<Service>) {
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("serving the API server's egress at {}: {e}", path.display());
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let network = network.clone();
        let services = services.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                tunnel(request, network.clone(), services.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

type Empty = http_body_util::Empty<bytes::Bytes>;

async fn tunnel(
    request: hyper::Request<hyper::body::Incoming>,
    network: Arc<PodNetwork>,
    services: Store<Service>,
) -> Result<hyper::Response<Empty>, std::convert::Infallible> {
    let status = |code: u16| {
        let mut response = hyper::Response::new(Empty::new());
        *response.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
        response
    };
    if request.method() != http::Method::CONNECT {
        return Ok(status(405));
    }
    let Some(authority) = request.uri().authority().cloned() else {
        return Ok(status(400));
    };
    let Some(address) = resolve(
        authority.host(),
        authority.port_u16().unwrap_or(443),
        &services,
    ) else {
        return Ok(status(502));
    };
    let upstream = match connect_in(network.node(), address).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::debug!("egress to {authority}: {e:#}");
            return Ok(status(503));
        }
    };
    tokio::spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(request).await {
            let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut upstream).await;
        }
    });
    Ok(status(200))
}

/// An IP, or `<service>.<namespace>.svc[.cluster.local]` to its ClusterIP.
fn resolve(host: &str, port: u16, services: &Store<Service>) -> Option<SocketAddr> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    let mut parts = host.trim_end_matches(".cluster.local").split('.');
    let (name, namespace) = (parts.next()?, parts.next()?);
    let service = services.get(&reflector::ObjectRef::new(name).within(namespace))?;
    let ip = service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}
