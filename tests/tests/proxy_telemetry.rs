//! bowline-proxy's telemetry as Istio's users read it: two sidecars on
//! loopback — productpage's outbound side calling reviews' inbound side —
//! tell each other who they are in Istio's metadata exchange headers, and
//! Debian's Prometheus, scraping them on 15020 and 15090, finds
//! `istio_requests_total`, the duration and size histograms and the TCP
//! metrics with Istio's labels, from both reporters. The admin endpoint
//! answers `/ready` and `/server_info`, and `/quitquitquit` drains. A
//! Host a client makes up labels nothing inbound or at a gateway.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use bowline_tests::cluster::free_port;
use bowline_tests::mesh::series_sum;
use bowline_tests::prometheus::{Prometheus, Sample};
use bowline_tests::proxy::{
    Running, curl, echo, http_manager, in_front_of, static_cluster, upstream, workload_env,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const DB: &str = "db.shop.svc.cluster.local";

fn listener(name: &str, port: u16, direction: &str, filter: Value) -> Value {
    json!({"name": name, "traffic_direction": direction,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [filter]}]})
}

/// A STATIC cluster of one endpoint on 127.0.0.1; `sidecar` marks it as
/// a mesh endpoint (`tlsMode: istio`), `metadata` is the cluster's own.
fn cluster(name: &str, port: u16, sidecar: bool, metadata: Value) -> Value {
    let mut cluster = static_cluster(name, &[([127, 0, 0, 1], port).into()]);
    if sidecar {
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] =
            json!({"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}});
    }
    if !metadata.is_null() {
        cluster["metadata"] = metadata;
    }
    cluster
}

/// The one sample whose labels include all of `want`.
fn only<'a>(samples: &'a [Sample], want: &[(&str, &str)]) -> anyhow::Result<&'a Sample> {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    ensure!(
        matching.len() == 1,
        "one series with {want:?} expected, found {matching:?} among {samples:?}"
    );
    Ok(matching[0])
}

fn total(samples: &[Sample]) -> f64 {
    samples.iter().map(|(_, v)| v).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_istios_metrics_from_both_sidecars() -> anyhow::Result<()> {
    let (app, db) = (upstream("reviews").await?, echo().await?);
    let (inbound_port, outbound_port, tcp_port) = (free_port()?, free_port()?, free_port()?);

    // reviews-v1's sidecar: inbound, to its app.
    let reviews = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [listener("virtualInbound", inbound_port, "INBOUND", http_manager(json!([
                {"name": "inbound|http|9080", "domains": ["*"],
                 "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|9080||"}}]}])))],
            "clusters": [cluster("inbound|9080||", app.port(), false, json!({"filter_metadata": {"istio": {
                "services": [{"host": REVIEWS, "name": "reviews", "namespace": "shop"}]}}}))],
        }}),
        &workload_env("reviews-v1", r#"{"app":"reviews","version":"v1"}"#),
    )
    .await?;
    // productpage-v1's sidecar: outbound, to reviews' sidecar and to a
    // TCP database.
    let outbound = format!("outbound|9080||{REVIEWS}");
    let productpage = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [
                listener("0.0.0.0_9080", outbound_port, "OUTBOUND", http_manager(json!([
                    {"name": "reviews", "domains": [REVIEWS, format!("{REVIEWS}:9080")],
                     "routes": [{"match": {"prefix": "/"}, "route": {"cluster": outbound}}]}]))),
                listener("0.0.0.0_5432", tcp_port, "OUTBOUND", json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "db", "cluster": format!("outbound|5432||{DB}")}})),
            ],
            "clusters": [
                cluster(&outbound, inbound_port, true, Value::Null),
                cluster(&format!("outbound|5432||{DB}"), db.port(), false, Value::Null),
            ],
        }}),
        &workload_env("productpage-v1", r#"{"app":"productpage","version":"v1"}"#),
    )
    .await?;

    let url = |path: &str| format!("http://127.0.0.1:{outbound_port}{path}");
    let host = format!("Host: {REVIEWS}:9080");
    for _ in 0..30 {
        let (status, body) = curl(&["-H", &host, &url("/reviews/1")])?;
        ensure!(
            status == 200 && body.starts_with("reviews /reviews/1"),
            "{status} {body}"
        );
    }
    for _ in 0..5 {
        ensure!(curl(&["-H", &host, &url("/status/503")])?.0 == 503);
    }
    ensure!(curl(&["-H", "Host: nowhere.example", &url("/")])?.0 == 404);
    // The exchange's headers reach neither application.
    let (_, headers) = curl(&["-H", &host, "-D", "-", "-o", "/dev/null", &url("/")])?;
    ensure!(
        !headers.to_lowercase().contains("x-envoy-peer-metadata"),
        "{headers}"
    );
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await?;
    connection.write_all(b"ping").await?;
    let mut pong = [0; 4];
    connection.read_exact(&mut pong).await?;
    drop(connection);

    let mut prometheus = Prometheus::start(&[
        ("productpage", productpage.ports.stats, "/stats/prometheus"),
        ("reviews", reviews.ports.prometheus, "/stats/prometheus"),
    ])?;
    let limit = Duration::from_secs(30);
    let requests = prometheus
        .wait_for("istio_requests_total", limit, |s| total(s) >= 37.0 + 36.0)
        .await?;

    let common = [
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "shop"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_canonical_service", "productpage"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "shop"),
        ("destination_app", "reviews"),
        ("destination_version", "v1"),
        ("destination_canonical_revision", "v1"),
        ("destination_service", REVIEWS),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ];
    for (reporter, job, security) in [
        ("destination", "reviews", "none"),
        ("source", "productpage", "unknown"),
    ] {
        let mut want = common.to_vec();
        want.extend([
            ("reporter", reporter),
            ("job", job),
            ("connection_security_policy", security),
        ]);
        let ok = only(
            &requests,
            &[want.as_slice(), &[("response_code", "200")]].concat(),
        )?;
        ensure!(ok.1 == 31.0, "{reporter}: {ok:?}");
        let failed = only(
            &requests,
            &[want.as_slice(), &[("response_code", "503")]].concat(),
        )?;
        ensure!(failed.1 == 5.0, "{reporter}: {failed:?}");
    }
    let unrouted = only(
        &requests,
        &[("response_flags", "NR"), ("response_code", "404")],
    )?;
    ensure!(
        unrouted.0["destination_service"] == "nowhere.example"
            && unrouted.0["destination_workload"] == "unknown",
        "{unrouted:?}"
    );

    // The histograms, as the dashboards read them.
    let durations = prometheus.query(
        r#"sum by (reporter) (istio_request_duration_milliseconds_count{destination_workload="reviews-v1"})"#,
    )?;
    ensure!(
        durations.len() == 2 && durations.iter().all(|(_, v)| *v == 36.0),
        "{durations:?}"
    );
    let p50 = prometheus.query(
        r#"histogram_quantile(0.5, sum by (le) (istio_request_duration_milliseconds_bucket{reporter="destination"}))"#,
    )?;
    ensure!(
        p50.len() == 1 && p50[0].1 > 0.0 && p50[0].1 < 1_000.0,
        "{p50:?}"
    );
    let sizes = prometheus
        .query(r#"sum(istio_response_bytes_sum{reporter="destination",response_code="200"})"#)?;
    // Each answer is "reviews <path> <host>" and headers.
    ensure!(sizes.len() == 1 && sizes[0].1 > 31.0 * 40.0, "{sizes:?}");

    // The TCP connection: opened, closed, four bytes each way.
    let tcp = prometheus
        .wait_for(r#"{__name__=~"istio_tcp_.*"}"#, limit, |s| s.len() == 4)
        .await?;
    let by_name: BTreeMap<&str, f64> = tcp
        .iter()
        .map(|(labels, value)| (labels["__name__"].as_str(), *value))
        .collect();
    ensure!(
        by_name
            == BTreeMap::from([
                ("istio_tcp_connections_closed_total", 1.0),
                ("istio_tcp_connections_opened_total", 1.0),
                ("istio_tcp_received_bytes_total", 4.0),
                ("istio_tcp_sent_bytes_total", 4.0),
            ]),
        "{tcp:?}"
    );
    let (labels, _) = &tcp[0];
    ensure!(
        labels["reporter"] == "source"
            && labels["request_protocol"] == "tcp"
            && labels["destination_service"] == DB
            && labels["source_workload"] == "productpage-v1",
        "{labels:?}"
    );

    productpage.stop().await?;
    reviews.stop().await?;
    Ok(())
}

/// A request no service answers (here: no route) is labelled by its Host
/// on a sidecar's outbound side, as Istio does (checked above); inbound
/// and on a gateway, where any client picks the Host, its
/// `destination_service` is `unknown` (Istio's
/// `disable_host_header_fallback` there), so a client sending made-up
/// Hosts adds no metric series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_host_adds_no_series_inbound_or_at_a_gateway() -> anyhow::Result<()> {
    let app = upstream("reviews").await?;
    // Only /reviews is routed; anything else is a 404 (NR).
    let routes = http_manager(json!([{"name": "reviews", "domains": ["*"],
        "routes": [{"match": {"prefix": "/reviews"}, "route": {"cluster": "inbound|9080||"}}]}]));
    let clusters = json!([cluster(
        "inbound|9080||",
        app.port(),
        false,
        json!({"filter_metadata": {"istio": {
        "services": [{"host": REVIEWS, "name": "reviews", "namespace": "shop"}]}}})
    )]);
    let (inbound_port, gateway_port) = (free_port()?, free_port()?);
    let sidecar = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [listener("virtualInbound", inbound_port, "INBOUND", routes.clone())],
            "clusters": clusters.clone(),
        }}),
        &workload_env("reviews-v1", r#"{"app":"reviews","version":"v1"}"#),
    )
    .await?;
    let gateway = Running::gateway(
        json!({"static_resources": {
            "listeners": [listener("0.0.0.0_8080", gateway_port, "OUTBOUND", routes)],
            "clusters": clusters,
        }}),
        &workload_env("ingressgateway", r#"{"app":"ingressgateway"}"#),
    )
    .await?;
    for (name, proxy, port) in [
        ("inbound", &sidecar, inbound_port),
        ("gateway", &gateway, gateway_port),
    ] {
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
        for n in 0..3 {
            let host = format!("Host: made-up-{n}.example");
            ensure!(curl(&["-H", &host, &url("/elsewhere")])?.0 == 404);
        }
        ensure!(curl(&[&url("/reviews/1")])?.0 == 200);
        let scrape = format!(
            "http://127.0.0.1:{}/stats/prometheus",
            proxy.ports.prometheus
        );
        let (_, metrics) = curl(&[&scrape])?;
        let counted =
            |labels: &[(&str, &str)]| series_sum(&metrics, "istio_requests_total", labels);
        ensure!(
            counted(&[("response_flags", "NR"), ("destination_service", "unknown")]) == 3.0,
            "{name}: the unrouted requests counted as to an unknown service:\n{metrics}"
        );
        ensure!(
            counted(&[("response_code", "200"), ("destination_service", REVIEWS)]) == 1.0,
            "{name}: the routed request counted as to its cluster's service:\n{metrics}"
        );
        ensure!(
            !metrics.contains("made-up-"),
            "{name}: a client's Host became a label:\n{metrics}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_reports_and_drains() -> anyhow::Result<()> {
    let port = free_port()?;
    let app = upstream("app").await?;
    let proxy = Running::bootstrap(
        in_front_of(port, static_cluster("app", &[app])),
        &[("TERMINATION_DRAIN_DURATION_SECONDS", "1")],
    )
    .await?;
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", proxy.ports.admin);
    ensure!(curl(&[&admin("/ready")])? == (200, "LIVE\n".into()));
    let (status, info) = curl(&[&admin("/server_info")])?;
    let info: Value = serde_json::from_str(&info)?;
    ensure!(status == 200 && info["state"] == "LIVE", "{info}");
    ensure!(
        info["node"]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sidecar~")),
        "{info}"
    );
    let (_, dump) = curl(&[&admin("/config_dump")])?;
    let dump: Value = serde_json::from_str(&dump)?;
    ensure!(
        dump["configs"][0]["static_clusters"][0]["cluster"]["name"] == "app"
            && dump["configs"][1]["static_listeners"][0]["listener"]["address"]["socket_address"]["port_value"]
                == port,
        "{dump:#}"
    );
    // Only through POST.
    ensure!(curl(&[&admin("/quitquitquit")])?.0 == 405);
    ensure!(curl(&["-X", "POST", &admin("/quitquitquit")])?.0 == 200);
    // Draining: not ready, listeners closed.
    let (status, body) = curl(&[&admin("/ready")])?;
    ensure!(status == 503 && body == "DRAINING\n", "{status} {body}");
    let mut closed = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(closed, "the listener still accepts after /quitquitquit");
    Ok(())
}

/// `filter` on 127.0.0.1:`port`, with the access log the control plane
/// adds for `accessLogFile` and `accessLogEncoding`.
fn logged_listener(port: u16, filter: Value, path: &std::path::Path, json: bool) -> Value {
    use bowline_controlplane::model::{AccessLogSettings, Mesh};
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    let listener: Listener =
        bowline_proxy::envoy::from_json(listener(&format!("l_{port}"), port, "OUTBOUND", filter))
            .expect("a listener");
    let mut listeners = [listener];
    let mesh = Mesh {
        access_log: Some(AccessLogSettings {
            path: path.display().to_string(),
            json,
        }),
        ..Mesh::default()
    };
    bowline_controlplane::translate::observe(&mut listeners, &mesh);
    bowline_proxy::envoy::to_json(&listeners[0]).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_are_written_as_the_mesh_config_asks() -> anyhow::Result<()> {
    let (app, db) = (upstream("app").await?, echo().await?);
    let dir = tempfile::tempdir()?;
    let (json_log, text_log, tcp_log) = (
        dir.path().join("json.log"),
        dir.path().join("text.log"),
        dir.path().join("tcp.log"),
    );
    let (json_port, text_port, tcp_port) = (free_port()?, free_port()?, free_port()?);
    let routed = http_manager(json!([{"name": "all", "domains": ["*"],
        "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]));
    let opaque = json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "db", "cluster": "db"}});
    let proxy = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [
                logged_listener(json_port, routed.clone(), &json_log, true),
                logged_listener(text_port, routed, &text_log, false),
                logged_listener(tcp_port, opaque, &tcp_log, true),
            ],
            "clusters": [
                cluster("app", app.port(), false, Value::Null),
                cluster("db", db.port(), false, Value::Null),
            ],
        }}),
        &[],
    )
    .await?;
    let (status, _) = curl(&[
        "-H",
        "x-request-id: 7c1f",
        "-A",
        "probe/1",
        &format!("http://127.0.0.1:{json_port}/items/7?x=1"),
    ])?;
    ensure!(status == 200);
    ensure!(curl(&[&format!("http://127.0.0.1:{text_port}/status/503")])?.0 == 503);
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await?;
    connection.write_all(b"hello").await?;
    let mut echoed = [0; 5];
    connection.read_exact(&mut echoed).await?;
    drop(connection);

    // Lines are written by a thread of their own, soon after.
    let mut lines = (String::new(), String::new(), String::new());
    for _ in 0..50 {
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        lines = (read(&json_log), read(&text_log), read(&tcp_log));
        if [&lines.0, &lines.1, &lines.2]
            .iter()
            .all(|l| l.ends_with('\n'))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let entry: Value = serde_json::from_str(lines.0.trim())?;
    for (key, want) in [
        ("method", json!("GET")),
        ("path", json!("/items/7?x=1")),
        ("protocol", json!("HTTP/1.1")),
        ("response_code", json!(200)),
        ("response_flags", json!("-")),
        ("request_id", json!("7c1f")),
        ("user_agent", json!("probe/1")),
        ("authority", json!(format!("127.0.0.1:{json_port}"))),
        ("upstream_host", json!(app.to_string())),
        ("upstream_cluster", json!("app")),
        ("route_name", json!("default")),
        ("x_forwarded_for", Value::Null),
    ] {
        ensure!(entry[key] == want, "{key}: {} in {entry}", entry[key]);
    }
    ensure!(
        entry["bytes_sent"].as_u64().is_some_and(|n| n > 0)
            && entry["duration"].is_u64()
            && entry["start_time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z')),
        "{entry}"
    );
    let text = lines.1.trim();
    // A request without an id gets one, as from Envoy: a UUID.
    let request_id = text.split('"').nth(9).unwrap_or_default();
    ensure!(
        request_id.len() == 36 && request_id.matches('-').count() == 4,
        "{request_id:?} in {text}"
    );
    ensure!(
        text.contains("\"GET /status/503 HTTP/1.1\" 503 - via_upstream")
            && text.contains(&format!("\"{app}\" app ")),
        "{text}"
    );
    // A TCP connection: its bytes each way and where it went.
    let tcp: Value = serde_json::from_str(lines.2.trim())?;
    ensure!(
        tcp["bytes_received"] == 5
            && tcp["bytes_sent"] == 5
            && tcp["upstream_cluster"] == "db"
            && tcp["upstream_host"] == db.to_string()
            && tcp["response_flags"] == "-"
            && tcp["method"].is_null(),
        "{tcp}"
    );
    proxy.stop().await
}
