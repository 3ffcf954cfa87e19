//! Pods as network namespaces on a bridge, each with its application and
//! (but one) a sidecar: `bowline-proxy init`'s iptables rules, the proxy
//! running as UID 1337 with what the control plane translates for it, and
//! its workload certificate from the mesh CA. Proven from outside:
//! plaintext requests leave as mutual TLS (the wire shows a ClientHello
//! offering Istio's ALPN and never the request) and reach the application
//! as plaintext; STRICT refuses a pod without a sidecar, PERMISSIVE takes
//! it; an AuthorizationPolicy lets `billing` call `payments` and answers
//! everyone else 403 — and on payments' TCP port, where there is no
//! request to answer, closes everyone else's connection; the
//! destination's metrics name the caller's SPIFFE ID and `mutual_tls`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_controlplane::ca::Authority;
use bowline_controlplane::model::{
    Config, Endpoint, Protocol, Proxy, ProxyKind, Service, ServicePort, Snapshot,
};
use bowline_tests::netns::{Network, exec, listen_in, proxy_binary};
use bowline_tests::proxy::{bootstrap_captured, serve_upstream, workload_certificate};
use serde_json::json;

const NAMESPACE: &str = "shop";
const PAYMENTS_IP: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 10);
const PAYMENTS_VIP: &str = "10.252.0.10";
const SERVICES: &str = "10.252.0.0/24";
/// payments' opaque TCP port: its application echoes what it reads.
const LEDGER_PORT: u32 = 9000;
struct Pod {
    name: &'static str,
    ip: Ipv4Addr,
    account: &'static str,
}

const PAYMENTS: Pod = Pod {
    name: "payments",
    ip: PAYMENTS_IP,
    account: "payments",
};
const BILLING: Pod = Pod {
    name: "billing",
    ip: Ipv4Addr::new(10, 251, 0, 11),
    account: "billing",
};
const ORDERS: Pod = Pod {
    name: "orders",
    ip: Ipv4Addr::new(10, 251, 0, 12),
    account: "orders",
};

fn mesh(namespace: &str, mtls: &str) -> anyhow::Result<Snapshot> {
    let mut service = Service::kubernetes(
        "payments",
        namespace,
        vec![
            ServicePort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Http,
            },
            ServicePort {
                name: "tcp-ledger".into(),
                port: LEDGER_PORT,
                protocol: Protocol::Tcp,
            },
        ],
    );
    service.address = Some(PAYMENTS_VIP.into());
    let endpoint = |port| Endpoint {
        address: PAYMENTS_IP.to_string(),
        service_port: port,
        port,
        labels: BTreeMap::from([("app".into(), "payments".into())]),
        ready: true,
        sidecar: true,
        service_account: Some("payments".into()),
    };
    Ok(Snapshot {
        endpoints: Arc::new(BTreeMap::from([(
            service.hostname.clone(),
            vec![endpoint(8080), endpoint(LEDGER_PORT)],
        )])),
        services: Arc::new(BTreeMap::from([(service.hostname.clone(), service)])),
        peer_authentications: Arc::new(vec![Config::new(
            "default",
            namespace,
            serde_json::from_value(json!({"mtls": {"mode": mtls}}))?,
        )]),
        authorization_policies: Arc::new(vec![Config::new(
            "payments-from-billing",
            namespace,
            serde_json::from_value(json!({
                "selector": {"matchLabels": {"app": "payments"}},
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{namespace}/sa/billing")]}}]}],
            }))?,
        )]),
        ..Snapshot::default()
    })
}

/// The pod's sidecar in `namespace`: its translation, with `secrets`
/// (none when it gets its certificate from the CA itself).
fn bootstrap(
    snapshot: &Snapshot,
    namespace: &str,
    pod: &Pod,
    secrets: &[serde_json::Value],
) -> anyhow::Result<serde_json::Value> {
    let proxy = Proxy {
        id: format!(
            "sidecar~{}~{}-1.{namespace}~{namespace}.svc.cluster.local",
            pod.ip, pod.name
        ),
        kind: ProxyKind::Sidecar,
        namespace: namespace.into(),
        labels: BTreeMap::from([("app".into(), pod.name.into())]),
        ip: pod.ip.to_string(),
        captured: true,
    };
    let resources = bowline_controlplane::translate::sidecar(snapshot, &proxy);
    bootstrap_captured(&resources, secrets)
}

/// Starts the pod's sidecar (capture rules first), and waits for it.
fn sidecar(
    network: &mut Network,
    ns: &str,
    namespace: &str,
    pod: &Pod,
    bootstrap: &serde_json::Value,
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> anyhow::Result<usize> {
    let proxy = proxy_binary()?;
    let proxy = proxy.to_str().context("a UTF-8 path")?;
    // The init container the injector gives a pod without annotations.
    let init = bowline_controlplane::inject::init_args(&BTreeMap::new());
    let mut command = vec!["ip", "netns", "exec", ns, proxy];
    command.extend(init.iter().map(String::as_str));
    bowline_tests::netns::run(&command)?;
    let file = dir.join(format!("{}.yaml", pod.name));
    std::fs::write(&file, serde_saphyr::to_string(bootstrap)?)?;
    let file = file.to_str().context("a UTF-8 path")?.to_string();
    let mut env = env.to_vec();
    env.extend([
        ("POD_NAME", format!("{}-1", pod.name)),
        ("POD_NAMESPACE", namespace.into()),
        ("INSTANCE_IP", pod.ip.to_string()),
        ("SERVICE_ACCOUNT", pod.account.into()),
        ("ISTIO_META_WORKLOAD_NAME", pod.name.into()),
        (
            "ISTIO_METAJSON_LABELS",
            json!({"app": pod.name}).to_string(),
        ),
        // The sidecars log warnings unless told otherwise.
        (
            "RUST_LOG",
            std::env::var("SIDECAR_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ]);
    let index = network.spawn(
        ns,
        &[
            "setpriv",
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            proxy,
            "sidecar",
            "--bootstrap",
            &file,
        ],
        &env,
    )?;
    for _ in 0..100 {
        let ready = exec(
            ns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15021/healthz/ready",
            ],
        )?;
        if ready.stdout == b"200" {
            return Ok(index);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the {} sidecar did not become ready", pod.name)
}

/// A request from pod `ns` to payments' Service; (status, body), status
/// 0 when the connection failed.
fn call(ns: &str, to: &str, namespace: &str) -> anyhow::Result<(u16, String)> {
    let host = format!("Host: payments.{namespace}.svc.cluster.local:8080");
    let output = exec(
        ns,
        &[
            "curl",
            "-s",
            "-m",
            "5",
            "-H",
            &host,
            "-w",
            "\n%{http_code}",
            &format!("http://{to}:8080/pay"),
        ],
    )?;
    let text = String::from_utf8(output.stdout)?;
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// The payments applications, listening inside its pod: HTTP on 8080
/// (answering `payments <path>`), an echo on the ledger port.
fn serve_payments(ns: &str) -> anyhow::Result<()> {
    serve_upstream(
        listen_in(ns, (Ipv4Addr::UNSPECIFIED, 8080).into())?,
        "payments",
    )?;
    let ledger_app = listen_in(ns, (Ipv4Addr::UNSPECIFIED, LEDGER_PORT as u16).into())?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = ledger_app.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    Ok(())
}

/// What comes back from payments' TCP port for a line sent from pod `ns`
/// (empty when the connection is closed without an answer).
fn ledger(ns: &str) -> anyhow::Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{PAYMENTS_VIP}', {LEDGER_PORT}), timeout=5)\n\
         s.sendall(b'entry 42\\n')\n\
         try:\n    print(s.recv(100).decode(), end='')\n\
         except ConnectionResetError:\n    pass\n"
    );
    let output = exec(ns, &["python3", "-c", &script])?;
    ensure!(
        output.status.success(),
        "the ledger client: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// What the sidecar in pod `ns` answers on its own port and path
/// (`15020/stats/prometheus`), asked on the pod's loopback.
fn from_sidecar(ns: &str, port_and_path: &str) -> anyhow::Result<String> {
    let output = exec(
        ns,
        &["curl", "-s", &format!("http://127.0.0.1:{port_and_path}")],
    )?;
    Ok(String::from_utf8(output.stdout)?)
}

/// What crossed the bridge while `during` ran, as tcpdump wrote it.
fn on_the_wire(
    network: &mut Network,
    dir: &std::path::Path,
    during: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<u8>> {
    static CAPTURES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CAPTURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = dir.join(format!("wire-{n}.pcap"));
    let path = file.to_str().context("a UTF-8 path")?.to_string();
    let node = network.node().to_string();
    let capture = network.spawn(
        &node,
        &[
            "tcpdump",
            "--immediate-mode",
            "-i",
            "any",
            "-U",
            "-s",
            "0",
            "-w",
            &path,
            "tcp",
        ],
        &[],
    )?;
    // tcpdump has opened its capture once it has written the file's
    // header; it takes a moment more to see packets.
    for _ in 0..50 {
        if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    during()?;
    std::thread::sleep(Duration::from_millis(300));
    network.stop(capture);
    Ok(std::fs::read(&file)?)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_talk_mutual_tls_and_policies_hold() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The sidecars (UID 1337) read their bootstraps from here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let ca = Authority::self_signed("cluster.local", Duration::from_secs(3600))?;
    let mut network = Network::new("mt")?;
    let mut namespaces = BTreeMap::new();
    for pod in [&PAYMENTS, &BILLING, &ORDERS] {
        namespaces.insert(pod.name, network.pod(pod.name, pod.ip, &[SERVICES])?);
    }
    let legacy = network.pod("legacy", Ipv4Addr::new(10, 251, 0, 13), &[SERVICES])?;
    serve_payments(&namespaces["payments"])?;

    let strict = mesh(NAMESPACE, "STRICT")?;
    let mut payments_sidecar = 0;
    for pod in [&PAYMENTS, &BILLING, &ORDERS] {
        let secrets = workload_certificate(&ca, NAMESPACE, pod.account)?;
        let index = sidecar(
            &mut network,
            &namespaces[pod.name],
            NAMESPACE,
            pod,
            &bootstrap(&strict, NAMESPACE, pod, &secrets)?,
            dir.path(),
            &[],
        )?;
        if pod.name == "payments" {
            payments_sidecar = index;
        }
    }

    // billing → payments: allowed, over mutual TLS, plaintext at the app.
    let billing = namespaces["billing"].clone();
    let mut answer = (0, String::new());
    let wire = on_the_wire(&mut network, dir.path(), || {
        answer = call(&billing, PAYMENTS_VIP, NAMESPACE)?;
        Ok(())
    })?;
    ensure!(
        answer.0 == 200 && answer.1.starts_with("payments /pay"),
        "billing → payments: {answer:?}"
    );
    ensure!(
        contains(&wire, b"istio-http/1.1"),
        "no ClientHello offering istio-http/1.1 on the wire ({} bytes)",
        wire.len()
    );
    ensure!(
        !contains(&wire, b"GET /pay"),
        "the request crossed the wire in plaintext"
    );

    // orders → payments: mutual TLS, but not allowed.
    let (status, body) = call(&namespaces["orders"], PAYMENTS_VIP, NAMESPACE)?;
    ensure!(
        status == 403 && body == "RBAC: access denied",
        "orders → payments: {status} {body}"
    );

    // The TCP port: the same policy, judged per connection.
    let echoed = ledger(&billing)?;
    ensure!(echoed == "entry 42\n", "billing → ledger: {echoed:?}");
    let echoed = ledger(&namespaces["orders"])?;
    ensure!(
        echoed.is_empty(),
        "orders' connection to the ledger is closed unanswered: {echoed:?}"
    );

    // A pod without a sidecar, straight to the payments pod: STRICT
    // refuses it (and the wire shows the plaintext it tried).
    let mut refused = (0, String::new());
    let wire = on_the_wire(&mut network, dir.path(), || {
        refused = call(&legacy, &PAYMENTS_IP.to_string(), NAMESPACE)?;
        Ok(())
    })?;
    ensure!(refused.0 == 0, "STRICT let plaintext in: {refused:?}");
    ensure!(
        contains(&wire, b"GET /pay"),
        "the capture saw no plaintext request"
    );

    // The destination's metrics: who called, over what.
    let metrics = from_sidecar(&namespaces["payments"], "15020/stats/prometheus")?;
    let series = |code: &str, principal: &str, flags: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains(&format!(
                    "source_principal=\"spiffe://cluster.local/ns/shop/sa/{principal}\""
                ))
                && l.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/shop/sa/payments\"",
                )
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains(&format!("response_flags=\"{flags}\""))
        })
    };
    ensure!(
        series("200", "billing", "-"),
        "no mutual_tls 200 from billing:\n{metrics}"
    );
    ensure!(
        series("403", "orders", "RBAC"),
        "no denied series from orders:\n{metrics}"
    );
    // The connections closed before any chain served them, and why.
    let refused = |chain: &str, reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with("bowline_proxy_connections_refused_total{")
                && l.contains(&format!("filter_chain=\"{chain}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
    };
    ensure!(
        refused("inbound|9000|||tls", "rbac"),
        "orders' ledger connection counted as refused by RBAC:\n{metrics}"
    );
    ensure!(
        refused("", "no_filter_chain"),
        "legacy's plaintext counted as matching no chain under STRICT:\n{metrics}"
    );
    // The source's: both ends' identities from its side of the handshake.
    let metrics = from_sidecar(&namespaces["billing"], "15020/stats/prometheus")?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("response_code=\"200\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/billing\"")
                && l.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/shop/sa/payments\""
                )),
        "no source series naming both principals:\n{metrics}"
    );

    // PERMISSIVE: the same pod takes plaintext and mutual TLS alike.
    network.stop(payments_sidecar);
    let permissive = mesh(NAMESPACE, "PERMISSIVE")?;
    let secrets = workload_certificate(&ca, NAMESPACE, PAYMENTS.account)?;
    sidecar(
        &mut network,
        &namespaces["payments"],
        NAMESPACE,
        &PAYMENTS,
        &bootstrap(&permissive, NAMESPACE, &PAYMENTS, &secrets)?,
        dir.path(),
        &[],
    )?;
    let plain = call(&legacy, &PAYMENTS_IP.to_string(), NAMESPACE)?;
    ensure!(
        plain.0 == 403,
        "PERMISSIVE plaintext reaches the policy, which wants billing's identity: {plain:?}"
    );
    let mutual = call(&billing, PAYMENTS_VIP, NAMESPACE)?;
    ensure!(mutual.0 == 200, "PERMISSIVE mutual TLS: {mutual:?}");
    Ok(())
}

/// The CA's pod, as istiod's: its address on the pods' network and the
/// name its serving certificate carries.
const ISTIOD_IP: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);
const ISTIOD_NAME: &str = "istiod.bowline-system.svc";
/// How long the CA's certificates live in the rotation test.
const LIFETIME: &str = "4s";

/// The serial number of the certificate the sidecar in pod `ns` serves as
/// `default` (its admin `/certs`, on the pod's loopback).
fn serving_serial(ns: &str) -> anyhow::Result<String> {
    let certs: serde_json::Value = serde_json::from_str(&from_sidecar(ns, "15000/certs")?)?;
    certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["cert_chain"][0])
        .find(|c| c["path"] == "default")
        .and_then(|c| c["serial_number"].as_str())
        .map(String::from)
        .with_context(|| format!("a workload certificate in {certs}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_ca_rotate_between_pods_under_traffic() -> anyhow::Result<()> {
    use bowline_controlplane::ca::AUDIENCE;
    use bowline_controlplane::ca_service::CertificateService;
    use bowline_tests::cluster::service_account_token;

    let cluster = bowline_tests::LocalCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.test_namespace(&client, "mesh-rotation").await?;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let ca = Arc::new(Authority::self_signed(
        "cluster.local",
        Duration::from_secs(3600),
    )?);
    let mut network = Network::new("mr")?;
    let istiod = network.pod("istiod", ISTIOD_IP, &[SERVICES])?;
    let payments = network.pod(PAYMENTS.name, PAYMENTS.ip, &[SERVICES])?;
    let billing = network.pod(BILLING.name, BILLING.ip, &[SERVICES])?;
    serve_payments(&payments)?;

    // The CA in its pod: Istio's CreateCertificate over TLS, tokens checked
    // with the cluster's TokenReview.
    let listener = listen_in(&istiod, (ISTIOD_IP, 15012).into())?;
    let (chain, key) =
        ca.serving_certificate(&[ISTIOD_NAME.into()], &[], Duration::from_secs(3600))?;
    let server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(chain, key)),
        )?
        .add_service(CertificateService::new(Arc::clone(&ca), client.clone()))
        .serve_with_incoming(futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        }));
    let ca_server = tokio::spawn(server);

    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, ca.root_pem())?;
    let snapshot = mesh(&namespace, "STRICT")?;
    for (pod, ns) in [(&PAYMENTS, &payments), (&BILLING, &billing)] {
        let token = service_account_token(&client, &namespace, pod.account, Some(AUDIENCE)).await?;
        let token_file = dir.path().join(format!("{}-token", pod.name));
        std::fs::write(&token_file, token)?;
        let path = |p: &std::path::Path| p.display().to_string();
        sidecar(
            &mut network,
            ns,
            &namespace,
            pod,
            &bootstrap(&snapshot, &namespace, pod, &[])?,
            dir.path(),
            &[
                ("CA_ADDR", format!("{ISTIOD_IP}:15012")),
                ("ISTIOD_SAN", ISTIOD_NAME.into()),
                ("XDS_ROOT_CA", path(&root)),
                ("BOWLINE_PROXY_TOKEN_PATH", path(&token_file)),
                ("SECRET_TTL", LIFETIME.into()),
            ],
        )?;
    }

    // Steady traffic for twelve seconds: each ledger call a new connection
    // (a new TLS connection between the sidecars), HTTP calls on the pool.
    let started = std::time::Instant::now();
    let (mut calls, mut failures) = (0, Vec::new());
    let mut serials = std::collections::BTreeSet::new();
    while started.elapsed() < Duration::from_secs(12) && calls < 2_000 {
        calls += 2;
        match ledger(&billing) {
            Ok(echoed) if echoed == "entry 42\n" => {}
            other => failures.push(format!("{:?} ledger: {other:?}", started.elapsed())),
        }
        match call(&billing, PAYMENTS_VIP, &namespace) {
            Ok((200, _)) => {}
            other => failures.push(format!("{:?} http: {other:?}", started.elapsed())),
        }
        serials.insert(serving_serial(&payments)?);
        serials.insert(serving_serial(&billing)?);
    }
    println!(
        "{calls} calls between the pods over {:?} with {LIFETIME} certificates: {} failed; {} certificates seen",
        started.elapsed(),
        failures.len(),
        serials.len()
    );
    ensure!(
        failures.is_empty(),
        "no call fails during rotation: {failures:?}"
    );
    // Two sidecars, each renewing about every two seconds.
    ensure!(
        serials.len() >= 8,
        "the sidecars' certificates rotated: {serials:?}"
    );
    ca_server.abort();
    Ok(())
}
