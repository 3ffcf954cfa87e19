//! The mesh end to end, through the real stack: the operator (from its Helm
//! chart) installs the demo mesh on the local cluster, the node agent runs
//! every pod — control plane, gateways, sample apps with their injected
//! sidecars — in network namespaces, and each test checks from inside a pod
//! what a user would: who answered, status codes, metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_tests::mesh::{
    apply, call_from, curl_from, echo, kubectl, namespace, pod, service, shared, sidecar_metrics,
    wait_available,
};
use serde_json::{Value, json};

/// Requests answered by `version`.
fn answered(result: &Value, version: &str) -> u64 {
    result["versions"][version].as_u64().unwrap_or(0)
}

/// A client pod (the sample app, idle) in `namespace`, to call from.
fn client(namespace: &str) -> Vec<Value> {
    echo(namespace, "client", "client", "v1")
}

fn subsets(namespace: &str, host: &str, label: &str, names: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {"host": host, "subsets": names.iter()
            .map(|n| json!({"name": n, "labels": {label: n}})).collect::<Vec<_>>()},
    })
}

fn split(namespace: &str, v1: u32, v2: u32) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "echo", "namespace": namespace},
        "spec": {"hosts": ["echo"], "http": [{"route": [
            {"destination": {"host": "echo", "subset": "v1"}, "weight": v1},
            {"destination": {"host": "echo", "subset": "v2"}, "weight": v2},
        ]}]},
    })
}

/// 90/10 over 400 requests, then 75/25 after editing the VirtualService;
/// each within five standard deviations of its share. The answers came
/// over mutual TLS, as the callee's sidecar counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_follows_the_virtual_service() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "split";
    let mut objects = vec![namespace(ns, true), service(ns, "echo")];
    objects.extend(echo(ns, "echo-v1", "echo", "v1"));
    objects.extend(echo(ns, "echo-v2", "echo", "v2"));
    objects.extend(client(ns));
    objects.push(subsets(ns, "echo", "version", &["v1", "v2"]));
    objects.push(split(ns, 90, 10));
    apply(cluster, &objects)?;
    wait_available(cluster, ns)?;
    let client = pod(cluster, ns, "app=client")?;

    let within = |result: &Value, share: f64, n: f64| {
        let expected = share * n;
        let deviation = (n * share * (1.0 - share)).sqrt();
        let got = answered(result, "v2") as f64;
        (got - expected).abs() <= 5.0 * deviation
    };
    let result = call_from(cluster, ns, &client, "http://echo/", &["--requests", "400"])?;
    ensure!(
        answered(&result, "v1") + answered(&result, "v2") == 400,
        "every request answered: {result}"
    );
    ensure!(within(&result, 0.10, 400.0), "90/10: {result}");

    apply(cluster, &[split(ns, 75, 25)])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = call_from(cluster, ns, &client, "http://echo/", &["--requests", "400"])?;
    ensure!(
        answered(&result, "v1") + answered(&result, "v2") == 400,
        "every request answered: {result}"
    );
    ensure!(within(&result, 0.25, 400.0), "75/25: {result}");

    let v2 = pod(cluster, ns, "app=echo,version=v2")?;
    let metrics = sidecar_metrics(cluster, ns, &v2)?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_workload=\"client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "echo-v2's sidecar counts the client's requests as mutual TLS:\n{metrics}"
    );
    Ok(())
}

/// A namespace with STRICT mutual TLS: a pod without a sidecar is refused,
/// a pod with one gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_refuses_a_pod_without_a_sidecar() -> anyhow::Result<()> {
    let cluster = shared()?;
    let (ns, outside, inside) = ("strict", "strict-legacy", "strict-meshed");
    let mut objects = vec![
        namespace(ns, true),
        namespace(outside, false),
        namespace(inside, true),
        service(ns, "echo"),
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": ns},
            "spec": {"mtls": {"mode": "STRICT"}},
        }),
    ];
    objects.extend(echo(ns, "echo", "echo", "v1"));
    objects.extend(client(outside));
    objects.extend(client(inside));
    apply(cluster, &objects)?;
    for n in [ns, outside, inside] {
        wait_available(cluster, n)?;
    }
    let url = format!("http://echo.{ns}/");
    let meshed = pod(cluster, inside, "app=client")?;
    let (code, body) = curl_from(cluster, inside, &meshed, &[&url])?;
    ensure!(
        code == 200,
        "a pod with a sidecar gets through: {code} {body}"
    );
    let legacy = pod(cluster, outside, "app=client")?;
    let (code, body) = curl_from(cluster, outside, &legacy, &[&url])?;
    ensure!(
        code == 0,
        "a pod without a sidecar is refused (no HTTP answer at all): {code} {body}"
    );
    Ok(())
}

/// An AuthorizationPolicy letting only `billing` call `payments`: billing
/// gets 200, orders 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_billing_may_call_payments() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "shop";
    let mut objects = vec![namespace(ns, true), service(ns, "payments")];
    objects.extend(echo(ns, "payments", "payments", "v1"));
    objects.extend(echo(ns, "billing", "billing", "v1"));
    objects.extend(echo(ns, "orders", "orders", "v1"));
    objects.push(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "payments", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "payments"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [
                format!("cluster.local/ns/{ns}/sa/billing")
            ]}}]}],
        },
    }));
    apply(cluster, &objects)?;
    wait_available(cluster, ns)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let billing = pod(cluster, ns, "app=billing")?;
    let orders = pod(cluster, ns, "app=orders")?;
    let (code, body) = curl_from(cluster, ns, &billing, &["http://payments/charge"])?;
    ensure!(code == 200, "billing may: {code} {body}");
    let (code, body) = curl_from(cluster, ns, &orders, &["http://payments/charge"])?;
    ensure!(code == 403, "orders may not: {code} {body}");
    Ok(())
}

/// A Gateway for api.myapp.com on the ingress gateway, `/v1` routed to
/// api-service's `stable` subset: a client outside the mesh, through the
/// gateway's Service, gets stable's answers for /v1 and 404 elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_routes_api_myapp_com_v1_to_stable() -> anyhow::Result<()> {
    let cluster = shared()?;
    let (ns, outside) = ("api", "api-users");
    let mut objects = vec![
        namespace(ns, true),
        namespace(outside, false),
        service(ns, "api-service"),
    ];
    objects.extend(echo(ns, "api-stable", "api-service", "stable"));
    objects.extend(echo(ns, "api-canary", "api-service", "canary"));
    objects.extend(client(outside));
    objects.push(subsets(ns, "api-service", "version", &["stable", "canary"]));
    objects.push(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "api-gateway", "namespace": ns},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{
            "port": {"number": 80, "name": "http", "protocol": "HTTP"},
            "hosts": ["api.myapp.com"],
        }]},
    }));
    objects.push(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "api", "namespace": ns},
        "spec": {"hosts": ["api.myapp.com"], "gateways": ["api-gateway"], "http": [{
            "match": [{"uri": {"prefix": "/v1"}}],
            "route": [{"destination": {"host": "api-service", "subset": "stable"}}],
        }]},
    }));
    apply(cluster, &objects)?;
    for n in [ns, outside] {
        wait_available(cluster, n)?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let user = pod(cluster, outside, "app=client")?;
    let gateway = "http://istio-ingressgateway.istio-system/v1/orders";
    let result = call_from(
        cluster,
        outside,
        &user,
        gateway,
        &["--host", "api.myapp.com", "--requests", "50"],
    )?;
    ensure!(
        answered(&result, "stable") == 50,
        "/v1 is stable's: {result}"
    );
    let (code, _) = curl_from(
        cluster,
        outside,
        &user,
        &[
            "-H",
            "Host: api.myapp.com",
            "http://istio-ingressgateway.istio-system/v2",
        ],
    )?;
    ensure!(code == 404, "/v2 is routed nowhere: {code}");
    let (code, _) = curl_from(
        cluster,
        outside,
        &user,
        &[
            "-H",
            "Host: other.myapp.com",
            "http://istio-ingressgateway.istio-system/v1",
        ],
    )?;
    ensure!(code == 404, "another host is not the gateway's: {code}");
    Ok(())
}

/// The operator's pods and the mesh's run on the agent's Node: the
/// installation is Ready with every component, and the control plane
/// serves the proxies (each sidecar has its certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_installs_the_mesh_on_running_pods() -> anyhow::Result<()> {
    let cluster = shared()?;
    let pods: Value = serde_json::from_str(&kubectl(
        cluster,
        &["get", "pods", "-n", "istio-system", "-o", "json"],
    )?)?;
    let mut running = BTreeMap::new();
    for pod in pods["items"].as_array().context("pods")? {
        let app = pod["metadata"]["labels"]["app"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let simulated = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "bowline.dev/Simulated");
        running.insert(app, (pod["status"]["phase"].clone(), simulated));
    }
    for component in ["istiod", "istio-ingressgateway", "istio-egressgateway"] {
        ensure!(
            running.get(component) == Some(&(json!("Running"), false)),
            "{component} runs for real: {running:?}"
        );
    }
    for addon in ["grafana", "kiali"] {
        ensure!(
            running.get(addon).is_some_and(|(_, simulated)| *simulated),
            "{addon} has no local program and says so: {running:?}"
        );
    }
    let status = kubectl(
        cluster,
        &[
            "get",
            "meshinstallation",
            "default",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
    )?;
    ensure!(status == "True", "the installation is Ready: {status}");
    Ok(())
}
