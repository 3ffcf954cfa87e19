//! The mesh end to end, through the real stack: the operator (from its Helm
//! chart) installs the demo mesh on the local cluster, the node agent runs
//! every pod — control plane, gateways, sample apps with their injected
//! sidecars — in network namespaces, and each test checks from inside a pod
//! what a user would: who answered, status codes, metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_tests::agent::images::SAMPLE_GRPC;
use bowline_tests::mesh::{
    apply, call_from, call_until, curl_from, curl_until, echo, echo_with, has_series, kubectl,
    namespace, outbound_diagnosis, pod, prometheus_api, prometheus_query, sample_call_from,
    service, shared, sidecar_metrics, wait_available,
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
    call_until(
        cluster,
        (ns, &client),
        "sample-echo",
        "http://echo/",
        &["--requests", "40"],
        |r| {
            answered(r, "v1") > 0
                && answered(r, "v2") > 0
                && answered(r, "v1") + answered(r, "v2") == 40
        },
    )
    .await
    .map_err(|error| error.context(outbound_diagnosis(cluster, ns, &client, "http://echo/")))?;
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
        has_series(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "client"),
                ("connection_security_policy", "mutual_tls")
            ],
        ),
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
        service(inside, "client"),
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
    curl_until(cluster, (inside, &meshed), &[&url], 200).await?;
    let legacy = pod(cluster, outside, "app=client")?;
    // The same pod reaches a sidecar that is PERMISSIVE (the default): what
    // refuses it below is STRICT, not its network.
    curl_until(
        cluster,
        (outside, &legacy),
        &[&format!("http://client.{inside}/")],
        200,
    )
    .await?;
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
    curl_until(cluster, (ns, &billing), &["http://payments/charge"], 200).await?;
    let body = curl_until(cluster, (ns, &orders), &["http://payments/charge"], 403).await?;
    ensure!(
        body.contains("RBAC"),
        "orders is denied by the policy: {body}"
    );
    let (code, body) = curl_from(cluster, ns, &billing, &["http://payments/charge"])?;
    ensure!(code == 200, "and billing still may: {code} {body}");
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
    call_until(
        cluster,
        (outside, &user),
        "sample-echo",
        gateway,
        &["--host", "api.myapp.com", "--requests", "5"],
        |r| answered(r, "stable") == 5,
    )
    .await?;
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
    for component in [
        "istiod",
        "istio-ingressgateway",
        "istio-egressgateway",
        "prometheus",
        "jaeger",
    ] {
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

fn virtual_service(namespace: &str, host: &str, http: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {"hosts": [host], "http": [http]},
    })
}

fn status_count(result: &Value, code: u16) -> u64 {
    result["statuses"][code.to_string()].as_u64().unwrap_or(0)
}

/// Retries turn a broken replica's 503s into 200s; a route timeout answers
/// 504 in its time; a 5 s delay injected into 25 % of requests delays about
/// a quarter of them by 5 s and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_and_an_injected_delay() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "resilience";
    let mut objects = vec![
        namespace(ns, true),
        service(ns, "flaky"),
        service(ns, "slow"),
    ];
    objects.extend(echo(ns, "flaky-ok", "flaky", "ok"));
    objects.extend(echo_with(
        ns,
        "flaky-broken",
        "flaky",
        "broken",
        &[("STATUS_CODE", "503")],
    ));
    objects.extend(echo(ns, "slow", "slow", "v1"));
    objects.extend(client(ns));
    apply(cluster, &objects)?;
    wait_available(cluster, ns)?;
    let client = pod(cluster, ns, "app=client")?;

    // Istio's default retries do not retry a 503 answer: half fail.
    call_until(
        cluster,
        (ns, &client),
        "sample-echo",
        "http://flaky/",
        &["--requests", "20"],
        |r| answered(r, "ok") > 0 && status_count(r, 503) > 0,
    )
    .await?;
    let result = call_from(
        cluster,
        ns,
        &client,
        "http://flaky/",
        &["--requests", "100"],
    )?;
    let failed = status_count(&result, 503);
    ensure!(
        (20..=80).contains(&failed),
        "without retries the broken replica's answers get through: {result}"
    );
    apply(
        cluster,
        &[virtual_service(
            ns,
            "flaky",
            json!({"route": [{"destination": {"host": "flaky"}}],
                   "retries": {"attempts": 3, "retryOn": "5xx"}}),
        )],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = call_from(
        cluster,
        ns,
        &client,
        "http://flaky/",
        &["--requests", "100"],
    )?;
    ensure!(
        status_count(&result, 200) == 100,
        "retries on 5xx go to the other replica: {result}"
    );

    apply(
        cluster,
        &[virtual_service(
            ns,
            "slow",
            json!({"route": [{"destination": {"host": "slow"}}], "timeout": "0.5s"}),
        )],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = call_from(
        cluster,
        ns,
        &client,
        "http://slow/delay/3000",
        &["--requests", "3"],
    )?;
    ensure!(
        status_count(&result, 504) == 3 && result["max_ms"].as_f64().unwrap_or(f64::MAX) < 1500.0,
        "a 0.5 s timeout answers 504 in about 0.5 s: {result}"
    );

    apply(
        cluster,
        &[virtual_service(
            ns,
            "slow",
            json!({"route": [{"destination": {"host": "slow"}}],
                   "fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 25}}}}),
        )],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = call_from(
        cluster,
        ns,
        &client,
        "http://slow/",
        &[
            "--requests",
            "60",
            "--concurrency",
            "60",
            "--slow",
            "4900ms",
        ],
    )?;
    let delayed = result["slow"].as_u64().unwrap_or(0);
    // 15 expected; four standard deviations (3.4) either side.
    ensure!(
        status_count(&result, 200) == 60 && (2..=28).contains(&delayed),
        "about a quarter delayed by 5 s: {result}"
    );
    ensure!(
        result["p50_ms"].as_f64().unwrap_or(f64::MAX) < 1000.0,
        "the others are not delayed: {result}"
    );
    Ok(())
}

/// A DestinationRule's connection pool answers 503 (response flag UO)
/// beyond its limits; its outlier detection ejects a replica that fails,
/// after which every request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaking_and_outlier_ejection() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "breakers";
    let mut objects = vec![
        namespace(ns, true),
        service(ns, "backend"),
        service(ns, "pool"),
    ];
    objects.extend(echo(ns, "backend", "backend", "v1"));
    objects.extend(echo(ns, "pool-ok", "pool", "ok"));
    objects.extend(echo_with(
        ns,
        "pool-broken",
        "pool",
        "broken",
        &[("STATUS_CODE", "503")],
    ));
    objects.extend(client(ns));
    objects.push(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "backend", "namespace": ns},
        "spec": {"host": "backend", "trafficPolicy": {"connectionPool": {
            "tcp": {"maxConnections": 1},
            "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 1,
                     "maxRequestsPerConnection": 1},
        }}},
    }));
    objects.push(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "pool", "namespace": ns},
        "spec": {"host": "pool", "trafficPolicy": {"outlierDetection": {
            "consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "60s",
            "maxEjectionPercent": 100,
        }}},
    }));
    apply(cluster, &objects)?;
    wait_available(cluster, ns)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = pod(cluster, ns, "app=client")?;

    let result = call_from(
        cluster,
        ns,
        &client,
        "http://backend/delay/300",
        &["--requests", "20", "--concurrency", "20"],
    )?;
    ensure!(
        status_count(&result, 200) >= 1 && status_count(&result, 503) >= 10,
        "one at a time gets through, the rest overflow: {result}"
    );
    let metrics = sidecar_metrics(cluster, ns, &client)?;
    ensure!(
        has_series(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("response_code", "503"),
                ("response_flags", "UO")
            ],
        ),
        "the client's sidecar reports the overflow as UO:\n{metrics}"
    );

    // Until the client's sidecar knows both replicas and has met the
    // broken one: its first failure ejects it.
    let first = call_until(
        cluster,
        (ns, &client),
        "sample-echo",
        "http://pool/",
        &["--requests", "20"],
        |r| status_count(r, 503) >= 1,
    )
    .await?;
    ensure!(
        status_count(&first, 503) <= 3,
        "the broken replica is ejected at its first failure: {first}"
    );
    // With it ejected (60 s), 50 requests in a row succeed. Waited for: a
    // DestinationRule reaching the client's sidecar after the replica was
    // met is a new cluster there, whose first failure ejects afresh.
    call_until(
        cluster,
        (ns, &client),
        "sample-echo",
        "http://pool/",
        &["--requests", "50"],
        |r| status_count(r, 200) == 50 && answered(r, "ok") == 50,
    )
    .await?;
    Ok(())
}

/// A ServiceEntry for a host outside the mesh — a server in a namespace
/// without sidecars playing it — reached by name from a sidecar, and
/// reported under that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_entry_reaches_an_external_host() -> anyhow::Result<()> {
    let cluster = shared()?;
    let (partner, ns) = ("partner", "egress-users");
    let mut objects = vec![namespace(partner, false), namespace(ns, true)];
    objects.extend(echo(partner, "partner-api", "partner-api", "partner"));
    objects.extend(client(ns));
    apply(cluster, &objects)?;
    wait_available(cluster, partner)?;
    wait_available(cluster, ns)?;
    let server = pod(cluster, partner, "app=partner-api")?;
    let ip = kubectl(
        cluster,
        &[
            "get",
            "pod",
            &server,
            "-n",
            partner,
            "-o",
            "jsonpath={.status.podIP}",
        ],
    )?;
    apply(
        cluster,
        &[json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "partner-api", "namespace": ns},
            "spec": {
                "hosts": ["api.partner.example"],
                "addresses": ["240.240.0.10"],
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                "location": "MESH_EXTERNAL",
                "resolution": "STATIC",
                "endpoints": [{"address": ip.trim(), "ports": {"http": 8080}}],
            },
        })],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = pod(cluster, ns, "app=client")?;
    let body = curl_until(
        cluster,
        (ns, &client),
        &[
            "--resolve",
            "api.partner.example:80:240.240.0.10",
            "http://api.partner.example/quote",
        ],
        200,
    )
    .await?;
    ensure!(
        body.contains("\"version\":\"partner\""),
        "the partner answered: {body}"
    );
    let metrics = sidecar_metrics(cluster, ns, &client)?;
    ensure!(
        has_series(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service", "api.partner.example"),
                ("response_code", "200")
            ],
        ),
        "the client's sidecar reports the call to api.partner.example:\n{metrics}"
    );
    Ok(())
}

/// gRPC through the mesh: calls to the sample gRPC service come back with
/// their status in the trailers, OK or NOT_FOUND, and the callee's sidecar
/// counts them as gRPC, by grpc_response_status, over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_carry_their_status_through_the_mesh() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "grpc";
    let labels = json!({"app": "greeter", "version": "v1"});
    let mut objects = vec![
        namespace(ns, true),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "greeter", "namespace": ns},
            "spec": {"selector": {"app": "greeter"},
                     "ports": [{"name": "grpc", "port": 9090, "targetPort": 9090}]},
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "greeter", "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "greeter",
                        "image": SAMPLE_GRPC,
                        "args": ["serve"],
                        "env": [{"name": "SERVICE_NAME", "value": "greeter"}],
                        "ports": [{"name": "grpc", "containerPort": 9090}],
                        "readinessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 1},
                    }],
                }},
            },
        }),
    ];
    objects.extend(client(ns));
    apply(cluster, &objects)?;
    wait_available(cluster, ns)?;
    let client = pod(cluster, ns, "app=client")?;
    let url = "http://greeter:9090";
    call_until(
        cluster,
        (ns, &client),
        "sample-grpc",
        url,
        &["--requests", "1", "--service", "greeter"],
        |r| r["grpc_statuses"] == json!({"Ok": 1}),
    )
    .await?;
    let result = sample_call_from(
        cluster,
        ns,
        &client,
        "sample-grpc",
        url,
        &["--requests", "20", "--service", "greeter"],
    )?;
    ensure!(
        result["grpc_statuses"] == json!({"Ok": 20}) && result["versions"] == json!({"v1": 20}),
        "every call answered OK by v1: {result}"
    );
    let result = sample_call_from(
        cluster,
        ns,
        &client,
        "sample-grpc",
        url,
        &["--requests", "5", "--service", "nobody"],
    )?;
    ensure!(
        result["grpc_statuses"] == json!({"NotFound": 5}),
        "an unknown service is NOT_FOUND, from the trailers: {result}"
    );
    let greeter = pod(cluster, ns, "app=greeter")?;
    let metrics = sidecar_metrics(cluster, ns, &greeter)?;
    for status in ["0", "5"] {
        ensure!(
            has_series(
                &metrics,
                "istio_requests_total",
                &[
                    ("reporter", "destination"),
                    ("request_protocol", "grpc"),
                    ("grpc_response_status", status),
                    ("connection_security_policy", "mutual_tls")
                ],
            ),
            "greeter's sidecar counts grpc status {status}:\n{metrics}"
        );
    }
    Ok(())
}

/// In a new injected namespace `ns`, the echo service and a client, and
/// `requests` calls from one to the other, all answered.
async fn meshed_calls(
    cluster: &bowline_tests::LocalCluster,
    ns: &str,
    requests: u64,
) -> anyhow::Result<()> {
    let mut objects = vec![namespace(ns, true), service(ns, "echo")];
    objects.extend(echo(ns, "echo", "echo", "v1"));
    objects.extend(client(ns));
    apply(cluster, &objects)?;
    wait_available(cluster, ns)?;
    let client = pod(cluster, ns, "app=client")?;
    let count = requests.to_string();
    call_until(
        cluster,
        (ns, &client),
        "sample-echo",
        "http://echo/",
        &["--requests", &count],
        |r| answered(r, "v1") == requests,
    )
    .await?;
    Ok(())
}

/// The mesh's Prometheus (the addon, running) scrapes the sidecars as its
/// configuration says: the requests of a client in the mesh show up in it
/// with Istio's labels, as mutual TLS, once each, queried through the API
/// server as a user would through `kubectl proxy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_sidecars() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "observed";
    meshed_calls(cluster, ns, 50).await?;
    let query = format!(
        "sum(istio_requests_total{{reporter=\"destination\",destination_workload_namespace=\"{ns}\",connection_security_policy=\"mutual_tls\"}})"
    );
    // Scraped every 15 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let result = prometheus_query(cluster, &query)?;
        let value = result[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if value >= 50.0 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "Prometheus has not seen the 50 requests in 90 s: {result}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Each sidecar is one target: a second one scraping the same 15020
    // would double every sum a dashboard makes.
    let targets = prometheus_api(cluster, "targets")?;
    let mut scraped: Vec<(String, String)> = targets["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["labels"]["namespace"] == ns)
        .map(|t| {
            let label = |name: &str| t["labels"][name].as_str().unwrap_or("").to_string();
            (label("pod"), label("job"))
        })
        .collect();
    scraped.sort();
    ensure!(
        !scraped.is_empty() && scraped.windows(2).all(|w| w[0].0 != w[1].0),
        "each pod of {ns} is scraped by one target: {scraped:?}"
    );
    Ok(())
}

/// The mesh's Jaeger (the addon, running) receives the sidecars' spans over
/// OTLP, as the demo profile's tracing settings say: the traced calls'
/// services show up in its query API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jaeger_receives_the_sidecars_spans() -> anyhow::Result<()> {
    let cluster = shared()?;
    let ns = "traced";
    meshed_calls(cluster, ns, 20).await?;
    let services = "/api/v1/namespaces/istio-system/services/tracing:80/proxy/jaeger/api/services";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer: Value = serde_json::from_str(&kubectl(cluster, &["get", "--raw", services])?)?;
        let names: Vec<&str> = answer["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if names.iter().any(|n| n.contains(ns)) {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "Jaeger has no service of namespace {ns} after 60 s: {answer}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(())
}
