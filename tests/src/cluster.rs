//! A real Kubernetes cluster made of local processes: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, and kwok standing in for the
//! kubelets so that Nodes and Pods report Ready.
//!
//! Every component listens on a free loopback port and keeps its state in one
//! directory, which goes away with the cluster (see [`crate::process`]).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{
    AuthInfo, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use kube::{Client, Config};
use serde_json::json;

use crate::Error;
use crate::agent::{AgentOptions, NodeAgent};
use crate::binaries::K8sBinaries;
use crate::pki::{CertFiles, ClusterPki, FRONT_PROXY_CLIENT};
use crate::process::ProcessGroup;

/// The ClusterIP range of Services, and the `kubernetes` Service's address.
///
/// Nothing on this machine answers these addresses (nor kwok's Pod IPs), and
/// packets to them would leave loopback. A test must not make the API server
/// dial one: a webhook whose Service is in the cluster is called at its
/// ClusterIP, so a test never creates what a registered webhook matches
/// unless the webhook's server runs on loopback.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The range kwok hands Pod IPs out of.
pub const POD_CIDR: &str = "10.244.0.1/16";
pub const KUBERNETES_VERSION: &str = "v1.33.13";

/// How long a whole start may take, once the binaries are built.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long [`wait_until`] waits.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// kwok Nodes to create.
    pub nodes: usize,
    /// Also the Node whose pods really run ([`crate::agent`]), with the API
    /// server's `cluster` egress tunnelled to it.
    pub agent: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            agent: false,
        }
    }
}

/// A running local cluster. Dropping it stops every process and removes its
/// directory; so does the death of the process that started it.
#[derive(Debug)]
pub struct LocalCluster {
    /// Stopped before the cluster's processes.
    agent: Option<NodeAgent>,
    dir: PathBuf,
    kubeconfig: PathBuf,
    binaries: K8sBinaries,
    processes: ProcessGroup,
}

impl LocalCluster {
    /// The cluster shared by every test in this test binary, started on first
    /// use. Tests must not share a runtime-bound client: take one with
    /// [`LocalCluster::client`] in each test.
    pub fn shared() -> Result<&'static LocalCluster, Error> {
        static SHARED: OnceLock<Result<LocalCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                on_a_thread_of_its_own(|| async {
                    Self::start(ClusterOptions::default())
                        .await
                        .map_err(anyhow::Error::from)
                })
            })
            .as_ref()
            .map_err(|message| Error::Shared(message.clone()))
    }

    /// Starts a new cluster in a fresh temporary directory and waits until it
    /// serves requests and its Nodes are Ready.
    pub async fn start(options: ClusterOptions) -> Result<Self, Error> {
        let binaries = K8sBinaries::ensure()?;
        tokio::time::timeout(START_TIMEOUT, Self::start_with(binaries, options))
            .await
            .map_err(|_| {
                Error::Timeout(format!("the local cluster to start ({START_TIMEOUT:?})"))
            })?
    }

    async fn start_with(binaries: K8sBinaries, options: ClusterOptions) -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix("bowline-cluster-")
            .tempdir()
            .map_err(|e| Error::io(&std::env::temp_dir(), e))?
            .keep();
        let mut processes = ProcessGroup::new(&dir, &dir.join("logs"))?;
        let pki = ClusterPki::generate(&dir.join("pki"), KUBERNETES_SERVICE_IP)?;

        let etcd_port = free_port()?;
        let api_port = free_port()?;
        let api_server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = write_kubeconfig(&dir, "admin", &api_server, &pki.ca.cert, &pki.admin)?;
        let cm_kubeconfig = write_kubeconfig(
            &dir,
            "controller-manager",
            &api_server,
            &pki.ca.cert,
            &pki.controller_manager,
        )?;
        let scheduler_kubeconfig =
            write_kubeconfig(&dir, "scheduler", &api_server, &pki.ca.cert, &pki.scheduler)?;

        tracing::info!(dir = %dir.display(), "starting etcd");
        processes.spawn("etcd", etcd(&binaries, &dir, etcd_port)?)?;
        wait_for_port("etcd", etcd_port, &mut processes).await?;

        tracing::info!(%api_server, "starting kube-apiserver");
        let mut apiserver = apiserver(&binaries, &pki, etcd_port, api_port);
        let egress_socket = dir.join("egress.sock");
        if options.agent {
            apiserver.arg(format!(
                "--egress-selector-config-file={}",
                write_egress_selector(&dir, &egress_socket)?.display()
            ));
        }
        processes.spawn("kube-apiserver", apiserver)?;
        let admin = client_for(&kubeconfig, None).await?;
        wait_for_health("kube-apiserver", &admin, "/readyz", &mut processes).await?;

        let cm_port = free_port()?;
        processes.spawn(
            "kube-controller-manager",
            controller_manager(&binaries, &pki, &cm_kubeconfig, cm_port),
        )?;
        let scheduler_port = free_port()?;
        processes.spawn(
            "kube-scheduler",
            scheduler(&binaries, &pki, &scheduler_kubeconfig, scheduler_port),
        )?;
        let kwok_port = free_port()?;
        processes.spawn("kwok", kwok(&binaries, &kubeconfig, kwok_port))?;

        for (name, port) in [
            ("kube-controller-manager", cm_port),
            ("kube-scheduler", scheduler_port),
        ] {
            let url = format!("https://127.0.0.1:{port}");
            let client = client_for(&kubeconfig, Some(&url)).await?;
            wait_for_health(name, &client, "/healthz", &mut processes).await?;
        }

        let mut cluster = Self {
            agent: None,
            dir,
            kubeconfig,
            binaries,
            processes,
        };
        cluster.create_nodes(&admin, options.nodes).await?;
        if options.agent {
            let agent = NodeAgent::start(AgentOptions {
                kubeconfig: cluster.kubeconfig.clone(),
                api_server: SocketAddr::from((Ipv4Addr::LOCALHOST, api_port)),
                egress_socket,
                process_group: cluster.processes.pgid().as_raw(),
            })
            .await
            .map_err(|e| Error::NotReady {
                component: format!("the node agent: {e:#}"),
                log_tail: String::new(),
            })?;
            cluster.agent = Some(agent);
        }
        tracing::info!(kubeconfig = %cluster.kubeconfig.display(), "local cluster ready");
        Ok(cluster)
    }

    /// A new client with cluster-admin rights. Take one per test: a client is
    /// bound to the runtime it first ran on.
    pub async fn client(&self) -> Result<Client, Error> {
        client_for(&self.kubeconfig, None).await
    }

    /// A client that authenticates with a bearer token (a ServiceAccount's,
    /// say) instead of the admin certificate: what it may do is what RBAC
    /// grants that token.
    pub async fn client_with_token(&self, token: &str) -> Result<Client, Error> {
        Ok(Client::try_from(self.config_with_token(token).await?)?)
    }

    /// The admin client's configuration, for building a client of one's own.
    pub async fn config(&self) -> Result<Config, Error> {
        config_for(&self.kubeconfig, None).await
    }

    /// The configuration of a client that authenticates with `token`.
    pub async fn config_with_token(&self, token: &str) -> Result<Config, Error> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = self
            .dir
            .join(format!("token-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, token).map_err(|e| Error::io(&path, e))?;
        let mut file = Kubeconfig::read_from(&self.kubeconfig)?;
        for named in &mut file.auth_infos {
            named.auth_info = Some(AuthInfo {
                token_file: Some(path.display().to_string()),
                ..Default::default()
            });
        }
        Ok(Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?)
    }

    /// The admin kubeconfig (cluster-admin through the `system:masters` group).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node agent, when the cluster was started with one.
    pub fn agent(&self) -> Option<&NodeAgent> {
        self.agent.as_ref()
    }

    pub fn binaries(&self) -> &K8sBinaries {
        &self.binaries
    }

    /// The built kubectl, pointed at this cluster as its administrator.
    pub fn kubectl(&self) -> Command {
        let mut command = self.binaries.command("kubectl");
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Creates a namespace of its own for one test, named after it, and waits
    /// for its `default` ServiceAccount, without which no Pod is admitted.
    pub async fn test_namespace(&self, client: &Client, test: &str) -> Result<String, Error> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        create_namespace(client, &name, json!({})).await?;
        Ok(name)
    }

    async fn create_nodes(&self, client: &Client, count: usize) -> Result<(), Error> {
        let nodes: Api<Node> = Api::all(client.clone());
        let names: Vec<String> = (0..count).map(|i| format!("kwok-node-{i}")).collect();
        for name in &names {
            nodes
                .create(&PostParams::default(), &kwok_node(name)?)
                .await?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut ready = 0;
            for name in &names {
                if nodes.get(name).await.map(|n| node_ready(&n))? {
                    ready += 1;
                }
            }
            if ready == names.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    component: "kwok (Nodes Ready)".into(),
                    log_tail: self.processes.log_tail("kwok", 30),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs the future `start` makes to its end on a thread and runtime of its
/// own, for what tests share: they call from inside their own runtimes,
/// which must not block on another. A failure comes back as its message.
pub fn on_a_thread_of_its_own<T, F, Fut>(start: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(start()).map_err(|e| format!("{e:#}"))
    })
    .join()
    .unwrap_or_else(|_| Err("the start-up thread panicked".into()))
}

/// Creates a namespace with `labels` and waits for its `default`
/// ServiceAccount, without which no Pod is admitted.
pub async fn create_namespace(
    client: &Client,
    name: &str,
    labels: serde_json::Value,
) -> Result<(), Error> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_until(&format!("the default ServiceAccount in {name}"), || async {
        Ok(accounts.get_opt("default").await?.is_some())
    })
    .await
}

/// Polls `check` every 200 ms until it says yes, for at most a minute (a
/// check that hangs counts against that minute too).
pub async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Timeout(what.to_string())),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(what.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the API server serves the CRD `name`.
pub async fn wait_established(
    crds: &Api<CustomResourceDefinition>,
    name: &str,
) -> Result<(), Error> {
    wait_until(&format!("CRD {name} to be Established"), || async {
        Ok(crds
            .get(name)
            .await?
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"))
    })
    .await
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A Node that kwok manages: its status comes from kwok's node stages, its
/// capacity from here (the scheduler needs it to place Pods).
fn kwok_node(name: &str) -> Result<Node, Error> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": KUBERNETES_VERSION,
            },
        },
    }))?)
}

fn etcd(bins: &K8sBinaries, dir: &Path, client_port: u16) -> Result<Command, Error> {
    let peer_port = free_port()?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut c = bins.command("etcd");
    c.arg("--name=bowline")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=bowline={peer_url}"))
        // A test cluster's data is thrown away with it; fsync only slows it.
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    Ok(c)
}

fn apiserver(bins: &K8sBinaries, pki: &ClusterPki, etcd_port: u16, port: u16) -> Command {
    let mut c = bins.command("kube-apiserver");
    c.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        // The `kubernetes` Service cannot have loopback endpoints (the API
        // server's own validation refuses them), so it is left without any.
        .arg("--endpoint-reconciler-type=none")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--tls-cert-file={}", pki.serving.cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.serving.key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca.cert.display()))
        // The aggregation layer, as kubeadm sets it up: extension API servers
        // trust the identity headers of requests signed by the front proxy.
        .arg(format!(
            "--requestheader-client-ca-file={}",
            pki.front_proxy_ca.cert.display()
        ))
        .arg(format!(
            "--requestheader-allowed-names={FRONT_PROXY_CLIENT}"
        ))
        .arg("--requestheader-username-headers=X-Remote-User")
        .arg("--requestheader-group-headers=X-Remote-Group")
        .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
        .arg(format!(
            "--proxy-client-cert-file={}",
            pki.front_proxy_client.cert.display()
        ))
        .arg(format!(
            "--proxy-client-key-file={}",
            pki.front_proxy_client.key.display()
        ))
        .arg("--authorization-mode=Node,RBAC")
        // On top of the default admission plugins.
        .arg("--enable-admission-plugins=NodeRestriction")
        .arg("--allow-privileged=true")
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}",
            pki.service_account_pub.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.service_account_key.display()
        ))
        .arg("--profiling=false");
    c
}

fn controller_manager(
    bins: &K8sBinaries,
    pki: &ClusterPki,
    kubeconfig: &Path,
    port: u16,
) -> Command {
    let mut c = bins.command("kube-controller-manager");
    component_flags(&mut c, pki, kubeconfig, port);
    c.arg(format!("--root-ca-file={}", pki.ca.cert.display()))
        .arg(format!(
            "--service-account-private-key-file={}",
            pki.service_account_key.display()
        ))
        .arg(format!(
            "--cluster-signing-cert-file={}",
            pki.ca.cert.display()
        ))
        .arg(format!(
            "--cluster-signing-key-file={}",
            pki.ca.key.display()
        ))
        .arg("--use-service-account-credentials=true")
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
    c
}

fn scheduler(bins: &K8sBinaries, pki: &ClusterPki, kubeconfig: &Path, port: u16) -> Command {
    let mut c = bins.command("kube-scheduler");
    component_flags(&mut c, pki, kubeconfig, port);
    c
}

/// What kube-controller-manager and kube-scheduler share: their identity,
/// and a secure port on loopback serving a certificate from the cluster CA.
fn component_flags(c: &mut Command, pki: &ClusterPki, kubeconfig: &Path, port: u16) {
    let kubeconfig = kubeconfig.display();
    c.arg(format!("--kubeconfig={kubeconfig}"))
        .arg(format!("--authentication-kubeconfig={kubeconfig}"))
        .arg(format!("--authorization-kubeconfig={kubeconfig}"))
        .arg(format!("--client-ca-file={}", pki.ca.cert.display()))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--tls-cert-file={}", pki.serving.cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.serving.key.display()
        ))
        .arg("--leader-elect=false")
        .arg("--profiling=false");
}

fn kwok(bins: &K8sBinaries, kubeconfig: &Path, port: u16) -> Command {
    let mut c = bins.command("kwok");
    c.arg(format!("--kubeconfig={}", kubeconfig.display()))
        // Nodes made for kwok only: the node agent's are its own.
        .arg("--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake")
        // Heartbeats as Leases, like a kubelet, rather than status updates.
        .arg("--node-lease-duration-seconds=40")
        .arg(format!("--cidr={POD_CIDR}"))
        .arg(format!("--server-address=127.0.0.1:{port}"));
    c
}

/// The API server's egress selection: traffic to the cluster (webhooks,
/// aggregated APIs, `services/proxy`) over HTTP CONNECT on `socket`, where
/// the node agent tunnels it into the pod network.
fn write_egress_selector(dir: &Path, socket: &Path) -> Result<PathBuf, Error> {
    let path = dir.join("egress-selector.yaml");
    let config = json!({
        "apiVersion": "apiserver.k8s.io/v1beta1",
        "kind": "EgressSelectorConfiguration",
        "egressSelections": [{
            "name": "cluster",
            "connection": {
                "proxyProtocol": "HTTPConnect",
                "transport": {"uds": {"udsName": socket}},
            },
        }],
    });
    std::fs::write(&path, serde_json::to_vec(&config)?).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Writes a kubeconfig (JSON, which every client reads as YAML) for one
/// client certificate and returns its path.
fn write_kubeconfig(
    dir: &Path,
    name: &str,
    server: &str,
    ca: &Path,
    client: &CertFiles,
) -> Result<PathBuf, Error> {
    let config = kubeconfig(server, ca, client);
    let path = dir.join(format!("{name}.kubeconfig"));
    let text = serde_json::to_string_pretty(&config)?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn kubeconfig(server: &str, ca: &Path, client: &CertFiles) -> Kubeconfig {
    const NAME: &str = "bowline-local";
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: NAME.into(),
            cluster: Some(kube::config::Cluster {
                server: Some(server.into()),
                certificate_authority: Some(ca.display().to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: NAME.into(),
            auth_info: Some(AuthInfo {
                client_certificate: Some(client.cert.display().to_string()),
                client_key: Some(client.key.display().to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        contexts: vec![NamedContext {
            name: NAME.into(),
            context: Some(Context {
                cluster: NAME.into(),
                user: Some(NAME.into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        current_context: Some(NAME.into()),
        kind: Some("Config".into()),
        api_version: Some("v1".into()),
        ..Default::default()
    }
}

/// A client with the credentials of `kubeconfig`, talking to `server` when
/// given (the components' own secure ports trust the same CA).
async fn client_for(kubeconfig: &Path, server: Option<&str>) -> Result<Client, Error> {
    Ok(Client::try_from(config_for(kubeconfig, server).await?)?)
}

async fn config_for(kubeconfig: &Path, server: Option<&str>) -> Result<Config, Error> {
    let mut file = Kubeconfig::read_from(kubeconfig)?;
    if let Some(server) = server {
        for cluster in file.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
            cluster.server = Some(server.into());
        }
    }
    Ok(Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?)
}

async fn wait_for_health(
    name: &str,
    client: &Client,
    path: &str,
    processes: &mut ProcessGroup,
) -> Result<(), Error> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        processes.check_running()?;
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| Error::Request(e.to_string()))?;
        if let Ok(body) = client.request_text(request).await
            && body.trim() == "ok"
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                component: name.into(),
                log_tail: processes.log_tail(name, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_port(name: &str, port: u16, processes: &mut ProcessGroup) -> Result<(), Error> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        processes.check_running()?;
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                component: name.into(),
                log_tail: processes.log_tail(name, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback port nothing listens on, for a process to bind soon after.
///
/// Taken below the kernel's ephemeral range: a port the kernel hands out
/// for binding to port 0 is also one it hands out to outgoing connections,
/// so between this check and the process's bind a client socket could take
/// it ("address already in use", seen with kube-controller-manager). Below
/// the range only an explicit bind can, and this process spreads its picks.
pub fn free_port() -> Result<u16, Error> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut bounds = range.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    let first = 10_000u32;
    let span = low.saturating_sub(first).max(1);
    let start = std::process::id() * 7919 % span;
    for _ in 0..span.min(2000) {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (first + offset) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Binaries(format!(
        "no free loopback port between {first} and {low}"
    )))
}

/// A token of ServiceAccount `account` in `namespace` (made when missing),
/// valid for two hours: for `audience` (`istio-ca` for the control plane's
/// CA and xDS), or for the API server itself when `None` — a client with it
/// may do exactly what RBAC grants the account.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    account: &str,
    audience: Option<&str>,
) -> Result<String, Error> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    if accounts.get_opt(account).await?.is_none() {
        accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": account}}))?,
            )
            .await?;
    }
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": audience.into_iter().collect::<Vec<_>>(), "expirationSeconds": 7200},
    }))?;
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| Error::Request(format!("no token for ServiceAccount {namespace}/{account}")))
}
