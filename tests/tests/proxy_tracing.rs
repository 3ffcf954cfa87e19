//! bowline-proxy's traces as a Jaeger user reads them: two sidecars on
//! loopback — productpage's outbound side calling reviews' inbound side,
//! with the tracing the control plane adds for the mesh config — send
//! their spans over OTLP/gRPC to a collector. A request becomes one trace:
//! productpage's CLIENT span, then reviews' SERVER span as its child, each
//! named by its route's decorator and tagged as Envoy tags them; the
//! application sees the SERVER span as its parent in both W3C and B3
//! headers. A caller's context (B3 or traceparent) is continued, its
//! "not sampled" respected, and with 0 % sampling only
//! `x-client-trace-id` requests are traced.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_tests::cluster::free_port;
use bowline_tests::otlp::{Collector, Received};
use bowline_tests::proxy::{Running, curl, http_manager, static_cluster, workload_env};
use serde_json::{Value, json};

const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const COLLECTOR_HOST: &str = "jaeger-collector.istio-system.svc.cluster.local";
const COLLECTOR_CLUSTER: &str = "outbound|4317||jaeger-collector.istio-system.svc.cluster.local";
const OPERATION: &str = "reviews.shop.svc.cluster.local:9080/*";

/// An application that answers 200 (or the status its path names) and
/// keeps each request's headers.
async fn application() -> anyhow::Result<(u16, Arc<Mutex<Vec<http::HeaderMap>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&seen);
    let app =
        axum::Router::new().fallback(move |uri: http::Uri, headers: http::HeaderMap| async move {
            kept.lock().expect("headers").push(headers);
            let status = uri
                .path()
                .strip_prefix("/status/")
                .and_then(|code| code.parse().ok())
                .unwrap_or(200);
            (
                http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK),
                "ok",
            )
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((port, seen))
}

/// A listener on 127.0.0.1:`port` routing everything to `cluster` (spans
/// named `operation`), with the tracing the control plane adds when the
/// mesh config samples `sampling` percent.
fn traced_listener(port: u16, direction: &str, cluster: &str, sampling: f64) -> Value {
    use bowline_controlplane::model::{Mesh, TracingSettings};
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    let manager = http_manager(json!([{"name": "all", "domains": ["*"], "routes": [{
        "match": {"prefix": "/"}, "route": {"cluster": cluster},
        "decorator": {"operation": OPERATION}}]}]));
    let listener = json!({"name": format!("l_{port}"), "traffic_direction": direction,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [manager]}]});
    let listener: Listener = bowline_proxy::envoy::from_json(listener).expect("a listener");
    let mut listeners = [listener];
    let mesh = Mesh {
        tracing: Some(TracingSettings {
            host: COLLECTOR_HOST.into(),
            port: 4317,
            sampling,
        }),
        ..Mesh::default()
    };
    bowline_controlplane::translate::observe(&mut listeners, &mesh);
    bowline_proxy::envoy::to_json(&listeners[0]).expect("JSON")
}

fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The spans of `trace`, CLIENT (kind 3) then SERVER (kind 2).
fn of_trace(spans: &[Received], trace: &str) -> Vec<Received> {
    let mut found: Vec<Received> = spans
        .iter()
        .filter(|s| s.trace_id() == trace)
        .cloned()
        .collect();
    found.sort_by_key(|s| std::cmp::Reverse(s.span.kind));
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_sidecars_is_one_trace_in_the_collector() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let (app_port, seen) = application().await?;
    let (inbound_port, outbound_port, quiet_port) = (free_port()?, free_port()?, free_port()?);
    let collector_cluster = static_cluster(COLLECTOR_CLUSTER, &[collector.address]);

    let _reviews = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [traced_listener(inbound_port, "INBOUND", "inbound|9080||", 100.0)],
            "clusters": [
                static_cluster("inbound|9080||", &[([127, 0, 0, 1], app_port).into()]),
                collector_cluster.clone(),
            ],
        }}),
        &workload_env("reviews-v1", r#"{"app":"reviews","version":"v1"}"#),
    )
    .await?;
    let outbound = format!("outbound|9080||{REVIEWS}");
    let productpage = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [
                traced_listener(outbound_port, "OUTBOUND", &outbound, 100.0),
                // The same route sampling none of the requests that
                // bring no decision.
                traced_listener(quiet_port, "OUTBOUND", "direct", 0.0),
            ],
            "clusters": [
                static_cluster(&outbound, &[([127, 0, 0, 1], inbound_port).into()]),
                static_cluster("direct", &[([127, 0, 0, 1], app_port).into()]),
                collector_cluster,
            ],
        }}),
        &workload_env("productpage-v1", r#"{"app":"productpage","version":"v1"}"#),
    )
    .await?;
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let host = format!("Host: {REVIEWS}:9080");
    let last_seen = || {
        seen.lock()
            .expect("headers")
            .last()
            .cloned()
            .unwrap_or_default()
    };

    // 1. A request without a context starts a trace at productpage.
    ensure!(curl(&["-H", &host, &url(outbound_port, "/reviews/1")])?.0 == 200);
    let app_headers = last_seen();
    let traceparent = header(&app_headers, "traceparent");
    let fields: Vec<&str> = traceparent.split('-').collect();
    ensure!(
        fields.len() == 4 && fields[0] == "00" && fields[3] == "01",
        "the application sees a sampled W3C context: {traceparent:?}"
    );
    let (trace, app_parent) = (fields[1].to_string(), fields[2].to_string());
    let spans = collector.wait_for(2, Duration::from_secs(10)).await;
    let pair = of_trace(&spans, &trace);
    ensure!(pair.len() == 2, "two spans of {trace}: {spans:#?}");
    let (client, server) = (&pair[0], &pair[1]);
    ensure!(client.span.kind == 3 && server.span.kind == 2, "{pair:#?}");
    ensure!(
        client.span.parent_span_id.is_empty(),
        "the first span is the root"
    );
    ensure!(
        server.parent_span_id() == client.span_id(),
        "reviews' span is the child of productpage's"
    );
    ensure!(
        app_parent == server.span_id(),
        "the application's parent is reviews' span"
    );
    ensure!(header(&app_headers, "x-b3-traceid") == trace);
    ensure!(header(&app_headers, "x-b3-spanid") == server.span_id());
    ensure!(header(&app_headers, "x-b3-parentspanid") == client.span_id());
    ensure!(header(&app_headers, "x-b3-sampled") == "1");
    for span in &pair {
        ensure!(
            span.span.name == OPERATION,
            "named by the decorator: {span:?}"
        );
        ensure!(span.attribute("http.method").as_deref() == Some("GET"));
        ensure!(span.attribute("http.status_code").as_deref() == Some("200"));
        ensure!(
            span.attribute("http.url").as_deref()
                == Some(&*format!("http://{REVIEWS}:9080/reviews/1")),
            "{span:?}"
        );
        ensure!(span.attribute("guid:x-request-id") == Some(header(&app_headers, "x-request-id")));
        ensure!(span.attribute("response_flags").as_deref() == Some("-"));
        ensure!(span.span.end_time_unix_nano >= span.span.start_time_unix_nano);
        ensure!(span.span.status.is_none(), "a 200 is no error");
    }
    ensure!(client.attribute("upstream_cluster") == Some(outbound.clone()));
    ensure!(client.attribute("upstream_address") == Some(format!("127.0.0.1:{inbound_port}")));
    ensure!(server.attribute("upstream_cluster").as_deref() == Some("inbound|9080||"));
    ensure!(client.resource_attribute("service.name").as_deref() == Some("productpage.shop"));
    ensure!(server.resource_attribute("service.name").as_deref() == Some("reviews.shop"));
    ensure!(
        server
            .resource_attribute("istio.canonical_revision")
            .as_deref()
            == Some("v1")
    );

    // 2. A caller's B3 context is continued.
    let before = collector.spans().len();
    ensure!(
        curl(&[
            "-H",
            &host,
            "-H",
            "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
            "-H",
            "x-b3-spanid: e457b5a2e4d86bd1",
            "-H",
            "x-b3-sampled: 1",
            &url(outbound_port, "/status/503"),
        ])?
        .0 == 503
    );
    let spans = collector
        .wait_for(before + 2, Duration::from_secs(10))
        .await;
    let pair = of_trace(&spans, "80f198ee56343ba864fe8b2a57d3eff7");
    ensure!(pair.len() == 2, "the caller's trace: {spans:#?}");
    ensure!(
        pair[0].parent_span_id() == "e457b5a2e4d86bd1",
        "{:?}",
        pair[0]
    );
    for span in &pair {
        ensure!(span.attribute("http.status_code").as_deref() == Some("503"));
        ensure!(span.attribute("error").as_deref() == Some("true"));
        ensure!(
            span.span.status.as_ref().is_some_and(|s| s.code == 2),
            "ERROR"
        );
    }
    ensure!(
        header(&last_seen(), "traceparent").starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-")
    );

    // 3. "Not sampled" is respected all the way, and still passed on.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    ensure!(
        curl(&[
            "-H",
            &host,
            "-H",
            &format!("traceparent: {unsampled}"),
            &url(outbound_port, "/")
        ])?
        .0 == 200
    );
    let app_headers = last_seen();
    let passed = header(&app_headers, "traceparent");
    ensure!(
        passed.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && passed.ends_with("-00"),
        "{passed}"
    );
    ensure!(header(&app_headers, "x-b3-sampled") == "0");

    // 4. Sampling 0 %: nothing traced unless the client asks with
    // x-client-trace-id (client_sampling 100 %).
    for _ in 0..20 {
        ensure!(curl(&["-H", &host, &url(quiet_port, "/")])?.0 == 200);
    }
    ensure!(header(&last_seen(), "traceparent").ends_with("-00"));
    ensure!(
        curl(&[
            "-H",
            &host,
            "-H",
            "x-client-trace-id: debug-1",
            &url(quiet_port, "/forced")
        ])?
        .0 == 200
    );
    let forced = header(&last_seen(), "traceparent");
    ensure!(forced.ends_with("-01"), "{forced}");
    let forced_trace = forced.split('-').nth(1).context("a trace id")?.to_string();
    let spans = collector
        .wait_for(before + 3, Duration::from_secs(10))
        .await;
    // Let a late batch arrive before counting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = if collector.spans().len() > spans.len() {
        collector.spans()
    } else {
        spans
    };
    ensure!(
        spans.len() == before + 3,
        "only the B3 request's two spans and the forced one: {} new",
        spans.len() - before
    );
    ensure!(
        of_trace(&spans, &forced_trace).len() == 1,
        "the forced request's span"
    );
    ensure!(
        !spans
            .iter()
            .any(|s| s.trace_id() == "0af7651916cd43dd8448eb211c80319c")
    );
    // The collector took every span: none counted as dropped.
    let prometheus = productpage.ports.prometheus;
    let (_, metrics) = curl(&[&format!("http://127.0.0.1:{prometheus}/stats/prometheus")])?;
    ensure!(
        metrics.contains("bowline_proxy_spans_dropped_total 0"),
        "{metrics}"
    );
    Ok(())
}
