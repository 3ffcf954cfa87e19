//! bowline-proxy's resilience, observed from outside with curl against
//! upstreams on loopback, each configured as Envoy reads it: a retry
//! turns a flaky upstream's 503 into 200 and a per-try timeout moves a
//! slow attempt to another endpoint; an injected delay is measured and an
//! injected abort answers its share; the circuit breaker answers 503
//! (`x-envoy-overloaded`) beyond one connection and one pending request;
//! a retry budget, not `max_retries`, decides how many retries go when
//! a cluster has one; outlier detection stops traffic to a failing
//! endpoint, which returns after its ejection time; a mirror gets a copy
//! with `-shadow` in its Host; a hash policy keeps each key on one
//! endpoint of a RING_HASH or MAGLEV cluster, for HTTP (a header, a cookie)
//! and TCP (the client's address), also as a DestinationRule's
//! `consistentHash` translated by the control plane.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bowline_tests::cluster::free_port;
use bowline_tests::proxy::{
    Running, client_sidecar_bootstrap, curl, failing, first_words, http_bootstrap, in_front_of,
    plain_endpoint, recorder, static_cluster, upstream,
};
use serde_json::json;

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_per_try_timeouts_hide_failures() -> anyhow::Result<()> {
    let (flaky, other) = (upstream("flaky").await?, upstream("other").await?);
    let port = free_port()?;
    let proxy = Running::bootstrap(
        http_bootstrap(
            port,
            json!([
                {"match": {"prefix": "/retried"}, "route": {"cluster": "flaky", "prefix_rewrite": "/flaky",
                    "retry_policy": {"retry_on": "5xx", "num_retries": 2}}},
                {"match": {"prefix": "/flaky"}, "route": {"cluster": "flaky"}},
                {"match": {"prefix": "/sleep"}, "route": {"cluster": "both",
                    "retry_policy": {"retry_on": "gateway-error", "num_retries": 3, "per_try_timeout": "0.2s",
                                     "host_selection_retry_max_attempts": 5,
                                     "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}},
            ]),
            vec![
                static_cluster("flaky", &[flaky]),
                static_cluster("both", &[flaky, other]),
            ],
        ),
        &[],
    )
    .await?;

    // Without retries, half the requests fail; with them, none.
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..50 {
        match curl(&[&url(port, "/flaky")])?.0 {
            200 => ok += 1,
            _ => failed += 1,
        }
    }
    ensure!(
        ok == 25 && failed == 25,
        "in turns: {ok} ok, {failed} failed"
    );
    for _ in 0..50 {
        let (status, body) = curl(&[&url(port, "/retried")])?;
        ensure!(
            status == 200 && body == "flaky ok",
            "retried: {status} {body}"
        );
    }

    // Both endpoints take a second on `/sleep/1000`: each of the four
    // attempts times out at 0.2 s, then 504.
    let started = Instant::now();
    let (status, _) = curl(&[&url(port, "/sleep/1000")])?;
    let took = started.elapsed();
    ensure!(status == 504, "every try timed out: {status}");
    ensure!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2000),
        "four tries of 0.2 s and backoff: {took:?}"
    );
    // A fast answer within the per-try timeout is taken at once.
    let (status, body) = curl(&[&url(port, "/sleep/10")])?;
    ensure!(
        status == 200 && body.ends_with("slept 10"),
        "{status} {body}"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_delay_and_abort_their_share() -> anyhow::Result<()> {
    let backend = upstream("backend").await?;
    let port = free_port()?;
    let fault = |config: serde_json::Value| {
        let mut config = config;
        config["@type"] =
            json!("type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault");
        json!({"envoy.filters.http.fault": config})
    };
    let proxy = Running::bootstrap(
        http_bootstrap(
            port,
            json!([
                {"match": {"prefix": "/delayed"}, "route": {"cluster": "backend"},
                 "typed_per_filter_config": fault(json!({"delay": {"fixed_delay": "0.5s",
                     "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}))},
                {"match": {"prefix": "/aborted"}, "route": {"cluster": "backend"},
                 "typed_per_filter_config": fault(json!({"abort": {"http_status": 418,
                     "percentage": {"numerator": 250000, "denominator": "MILLION"}}}))},
            ]),
            vec![static_cluster("backend", &[backend])],
        ),
        &[],
    )
    .await?;

    let started = Instant::now();
    let (status, _) = curl(&[&url(port, "/delayed")])?;
    let took = started.elapsed();
    println!("a 0.5 s injected delay took {took:?}");
    ensure!(status == 200, "{status}");
    ensure!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "delayed by 0.5 s: {took:?}"
    );

    let words = first_words(&url(port, "/aborted"), &[], 1000).await?;
    let aborted = words.get("fault").copied().unwrap_or(0);
    println!("25 % aborts over 1,000 requests: {words:?}");
    // Binomial(1000, 0.25): the standard deviation is 13.7.
    ensure!((180..=320).contains(&aborted), "{words:?}");
    ensure!(
        aborted + words.get("backend").copied().unwrap_or(0) == 1000,
        "{words:?}"
    );
    // 100 requests: all 25 % misses have a chance of 3e-13.
    let mut command = std::process::Command::new("curl");
    command.args(["-s", "-w", "%{http_code}\n"]);
    for _ in 0..100 {
        command.args(["-o", "/dev/null", &url(port, "/aborted")]);
    }
    let codes = String::from_utf8(command.output()?.stdout)?;
    ensure!(
        codes.lines().any(|code| code == "418")
            && codes.lines().all(|code| code == "418" || code == "200"),
        "the abort's status: {codes}"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_overflows_beyond_its_limits() -> anyhow::Result<()> {
    let backend = upstream("backend").await?;
    let port = free_port()?;
    let mut cluster = static_cluster("backend", &[backend]);
    cluster["circuit_breakers"] =
        json!({"thresholds": [{"max_connections": 1, "max_pending_requests": 1}]});
    let proxy = Running::bootstrap(in_front_of(port, cluster), &[]).await?;

    // Six at once, each holding its connection for 0.5 s: one is served,
    // one waits for the connection, four overflow.
    let calls: Vec<_> = (0..6)
        .map(|_| {
            tokio::process::Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %header{x-envoy-overloaded}",
                ])
                .arg(url(port, "/sleep/500"))
                .output()
        })
        .collect();
    let mut answers = Vec::new();
    for call in futures::future::join_all(calls).await {
        answers.push(String::from_utf8(call?.stdout)?);
    }
    answers.sort();
    println!("six concurrent requests, one connection and one pending allowed: {answers:?}");
    ensure!(
        answers
            == [
                "200 ", "200 ", "503 true", "503 true", "503 true", "503 true"
            ],
        "{answers:?}"
    );
    proxy.stop().await
}

/// A retry budget decides retries instead of `max_retries`: one of none
/// (0 %, at least 0) stops every retry, Envoy's default one (20 %, at
/// least 3) lets a lone request retry although `max_retries` is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_decides_how_many_retries_go() -> anyhow::Result<()> {
    let ((none, none_calls), (some, some_calls)) = (failing("none").await?, failing("some").await?);
    let port = free_port()?;
    let retried = |prefix: &str, cluster: &str| {
        json!({"match": {"prefix": prefix}, "route": {"cluster": cluster,
            "retry_policy": {"retry_on": "5xx", "num_retries": 3,
                             "retry_back_off": {"base_interval": "0.001s"}}}})
    };
    let mut no_budget = static_cluster("none", &[none]);
    no_budget["circuit_breakers"] = json!({"thresholds": [{
        "retry_budget": {"budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}}]});
    let mut default_budget = static_cluster("some", &[some]);
    default_budget["circuit_breakers"] =
        json!({"thresholds": [{"max_retries": 0, "retry_budget": {}}]});
    let proxy = Running::bootstrap(
        http_bootstrap(
            port,
            json!([retried("/none", "none"), retried("/some", "some")]),
            vec![no_budget, default_budget],
        ),
        &[],
    )
    .await?;
    for _ in 0..10 {
        ensure!(curl(&[&url(port, "/none")])?.0 == 503);
        ensure!(curl(&[&url(port, "/some")])?.0 == 503);
    }
    let (none, some) = (
        none_calls.load(std::sync::atomic::Ordering::Relaxed),
        some_calls.load(std::sync::atomic::Ordering::Relaxed),
    );
    ensure!(
        none == 10,
        "no budget: each request tried once, got {none} calls"
    );
    ensure!(
        some == 40,
        "the default budget: each request tried and retried three times, got {some} calls"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint_until_its_time_is_up() -> anyhow::Result<()> {
    let good = upstream("good").await?;
    let (bad, bad_calls) = failing("bad").await?;
    let port = free_port()?;
    let mut cluster = static_cluster("pool", &[good, bad]);
    cluster["outlier_detection"] = json!({
        "consecutive_5xx": 3, "interval": "0.5s", "base_ejection_time": "2s", "max_ejection_percent": 100,
    });
    let proxy = Running::bootstrap(in_front_of(port, cluster), &[]).await?;

    // Round robin: the bad endpoint gets every other request until its
    // third failure in a row ejects it.
    let words = first_words(&url(port, "/"), &[], 40).await?;
    println!("40 requests, one endpoint failing: {words:?}");
    ensure!(
        words.get("bad") == Some(&3),
        "three failures, then ejected: {words:?}"
    );
    ensure!(words.get("good") == Some(&37), "{words:?}");
    let ejected_at = Instant::now();
    let words = first_words(&url(port, "/"), &[], 20).await?;
    ensure!(words.get("good") == Some(&20), "still ejected: {words:?}");

    // After the base ejection time it takes traffic again.
    tokio::time::sleep(
        Duration::from_secs(2).saturating_sub(ejected_at.elapsed()) + Duration::from_millis(200),
    )
    .await;
    let before = bad_calls.load(std::sync::atomic::Ordering::Relaxed);
    let words = first_words(&url(port, "/"), &[], 10).await?;
    ensure!(
        bad_calls.load(std::sync::atomic::Ordering::Relaxed) > before,
        "back after the ejection time: {words:?}"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_a_shadow_copy() -> anyhow::Result<()> {
    let backend = upstream("backend").await?;
    let (mirror, seen) = recorder().await?;
    let port = free_port()?;
    let proxy = Running::bootstrap(
        http_bootstrap(
            port,
            json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend",
                "request_mirror_policies": [{"cluster": "mirror"}]}}]),
            vec![
                static_cluster("backend", &[backend]),
                static_cluster("mirror", &[mirror]),
            ],
        ),
        &[],
    )
    .await?;
    let (status, body) = curl(&["-H", "Host: shop.example", &url(port, "/cart")])?;
    ensure!(
        status == 200 && body == "backend /cart shop.example",
        "{status} {body}"
    );
    for _ in 0..50 {
        if !seen.lock().expect("hosts").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hosts = seen.lock().expect("hosts").clone();
    ensure!(hosts == ["shop.example-shadow"], "{hosts:?}");
    proxy.stop().await
}

/// Consistent hashing, RING_HASH and MAGLEV: every request of one user
/// (one `x-user` header) goes to one endpoint, and the users spread over
/// all three; a route hashing a cookie with a TTL sets one on an answer
/// to a request without it, and the requests that send it back stay on
/// one endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_policy_keeps_each_key_on_one_endpoint() -> anyhow::Result<()> {
    let endpoints = [
        upstream("a").await?,
        upstream("b").await?,
        upstream("c").await?,
    ];
    for (policy, config) in [
        (
            "RING_HASH",
            json!({"ring_hash_lb_config": {"minimum_ring_size": 2048}}),
        ),
        ("MAGLEV", json!({"maglev_lb_config": {"table_size": 65537}})),
    ] {
        let port = free_port()?;
        let mut cluster = static_cluster("pool", &endpoints);
        cluster["lb_policy"] = json!(policy);
        cluster
            .as_object_mut()
            .unwrap()
            .extend(config.as_object().unwrap().clone());
        let routes = json!([
            {"match": {"prefix": "/cookie"}, "route": {"cluster": "pool", "hash_policy": [
                {"cookie": {"name": "affinity", "ttl": "3600s", "path": "/"}}]}},
            {"match": {"prefix": "/"}, "route": {"cluster": "pool", "hash_policy": [
                {"header": {"header_name": "x-user"}}]}},
        ]);
        let proxy = Running::bootstrap(http_bootstrap(port, routes, vec![cluster]), &[]).await?;

        let seen = users_endpoints(&url(port, "/"), &[], 30)
            .await
            .with_context(|| policy)?;
        ensure!(
            seen.len() == 3,
            "{policy}: 30 users over all three endpoints: {seen:?}"
        );

        let set = set_cookie(&url(port, "/cookie"), &[]).with_context(|| policy)?;
        ensure!(set.starts_with("affinity=\""), "{set}");
        let sent_back = format!("cookie: {}", set.split(';').next().unwrap_or_default());
        one_endpoint(&url(port, "/cookie"), &[&sent_back])
            .await
            .with_context(|| format!("{policy}: the cookie's requests"))?;
        proxy.stop().await?;
    }
    Ok(())
}

/// A DestinationRule's `consistentHash`, translated by the control plane
/// for a sidecar and served by the proxy: each user's requests to the
/// service stay on one of its endpoints, and users spread over them; a
/// hashed cookie the proxy makes up carries the rule's attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_consistent_hash_keeps_users_on_their_endpoint() -> anyhow::Result<()> {
    let host = "Host: cart.shop.svc.cluster.local:8080";
    let (proxy, port) = cart_hashing(json!({"httpHeaderName": "x-user"})).await?;
    let seen = users_endpoints(&url(port, "/"), &[host], 20).await?;
    ensure!(
        seen.len() == 3,
        "20 users over the three endpoints: {seen:?}"
    );
    proxy.stop().await?;

    let (proxy, port) = cart_hashing(json!({"httpCookie": {"name": "cart", "path": "/",
        "ttl": "0s", "attributes": [{"name": "SameSite", "value": "Strict"}, {"name": "Secure"}]}}))
    .await?;
    let set = set_cookie(&url(port, "/"), &[host])?;
    ensure!(
        set.starts_with("cart=\"")
            && set.ends_with("\"; Path=/; SameSite=Strict; Secure; HttpOnly"),
        "a session cookie with the rule's attributes: {set}"
    );
    let sent_back = format!("cookie: {}", set.split(';').next().unwrap_or_default());
    one_endpoint(&url(port, "/"), &[host, &sent_back])
        .await
        .context("the cookie's requests")?;
    proxy.stop().await
}

/// The endpoint 10 requests to `url` with `headers` all went to (each
/// upstream answers its name first).
async fn one_endpoint(url: &str, headers: &[&str]) -> anyhow::Result<String> {
    let words = first_words(url, headers, 10).await?;
    match words.into_keys().collect::<Vec<_>>().as_slice() {
        [one] if !one.is_empty() => Ok(one.clone()),
        several => anyhow::bail!("10 requests, not all to one endpoint: {several:?}"),
    }
}

/// The endpoints `users` users (an `x-user` header each, beside
/// `headers`) went to, each user's requests all to one.
async fn users_endpoints(
    url: &str,
    headers: &[&str],
    users: usize,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..users {
        let header = format!("x-user: user-{user}");
        let all: Vec<&str> = headers.iter().copied().chain([header.as_str()]).collect();
        seen.insert(one_endpoint(url, &all).await.context(header)?);
    }
    Ok(seen)
}

/// The `Set-Cookie` on the answer to a request to `url` with `headers`.
fn set_cookie(url: &str, headers: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["-i"];
    for header in headers {
        args.extend(["-H", header]);
    }
    args.push(url);
    let (status, answer) = curl(&args)?;
    answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .map(str::to_string)
        .with_context(|| format!("a cookie set on the answer: {status} {answer}"))
}

/// A client sidecar, configured by the control plane's translation, in
/// front of `cart` (three endpoints) whose DestinationRule hashes as
/// `consistent_hash` says; and the port it listens on for `cart`.
async fn cart_hashing(consistent_hash: serde_json::Value) -> anyhow::Result<(Running, u16)> {
    use bowline_controlplane::model::{Config, Protocol, Service, ServicePort, Snapshot};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    let mut service = Service::kubernetes(
        "cart",
        "shop",
        vec![ServicePort {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Http,
        }],
    );
    service.address = Some("10.96.0.80".into());
    let mut endpoints = Vec::new();
    for name in ["a", "b", "c"] {
        endpoints.push(plain_endpoint(upstream(name).await?, 8080));
    }
    let snapshot = Snapshot {
        endpoints: Arc::new(BTreeMap::from([(service.hostname.clone(), endpoints)])),
        services: Arc::new(BTreeMap::from([(service.hostname.clone(), service)])),
        destination_rules: Arc::new(vec![Config::new(
            "cart",
            "shop",
            serde_json::from_value(json!({"host": "cart", "trafficPolicy": {
                "loadBalancer": {"consistentHash": consistent_hash}}}))?,
        )]),
        ..Snapshot::default()
    };
    let port = free_port()?;
    let proxy = Running::bootstrap(
        client_sidecar_bootstrap(&snapshot, &[("0.0.0.0_8080", port)])?,
        &[],
    )
    .await?;
    Ok((proxy, port))
}

/// A TCP service whose DestinationRule hashes by source IP: the control
/// plane's tcp_proxy carries the hash policy, and the proxy sends every
/// connection from one client address to one endpoint, clients spread
/// over all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_keep_to_their_clients_endpoint_by_source_ip() -> anyhow::Result<()> {
    use bowline_controlplane::model::{Config, Protocol, Service, ServicePort, Snapshot};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut service = Service::kubernetes(
        "db",
        "shop",
        vec![ServicePort {
            name: "tcp".into(),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
    );
    service.address = Some("10.96.0.81".into());
    // Each endpoint says its name to whoever connects.
    let mut endpoints = Vec::new();
    for name in ["a", "b", "c"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(name.as_bytes()).await;
            }
        });
        endpoints.push(plain_endpoint(address, 5432));
    }
    let snapshot = Snapshot {
        endpoints: Arc::new(BTreeMap::from([(service.hostname.clone(), endpoints)])),
        services: Arc::new(BTreeMap::from([(service.hostname.clone(), service)])),
        destination_rules: Arc::new(vec![Config::new(
            "db",
            "shop",
            serde_json::from_value(json!({"host": "db", "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"useSourceIp": true}}}}))?,
        )]),
        ..Snapshot::default()
    };
    let port = free_port()?;
    let proxy = Running::bootstrap(
        client_sidecar_bootstrap(&snapshot, &[("10.96.0.81_5432", port)])?,
        &[],
    )
    .await?;
    // Who answers a connection from 127.0.0.<client>.
    let answer = |client: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(([127, 0, 0, client], 0).into())?;
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await?;
        let mut name = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_string(&mut name),
        )
        .await??;
        anyhow::Ok(name)
    };
    let mut seen = std::collections::BTreeSet::new();
    for client in 2..22u8 {
        let first = answer(client).await?;
        for _ in 0..4 {
            let again = answer(client).await?;
            ensure!(again == first, "127.0.0.{client}: {first}, then {again}");
        }
        seen.insert(first);
    }
    ensure!(
        seen.len() == 3,
        "20 clients over the three endpoints: {seen:?}"
    );
    proxy.stop().await
}
