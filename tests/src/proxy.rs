//! bowline-proxy run in-process as the tests use it — from a bootstrap
//! file or from the control plane — with upstream servers on loopback and
//! curl as the client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_proxy::config::{
    Config, ENV_ADMIN_ADDRESS, ENV_CA_ADDRESS, ENV_DISCOVERY_ADDRESS, ENV_PROMETHEUS_ADDRESS,
    ENV_ROOT_CERT, ENV_SERVER_NAME, ENV_STATS_ADDRESS, ENV_STATUS_ADDRESS, ENV_TOKEN, Mode,
};
use serde_json::json;

use crate::cluster::free_port;
use crate::xds::Target;

/// An HTTP upstream on `ip` (port chosen) answering `name`, the path it
/// was asked for and the Host: `/ws` echoes WebSocket text messages after
/// `name`, `/slow` answers after two seconds,
/// `/sleep/<ms>` after so long, `/status/<code>` with that status, and
/// `/flaky` with 503 and 200 in turns.
pub async fn upstream_on(ip: [u8; 4], name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), 0)).await?;
    serve_upstream(listener, name)
}

/// [`upstream_on`]'s application, on a listener of the caller's.
pub fn serve_upstream(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> anyhow::Result<SocketAddr> {
    use axum::extract::Path;
    use axum::routing::get;
    let address = listener.local_addr()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "slow"
            }),
        )
        .route(
            "/sleep/{ms}",
            get(move |Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!("{name} slept {ms}")
            }),
        )
        .route(
            "/status/{code}",
            get(move |Path(code): Path<u16>| async move {
                (
                    http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_REQUEST),
                    format!("{name} {code}"),
                )
            }),
        )
        .route(
            "/ws",
            get(move |ws: axum::extract::ws::WebSocketUpgrade| async move {
                ws.on_upgrade(move |mut socket| async move {
                    use axum::extract::ws::Message;
                    while let Some(Ok(message)) = socket.recv().await {
                        let reply = match message {
                            Message::Text(text) => Message::Text(format!("{name} {text}").into()),
                            Message::Close(_) => break,
                            other => other,
                        };
                        if socket.send(reply).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
        .route(
            "/flaky",
            get(move || async move {
                if calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
                    (
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("{name} failed"),
                    )
                } else {
                    (http::StatusCode::OK, format!("{name} ok"))
                }
            }),
        )
        .fallback(move |uri: http::Uri, headers: http::HeaderMap| async move {
            let host = headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string();
            format!("{name} {} {host}", uri.path())
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}

/// An HTTP upstream that answers everything with 503, and counts.
pub async fn failing(name: &'static str) -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let app = axum::Router::new().fallback(move || async move {
        counted.fetch_add(1, Ordering::Relaxed);
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{name} failing"),
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((address, calls))
}

/// An HTTP upstream that keeps the Host header of each request it gets.
pub async fn recorder() -> anyhow::Result<(SocketAddr, Arc<std::sync::Mutex<Vec<String>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let hosts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = Arc::clone(&hosts);
    let app = axum::Router::new().fallback(move |headers: http::HeaderMap| async move {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        kept.lock().expect("hosts").push(host);
        "recorded"
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((address, hosts))
}

/// [`upstream_on`] 127.0.0.1.
pub async fn upstream(name: &'static str) -> anyhow::Result<SocketAddr> {
    upstream_on([127, 0, 0, 1], name).await
}

/// Sends `bytes` to 127.0.0.1:`port` and fails unless the same bytes
/// come back within 5 s (through a proxy to [`echo`]).
pub async fn echoes(port: u16, bytes: &[u8]) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(bytes).await?;
    let mut echoed = vec![0; bytes.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await??;
    ensure!(echoed == bytes, "sent {bytes:?}, got back {echoed:?}");
    Ok(())
}

/// The environment by which a test sidecar names its workload in the
/// `shop` namespace (as the injector sets it): metrics and spans carry it.
pub fn workload_env<'a>(name: &'a str, labels: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("POD_NAMESPACE", "shop"),
        ("ISTIO_META_WORKLOAD_NAME", name),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("ISTIO_METAJSON_LABELS", labels),
    ]
}

/// A TCP upstream that echoes what it reads.
pub async fn echo() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    Ok(address)
}

/// curl, with a status line last: `<body>\n<status>`.
pub fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let output = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .context("running curl")?;
    let text = String::from_utf8(output.stdout)?;
    let (body, status) = text.rsplit_once('\n').context("curl's status line")?;
    Ok((status.trim().parse()?, body.to_string()))
}

/// `count` GETs of `url` with `headers`, on kept-alive connections (one
/// curl process per 100): the first word of each answer, counted (`""`
/// for a request with no answer).
pub async fn first_words(
    url: &str,
    headers: &[&str],
    count: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut words = BTreeMap::new();
    let mut left = count;
    while left > 0 {
        let batch = left.min(100);
        left -= batch;
        let mut command = tokio::process::Command::new("curl");
        command.args(["-s", "-m", "30", "-w", "\n"]);
        for header in headers {
            command.args(["-H", header]);
        }
        let output = command.args(vec![url; batch]).output().await?;
        let text = String::from_utf8(output.stdout)?;
        let mut answered = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            answered += 1;
            let word = line.split_whitespace().next().unwrap_or_default();
            *words.entry(word.to_string()).or_default() += 1;
        }
        if answered < batch {
            *words.entry(String::new()).or_default() += batch - answered;
        }
    }
    Ok(words)
}

/// One connection kept open across requests, as a pooling client (an
/// app's HTTP library, another proxy, a gRPC channel) keeps it: HTTP/1.1,
/// or HTTP/2 with prior knowledge.
#[derive(Debug)]
pub struct KeptConnection {
    sender: Sender,
    /// How the connection ended: `Ok` when it closed cleanly (an HTTP/2
    /// GOAWAY, an HTTP/1.1 close between answers).
    ended: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
}

type Empty = http_body_util::Empty<bytes::Bytes>;

#[derive(Debug)]
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty>),
    Http2(hyper::client::conn::http2::SendRequest<Empty>),
}

impl KeptConnection {
    /// An HTTP/1.1 connection to `address`.
    pub async fn open(address: SocketAddr) -> anyhow::Result<Self> {
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(address).await?);
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        Ok(Self::driven(Sender::Http1(sender), connection))
    }

    /// An HTTP/2 connection (prior knowledge, no TLS) to `address`.
    pub async fn open_http2(address: SocketAddr) -> anyhow::Result<Self> {
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(address).await?);
        let (sender, connection) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        Ok(Self::driven(Sender::Http2(sender), connection))
    }

    fn driven(
        sender: Sender,
        connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    ) -> Self {
        let (end, ended) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let result = connection.await.map_err(|e| e.to_string());
            let _ = end.send(Some(result));
        });
        Self { sender, ended }
    }

    /// GETs `path` with `host` on this connection: the first word of the
    /// answer. Fails when the connection was closed.
    pub async fn first_word(&mut self, host: &str, path: &str) -> anyhow::Result<String> {
        let response = self.get(host, path).await?;
        let body = response.body();
        Ok(body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// GETs `path` with `host` on this connection: the answer, its body
    /// as text. Fails when the connection was closed.
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<http::Response<String>> {
        use http_body_util::BodyExt;
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await.context("the kept connection")?;
                let request = http::Request::get(path)
                    .header(http::header::HOST, host)
                    .body(Empty::new())?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await.context("the kept connection")?;
                let request = http::Request::get(format!("http://{host}{path}"))
                    .version(http::Version::HTTP_2)
                    .body(Empty::new())?;
                sender.send_request(request).await
            }
        }
        .context("a request on the kept connection")?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        Ok(http::Response::from_parts(parts, text))
    }

    /// Whether the connection is still open.
    pub async fn is_open(&mut self) -> bool {
        match &mut self.sender {
            Sender::Http1(sender) => sender.ready().await.is_ok(),
            Sender::Http2(sender) => sender.ready().await.is_ok(),
        }
    }

    /// Waits up to `limit` for the connection to end: how it ended, or
    /// `None` while it is still open.
    pub async fn ended_within(&mut self, limit: Duration) -> Option<Result<(), String>> {
        let ended = self.ended.wait_for(Option::is_some);
        match tokio::time::timeout(limit, ended).await {
            Ok(Ok(ended)) => ended.clone(),
            _ => None,
        }
    }
}

/// The environment of a proxy configured by the control plane at
/// `target`, presenting `token`: the files it reads are written to `dir`.
pub fn discovery_env(
    target: &Target,
    token: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<(String, String)>> {
    reaching(ENV_DISCOVERY_ADDRESS, target, token, dir)
}

/// The environment of a proxy that asks the CA at `target` for its
/// certificate with `token` (its configuration coming from elsewhere, a
/// bootstrap file): the files it reads are written to `dir`.
pub fn ca_env(
    target: &Target,
    token: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<(String, String)>> {
    reaching(ENV_CA_ADDRESS, target, token, dir)
}

/// `variable` set to the control plane's address, with the root to trust
/// it by and the token to present, both written to `dir`.
fn reaching(
    variable: &str,
    target: &Target,
    token: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let (root, token_file) = (dir.join("root-cert.pem"), dir.join("istio-token"));
    std::fs::write(&root, &target.root_pem)?;
    std::fs::write(&token_file, token)?;
    let path = |p: PathBuf| p.display().to_string();
    Ok(vec![
        (variable.into(), target.address.clone()),
        (ENV_SERVER_NAME.into(), target.server_name.clone()),
        (ENV_ROOT_CERT.into(), path(root)),
        (ENV_TOKEN.into(), path(token_file)),
    ])
}

/// Where a test proxy serves readiness (15021), merged metrics (15020),
/// its metrics (15090) and admin (15000): free ports on 127.0.0.1.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub status: u16,
    pub stats: u16,
    pub prometheus: u16,
    pub admin: u16,
}

/// A running proxy. [`Running::stop`] stops it as SIGTERM would.
#[derive(Debug)]
pub struct Running {
    pub ports: Ports,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<bowline_proxy::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// A sidecar serving `bootstrap`, ready; `env` adds to its environment.
    pub async fn bootstrap(
        bootstrap: serde_json::Value,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::bootstrap_unready(bootstrap, env)?.until_ready().await
    }

    /// As [`Running::bootstrap`], a gateway.
    pub async fn gateway(
        bootstrap: serde_json::Value,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::from_file(Mode::Gateway, bootstrap, env)?
            .until_ready()
            .await
    }

    /// As [`Running::bootstrap`], returning as soon as it runs.
    pub fn bootstrap_unready(
        bootstrap: serde_json::Value,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::from_file(Mode::Sidecar, bootstrap, env)
    }

    fn from_file(
        mode: Mode,
        bootstrap: serde_json::Value,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bootstrap.yaml");
        std::fs::write(&path, serde_saphyr::to_string(&bootstrap)?)?;
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(mode, Some(path), env, dir)
    }

    /// A proxy in `mode` configured over xDS at `target` (see
    /// [`discovery_env`]), ready; `env` adds to its environment.
    pub async fn discovery(
        mode: Mode,
        target: &Target,
        token: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut all = discovery_env(target, token, dir.path())?;
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::spawn(mode, None, all, dir)?.until_ready().await
    }

    fn spawn(
        mode: Mode,
        bootstrap: Option<PathBuf>,
        env: Vec<(String, String)>,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        let ports = Ports {
            status: free_port()?,
            stats: free_port()?,
            prometheus: free_port()?,
            admin: free_port()?,
        };
        let mut env: BTreeMap<String, String> = env.into_iter().collect();
        for (variable, port) in [
            (ENV_STATUS_ADDRESS, ports.status),
            (ENV_STATS_ADDRESS, ports.stats),
            (ENV_PROMETHEUS_ADDRESS, ports.prometheus),
            (ENV_ADMIN_ADDRESS, ports.admin),
        ] {
            env.entry(variable.into())
                .or_insert(format!("127.0.0.1:{port}"));
        }
        let config = Config::from_env(mode, bootstrap, &env)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(bowline_proxy::run(config, stopped, None));
        Ok(Self {
            ports,
            stop,
            task,
            _dir: dir,
        })
    }

    async fn until_ready(self) -> anyhow::Result<Self> {
        let running = self;
        let mut waited = 0;
        while !running.ready().await? {
            ensure!(
                !running.task.is_finished(),
                "the proxy stopped before it was ready"
            );
            ensure!(waited < 300, "the proxy did not become ready in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += 1;
        }
        Ok(running)
    }

    /// Whether `/healthz/ready` answers 200.
    pub async fn ready(&self) -> anyhow::Result<bool> {
        Ok(crate::http::get(self.ports.status, "/healthz/ready")
            .await
            .is_ok_and(|(status, _)| status == 200))
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.send(true)?;
        tokio::time::timeout(Duration::from_secs(10), self.task).await???;
        Ok(())
    }
}

/// An Envoy STATIC cluster of `endpoints`, for bootstrap files.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr]) -> serde_json::Value {
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "0.5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{
            "lb_endpoints": endpoints.iter().map(|a| json!({"endpoint": {"address": {"socket_address": {
                "address": a.ip().to_string(), "port_value": a.port()}}}})).collect::<Vec<_>>(),
        }]},
    })
}

/// A bootstrap with one HTTP listener on 127.0.0.1:`port` whose one
/// virtual host (any domain) has `routes`, and `clusters`.
pub fn http_bootstrap(
    port: u16,
    routes: serde_json::Value,
    clusters: Vec<serde_json::Value>,
) -> serde_json::Value {
    json!({"static_resources": {
        "listeners": [{"name": "http", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [http_manager(json!([{"name": "all", "domains": ["*"], "routes": routes}]))]}]}],
        "clusters": clusters,
    }})
}

/// [`http_bootstrap`] with every request to `cluster`.
pub fn in_front_of(port: u16, cluster: serde_json::Value) -> serde_json::Value {
    let name = cluster["name"].clone();
    http_bootstrap(
        port,
        json!([{"match": {"prefix": "/"}, "route": {"cluster": name}}]),
        vec![cluster],
    )
}

/// An HTTP connection manager filter routing by `virtual_hosts`.
pub fn http_manager(virtual_hosts: serde_json::Value) -> serde_json::Value {
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "http", "route_config": {"name": "local", "virtual_hosts": virtual_hosts}}})
}

/// The control plane's translation of `snapshot` for the captured sidecar
/// of a `client` pod in namespace `shop` (10.244.0.9), as a bootstrap with
/// `listeners` on loopback ([`bootstrap_of`]).
pub fn client_sidecar_bootstrap(
    snapshot: &bowline_controlplane::model::Snapshot,
    listeners: &[(&str, u16)],
) -> anyhow::Result<serde_json::Value> {
    use bowline_controlplane::model::{Proxy, ProxyKind};
    let resources = bowline_controlplane::translate::sidecar(
        snapshot,
        &Proxy {
            id: "sidecar~10.244.0.9~client-1.shop~shop.svc.cluster.local".into(),
            kind: ProxyKind::Sidecar,
            namespace: "shop".into(),
            labels: BTreeMap::from([("app".into(), "client".into())]),
            ip: "10.244.0.9".into(),
            captured: true,
        },
    );
    bootstrap_of(&resources, listeners)
}

/// A ready endpoint without a sidecar at `address`, serving `service_port`.
pub fn plain_endpoint(
    address: SocketAddr,
    service_port: u32,
) -> bowline_controlplane::model::Endpoint {
    bowline_controlplane::model::Endpoint {
        address: address.ip().to_string(),
        service_port,
        port: address.port().into(),
        labels: BTreeMap::new(),
        ready: true,
        sidecar: false,
        service_account: None,
    }
}

/// The control plane's translation for one proxy as a bootstrap the proxy
/// runs without ADS: the listeners named in `listeners` moved to
/// 127.0.0.1 on the port given and bound (a captured proxy's listeners
/// are not), the route configurations they take over RDS inlined, and EDS
/// clusters given their endpoints inline. What runs is otherwise what the
/// control plane sends.
pub fn bootstrap_of(
    resources: &bowline_controlplane::translate::Resources,
    listeners: &[(&str, u16)],
) -> anyhow::Result<serde_json::Value> {
    use envoy_types::pb::google::protobuf::BoolValue;

    let mut bound = Vec::new();
    for (name, port) in listeners {
        let mut listener = resources
            .listeners
            .iter()
            .find(|l| l.name == *name)
            .with_context(|| format!("the control plane sent no listener {name}"))?
            .clone();
        let address: envoy_types::pb::envoy::config::core::v3::Address =
            bowline_proxy::envoy::from_json(json!({"socket_address": {
                "address": "127.0.0.1", "port_value": port}}))
            .map_err(anyhow::Error::msg)?;
        listener.address = Some(address);
        listener.bind_to_port = Some(BoolValue { value: true });
        bound.push(inline_routes(resources, listener)?);
    }
    Ok(json!({"static_resources": {"listeners": bound, "clusters": inline_clusters(resources)?}}))
}

/// The control plane's translation for a captured sidecar as a bootstrap,
/// every listener as sent (15001 and 15006 bound, the others reached
/// through them) with its routes and endpoints inline, and `secrets` (the
/// workload certificate `default` and the root `ROOTCA` a CA issued).
pub fn bootstrap_captured(
    resources: &bowline_controlplane::translate::Resources,
    secrets: &[serde_json::Value],
) -> anyhow::Result<serde_json::Value> {
    let listeners = resources
        .listeners
        .iter()
        .map(|l| inline_routes(resources, l.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(json!({"static_resources": {
        "listeners": listeners,
        "clusters": inline_clusters(resources)?,
        "secrets": secrets,
    }}))
}

/// The Envoy secrets of a workload certificate (`default`) and the root
/// (`ROOTCA`), as the proxy's SDS names them.
pub fn workload_secrets(chain_pem: &str, key_pem: &str, root_pem: &str) -> Vec<serde_json::Value> {
    vec![
        json!({"name": "default", "tls_certificate": {
            "certificate_chain": {"inline_string": chain_pem},
            "private_key": {"inline_string": key_pem}}}),
        json!({"name": "ROOTCA", "validation_context": {
            "trusted_ca": {"inline_string": root_pem}}}),
    ]
}

/// [`workload_secrets`] for `namespace`/`account`: a new P-256 key and
/// the SVID `ca` signs for it, as a sidecar's CA client would get.
pub fn workload_certificate(
    ca: &bowline_controlplane::ca::Authority,
    namespace: &str,
    account: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let identity = bowline_controlplane::ca::Identity {
        namespace: namespace.into(),
        service_account: account.into(),
    };
    let chain = ca.sign(&csr, &identity, None)?;
    let (root, leaf) = chain.split_last().context("a chain")?;
    Ok(workload_secrets(
        &leaf.join("\n"),
        &key.serialize_pem(),
        root,
    ))
}

/// A CA of its own (PEM) and a server certificate for `host` it signed,
/// with its key: what a Secret for a gateway or an external server holds.
#[derive(Debug)]
pub struct ServerCertificate {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

pub fn server_certificate(host: &str) -> anyhow::Result<ServerCertificate> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Not the leaf's name: a client would take the leaf for self-signed.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{host} test CA"));
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![host.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, host);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServerCertificate {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// EDS clusters with their endpoints inline, as JSON.
fn inline_clusters(
    resources: &bowline_controlplane::translate::Resources,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    let mut clusters = Vec::new();
    for cluster in &resources.clusters {
        let mut cluster = cluster.clone();
        let eds = ClusterDiscoveryType::Type(DiscoveryType::Eds as i32);
        if cluster.cluster_discovery_type == Some(eds) {
            let service = cluster
                .eds_cluster_config
                .take()
                .map(|c| c.service_name)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| cluster.name.clone());
            cluster.load_assignment = resources
                .endpoints
                .iter()
                .find(|e| e.cluster_name == service)
                .cloned();
            cluster.cluster_discovery_type =
                Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
        }
        clusters.push(bowline_proxy::envoy::to_json(&cluster).map_err(anyhow::Error::msg)?);
    }
    Ok(clusters)
}

/// A listener with the route configurations its HTTP chains take over RDS
/// inlined, as JSON.
fn inline_routes(
    resources: &bowline_controlplane::translate::Resources,
    mut listener: envoy_types::pb::envoy::config::listener::v3::Listener,
) -> anyhow::Result<serde_json::Value> {
    use envoy_types::pb::envoy::config::listener::v3::filter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    };
    use prost::{Message, Name};

    let chains = listener
        .filter_chains
        .iter_mut()
        .chain(listener.default_filter_chain.as_mut());
    for filter in chains.flat_map(|c| c.filters.iter_mut()) {
        let Some(filter::ConfigType::TypedConfig(any)) = &mut filter.config_type else {
            continue;
        };
        if any.type_url != HttpConnectionManager::type_url() {
            continue;
        }
        let mut manager = HttpConnectionManager::decode(any.value.as_slice())?;
        if let Some(RouteSpecifier::Rds(rds)) = &manager.route_specifier {
            let routes = resources
                .routes
                .iter()
                .find(|r| r.name == rds.route_config_name)
                .with_context(|| format!("no route configuration {}", rds.route_config_name))?;
            manager.route_specifier = Some(RouteSpecifier::RouteConfig(routes.clone()));
        }
        *any = envoy_types::util::pack_any(manager);
    }
    bowline_proxy::envoy::to_json(&listener).map_err(anyhow::Error::msg)
}
