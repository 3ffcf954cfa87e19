//! bowline-proxy from a bootstrap file, observed from outside with curl:
//! readiness, a 90/10 split over 1,000 requests, HTTP/1.1 and h2c on one
//! port, rewrites, a redirect and a direct response, Envoy's answers when
//! there is no route (404), no live endpoint (503) or no answer in time
//! (504), TCP proxying, client connections kept alive until their idle
//! timeout (HTTP/1.1 and HTTP/2), upstream connections kept alive, and a
//! drain.
//! Upstreams are axum servers on loopback.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::ensure;
use bowline_tests::cluster::free_port;
use bowline_tests::proxy::{
    KeptConnection, Running, curl, echo, in_front_of, static_cluster as cluster, upstream,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_routes_splits_and_answers_as_envoy_does() -> anyhow::Result<()> {
    let (v1, v2, echo) = (upstream("v1").await?, upstream("v2").await?, echo().await?);
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let (http_port, tcp_port) = (free_port()?, free_port()?);
    let manager = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "http",
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"name": "local", "virtual_hosts": [
            {"name": "shop", "domains": ["shop.example"], "routes": [
                {"match": {"prefix": "/split"}, "route": {"weighted_clusters": {"clusters": [
                    {"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]}}},
                {"match": {"prefix": "/old/"}, "route": {"cluster": "v1", "prefix_rewrite": "/new/", "host_rewrite_literal": "backend.internal"}},
                {"match": {"prefix": "/slow"}, "route": {"cluster": "v1", "timeout": "0.3s"}},
                {"match": {"prefix": "/dead"}, "route": {"cluster": "dead"}},
                {"match": {"path": "/moved"}, "redirect": {"host_redirect": "new.example", "path_redirect": "/here"}},
                {"match": {"path": "/teapot"}, "direct_response": {"status": 418, "body": {"inline_string": "short and stout"}}},
                {"match": {"prefix": "/", "headers": [{"name": "x-version", "string_match": {"exact": "v2"}}]}, "route": {"cluster": "v2"}},
                {"match": {"prefix": "/"}, "route": {"cluster": "v1"}},
            ]},
        ]},
    });
    let bootstrap = json!({"static_resources": {
        "listeners": [
            {"name": "http", "address": {"socket_address": {"address": "127.0.0.1", "port_value": http_port}},
             "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]},
            {"name": "tcp", "address": {"socket_address": {"address": "127.0.0.1", "port_value": tcp_port}},
             "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                 "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                 "stat_prefix": "tcp", "cluster": "echo"}}]}]},
        ],
        "clusters": [cluster("v1", &[v1]), cluster("v2", &[v2]), cluster("dead", &[dead]), cluster("echo", &[echo])],
    }});
    let proxy = Running::bootstrap(bootstrap, &[]).await?;
    let url = |path: &str| format!("http://127.0.0.1:{http_port}{path}");
    let host = "Host: shop.example";

    // 90/10 over 1,000 requests, on kept-alive connections (one curl
    // process per 100 requests).
    let mut v1_count = 0;
    for _ in 0..10 {
        let urls: Vec<String> = (0..100).map(|_| url("/split")).collect();
        let output = Command::new("curl")
            .args(["-s", "-m", "30", "-H", host, "-w", "\n"])
            .args(&urls)
            .output()?;
        let text = String::from_utf8(output.stdout)?;
        ensure!(text.lines().count() == 100, "100 answers: {text}");
        v1_count += text.lines().filter(|l| l.starts_with("v1 ")).count();
    }
    // Binomial(1000, 0.9): the standard deviation is 9.5.
    ensure!(
        (850..=950).contains(&v1_count),
        "{v1_count} of 1000 went to v1"
    );

    let (status, body) = curl(&["-H", host, "-H", "x-version: v2", &url("/any")])?;
    ensure!(
        status == 200 && body == "v2 /any shop.example",
        "{status} {body}"
    );
    let (status, body) = curl(&["--http2-prior-knowledge", "-H", host, &url("/h2")])?;
    ensure!(
        status == 200 && body == "v1 /h2 shop.example",
        "h2c: {status} {body}"
    );
    let (status, body) = curl(&["-H", host, &url("/old/cart")])?;
    ensure!(
        status == 200 && body == "v1 /new/cart backend.internal",
        "{status} {body}"
    );
    let (status, _) = curl(&["-H", host, "-D", "-", &url("/moved?x=1")])?;
    ensure!(status == 301);
    let output = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{redirect_url}",
            "-H",
            host,
            &url("/moved?x=1"),
        ])
        .output()?;
    ensure!(String::from_utf8(output.stdout)? == "http://new.example/here?x=1");
    let (status, body) = curl(&["-H", host, &url("/teapot")])?;
    ensure!(
        status == 418 && body == "short and stout",
        "{status} {body}"
    );
    let (status, _) = curl(&["-H", "Host: elsewhere.example", &url("/")])?;
    ensure!(status == 404, "no virtual host: {status}");
    let (status, body) = curl(&["-H", host, &url("/dead")])?;
    ensure!(status == 503 && body.contains("connect"), "{status} {body}");
    let started = std::time::Instant::now();
    let (status, _) = curl(&["-H", host, &url("/slow")])?;
    ensure!(status == 504, "route timeout: {status}");
    ensure!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at the timeout"
    );

    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await?;
    tcp.write_all(b"opaque bytes").await?;
    let mut echoed = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut echoed)).await??;
    ensure!(&echoed == b"opaque bytes");
    // An open connection would hold the drain for its full period.
    drop(tcp);

    proxy.stop().await
}

#[test]
fn a_bootstrap_with_a_bad_route_is_refused_with_the_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(
        &path,
        r#"
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: 1}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            name: local
            virtual_hosts:
            - {name: all, domains: ["*"], routes: [{match: {safe_regex: {regex: "(["}}, route: {cluster: a}}]}
"#,
    )?;
    let error = bowline_proxy::model::Snapshot::from_bootstrap_file(&path)
        .unwrap_err()
        .to_string();
    ensure!(
        error.starts_with("RouteConfiguration local: virtual_hosts[0].routes[0].match.safe_regex:"),
        "{error}"
    );
    Ok(())
}

#[test]
fn the_envoy_descriptors_are_what_make_descriptors_writes() -> anyhow::Result<()> {
    let writer = bowline_tests::binaries::tool("../proxy/descriptors/build.sh")?;
    let output = Command::new(writer).output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let committed = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/src/envoy.binpb"),
    )?;
    ensure!(
        output.stdout == committed,
        "proxy/src/envoy.binpb is stale: run `make descriptors` and commit the result"
    );
    Ok(())
}

/// Stopping (SIGTERM) drains as Envoy's graceful drain does: through the
/// drain period the listener still accepts (a Service may still send new
/// connections) and every response closes its connection; a request in
/// flight finishes; then the listener closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_drains_requests_in_flight() -> anyhow::Result<()> {
    let v1 = upstream("v1").await?;
    let http_port = free_port()?;
    let bootstrap = in_front_of(http_port, cluster("v1", &[v1]));
    let proxy =
        Running::bootstrap(bootstrap, &[("TERMINATION_DRAIN_DURATION_SECONDS", "3")]).await?;

    let slow = format!("http://127.0.0.1:{http_port}/slow");
    let in_flight = tokio::task::spawn_blocking(move || curl(&[&slow]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped_at = std::time::Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = std::process::Command::new("curl")
        .args([
            "-s",
            "-i",
            "-m",
            "5",
            &format!("http://127.0.0.1:{http_port}/"),
        ])
        .output()?;
    let during = String::from_utf8_lossy(&during.stdout).to_ascii_lowercase();
    ensure!(
        during.starts_with("http/1.1 200") && during.contains("connection: close"),
        "while draining, a new connection is served and closed after its response: {during}"
    );
    let (status, body) = in_flight.await??;
    ensure!(
        status == 200 && body == "slow",
        "the request in flight finished: {status} {body}"
    );
    stopping.await??;
    ensure!(
        stopped_at.elapsed() >= Duration::from_secs(3),
        "the listener accepted through the drain period"
    );
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", http_port)).is_err(),
        "the listener is closed once the drain is over"
    );
    Ok(())
}

/// An HTTP/1.1 upstream answering `ok` to each GET, counting the
/// connections it accepts and closing one after 300 ms without a request,
/// as a server's keep-alive timeout does.
async fn counting_upstream() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let read =
                        tokio::time::timeout(Duration::from_millis(300), stream.read(&mut chunk));
                    let Ok(Ok(n @ 1..)) = read.await else {
                        return;
                    };
                    pending.extend_from_slice(&chunk[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok((address, accepted))
}

/// A client's kept-alive connection stays open between requests for the
/// connection manager's idle timeout (Envoy's, 1 h, when unset), not
/// less: here 2 s — a second's pause is served on the same connection,
/// two seconds without a request close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_client_connection_lasts_its_idle_timeout() -> anyhow::Result<()> {
    let app = upstream("app").await?;
    let port = free_port()?;
    let mut bootstrap = in_front_of(port, cluster("app", &[app]));
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["common_http_protocol_options"] = json!({"idle_timeout": "2s"});
    let proxy = Running::bootstrap(bootstrap, &[]).await?;
    let mut kept = KeptConnection::open(([127, 0, 0, 1], port).into()).await?;
    ensure!(kept.first_word("app", "/").await? == "app");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        kept.first_word("app", "/").await? == "app",
        "served after a second's pause"
    );
    let ended = kept.ended_within(Duration::from_secs(5)).await;
    ensure!(
        ended == Some(Ok(())),
        "closed cleanly after 2 s without a request: {ended:?}"
    );
    proxy.stop().await
}

/// An HTTP/2 client connection is told GOAWAY once no stream has been
/// open on it for the idle timeout (here 2 s), as Envoy's: a stream open
/// longer than that keeps it, the idle time counts from the last stream's
/// end, and a connection that never carries a request goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_connection_is_closed_once_idle() -> anyhow::Result<()> {
    let app = upstream("app").await?;
    let port = free_port()?;
    let mut bootstrap = in_front_of(port, cluster("app", &[app]));
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["common_http_protocol_options"] = json!({"idle_timeout": "2s"});
    let proxy = Running::bootstrap(bootstrap, &[]).await?;
    let address = ([127, 0, 0, 1], port).into();
    let mut kept = KeptConnection::open_http2(address).await?;
    ensure!(
        kept.first_word("app", "/sleep/3000").await? == "app",
        "a stream open for 3 s is answered"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        kept.first_word("app", "/").await? == "app",
        "served a second after the long stream ended"
    );
    let ended = kept.ended_within(Duration::from_secs(5)).await;
    ensure!(
        ended == Some(Ok(())),
        "closed cleanly after 2 s without a stream: {ended:?}"
    );
    let mut silent = KeptConnection::open_http2(address).await?;
    let ended = silent.ended_within(Duration::from_secs(5)).await;
    ensure!(
        ended == Some(Ok(())),
        "a connection that never asked is closed too: {ended:?}"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_until_the_server_closes_them() -> anyhow::Result<()> {
    let (upstream, accepted) = counting_upstream().await?;
    let http_port = free_port()?;
    let bootstrap = in_front_of(http_port, cluster("counted", &[upstream]));
    let proxy = Running::bootstrap(bootstrap, &[]).await?;
    let url = format!("http://127.0.0.1:{http_port}/");
    let calls = |count: usize| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for _ in 0..count {
                let (status, body) = curl(&[&url])?;
                ensure!(status == 200 && body == "ok", "answered {status} {body}");
            }
            Ok(())
        })
    };

    // Each curl is a new client connection; upstream, one connection
    // serves them all in turn.
    calls(20).await??;
    ensure!(
        accepted.load(Ordering::SeqCst) == 1,
        "20 requests in turn reused one upstream connection, not {}",
        accepted.load(Ordering::SeqCst)
    );

    // The server closes it when idle: the next requests go on a new one,
    // none failing for the closed one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    calls(10).await??;
    ensure!(
        accepted.load(Ordering::SeqCst) == 2,
        "after the server closed the idle connection, one new connection, not {}",
        accepted.load(Ordering::SeqCst) - 1
    );
    proxy.stop().await
}
