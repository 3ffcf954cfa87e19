//! Benchmarks bowline-proxy side by side with Envoy, nginx and HAProxy,
//! each an equivalent L7 proxy (one worker, keep-alive to the upstream) in
//! front of the same upstream, and with the upstream alone (the limit).
//!
//! Everything is on loopback. The upstream (nginx answering a short body)
//! and the load generators run on core 0 — run this binary under
//! `taskset -c 0`, as `make bench-proxy` does — and each proxy on core 1.
//! Per target: saturation throughput with wrk (HTTP/1.1) and h2load
//! (HTTP/2, prior knowledge); p50/p99 latency and CPU at a fixed rate (h2load, evenly
//! spaced on a kept-alive connection); resident memory idle and under load. Every load
//! is bounded in time. The targets are measured in turn, `--rounds` times
//! (each proxy started afresh every round), so that a slow spell of the
//! machine falls on all of them; prints the figures' medians and the ratios
//! of bowline-proxy to the upstream alone, to Envoy, to nginx and to
//! HAProxy (the median of the rounds' ratios, with their range).
//!
//! `--suite mtls` measures what mutual TLS costs instead: two
//! bowline-proxy sidecars in a row (the client's, then the server's) in
//! front of the upstream, once speaking plaintext to each other and once
//! mutual TLS with workload certificates, in the same run: throughput,
//! latency, CPU and memory of both sidecars, and new connections per
//! second between the sidecars — with TLS sessions resumed (the default)
//! and with resumption off (`max_session_keys: 0`, full handshakes).
//!
//! `--suite train` runs the loads of the other two suites on bowline-proxy
//! alone: what an instrumented build is run with to record the profile its
//! release build is optimised by (`make proxy-pgo`). The figures it prints
//! are the instrumented build's, not to be compared.
//!
//! `--suite instructions` counts the instructions bowline-proxy and nginx
//! (as the same proxy) execute per request, each run under valgrind's
//! callgrind for a fixed number of HTTP/1.1 requests: a figure that does
//! not swing with the machine's load as timings do, for comparing two
//! builds or the two proxies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use bowline_tests::cluster::free_port;
use bowline_tests::process::ProcessGroup;
use bowline_tests::proxy::workload_certificate;
use bowline_tests::usage;
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// The bowline-proxy binary to measure (a release build).
    #[arg(long, env = "BOWLINE_PROXY_BIN")]
    proxy: PathBuf,

    /// Seconds of each saturation run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,

    /// Rounds of the proxies suite: each measures every target once, in
    /// turn; the figures reported are the rounds' medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,

    /// Requests per second of the fixed-rate run.
    #[arg(long, default_value_t = 1000)]
    rate: u64,

    /// Connections of the fixed-rate run. One spaces the requests evenly;
    /// h2load's clients tick together, so with several the requests arrive
    /// in bursts, which each proxy serves with fewer wake-ups and less CPU
    /// than evenly spaced ones.
    #[arg(long, default_value_t = 1)]
    connections: u64,

    /// Requests counted by the instructions suite.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,

    /// The core the proxies run on.
    #[arg(long, default_value_t = 1)]
    proxy_core: usize,

    /// What to measure: bowline-proxy beside the other proxies, two
    /// sidecars with mutual TLS beside the same two in plaintext, the
    /// instructions of a request; or, to train a profile, the loads alone.
    #[arg(long, value_enum, default_value_t = Suite::Proxies)]
    suite: Suite,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    Proxies,
    Mtls,
    Instructions,
    Train,
}

/// One thing measured: its process (and descendants) in a group of its
/// own, stopped when dropped.
struct Target {
    name: &'static str,
    group: ProcessGroup,
}

impl Target {
    fn start(name: &'static str, dir: &Path, command: Command) -> anyhow::Result<Self> {
        let mut group = ProcessGroup::new(&dir.join(format!("{name}.owned")), dir)?;
        group.spawn(name, command)?;
        Ok(Self { name, group })
    }

    fn usage(&self) -> anyhow::Result<usage::Usage> {
        usage::of_tree(self.group.pid(self.name).context("the target's pid")?)
    }

    /// Waits until `port` answers a GET with 200.
    fn wait_serving(&mut self, port: u16) -> anyhow::Result<()> {
        for _ in 0..300 {
            self.group.check_running()?;
            let output = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://127.0.0.1:{port}/"))
                .output()?;
            if output.stdout == b"200" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} did not answer on {port}:\n{}",
            self.name,
            self.group.log_tail(self.name, 20)
        )
    }
}

/// What one target measured.
#[derive(Debug, Default, Clone)]
struct Figures {
    h1_rps: f64,
    h2_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Cores busy at the fixed rate.
    cores: f64,
    /// CPU milliseconds per 1,000 requests at the fixed rate.
    cpu_ms_per_1000: f64,
    rss_idle_mb: f64,
    rss_load_mb: f64,
    errors: u64,
}

fn wrk(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let output = Command::new("wrk")
        .args(["-t1", "-c64", &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    wrk_rate(&output.stdout)
}

/// wrk's Requests/sec; what failed, said on stderr.
fn wrk_rate(stdout: &[u8]) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(stdout);
    for failed in text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
    {
        eprintln!("  wrk: {}", failed.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk's Requests/sec: {text}"))
}

fn h2load(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let output = Command::new("h2load")
        .args(["-t1", "-c16", "-m16", "-D", &seconds.to_string()])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "finished in 10.00s, 41234.50 req/s, 1.23MB/s"
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .with_context(|| format!("h2load's req/s: {text}"))?;
    let failed = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with("failed")))
        .and_then(|p| p.trim_end_matches(" failed").trim().parse::<u64>().ok())
        .unwrap_or(0);
    if failed > 0 {
        eprintln!("  h2load: {failed} requests failed");
    }
    Ok(rps)
}

/// `rate` requests per second for `seconds` over `connections` kept-alive
/// HTTP/1.1 connections, sent by h2load on a fixed schedule: each request's
/// latency in milliseconds (from h2load's per-request log), and how many
/// failed.
fn fixed_rate(
    port: u16,
    rate: u64,
    seconds: u64,
    connections: u64,
    log: &Path,
) -> anyhow::Result<(Vec<f64>, u64)> {
    // h2load appends to its log: a log left by an earlier round would
    // count twice.
    match std::fs::remove_file(log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context(format!("removing {}", log.display()));
        }
        _ => {}
    }
    let output = Command::new("h2load")
        .args(["--h1", "-t1", &format!("-c{connections}")])
        .arg(format!("--rps={}", rate / connections))
        .args(["-D", &seconds.to_string()])
        .arg("--log-file")
        .arg(log)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    if !output.status.success() {
        bail!("h2load: {}", String::from_utf8_lossy(&output.stderr));
    }
    // Columns: start (µs since the epoch), status, µs to the response's end.
    let mut latencies = Vec::new();
    let mut failed = 0;
    for line in std::fs::read_to_string(log)?.lines() {
        let columns: Vec<&str> = line.split('\t').collect();
        match (
            columns.get(1),
            columns.get(2).and_then(|c| c.parse::<f64>().ok()),
        ) {
            (Some(&"200"), Some(micros)) => latencies.push(micros / 1000.0),
            _ => failed += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, failed))
}

/// The `p` quantile of `sorted`, between its two nearest values in
/// proportion (the median of an even count is the mean of the middle two).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() - 1) as f64 * p;
    let (below, above) = (sorted[rank.floor() as usize], sorted[rank.ceil() as usize]);
    below + (above - below) * rank.fract()
}

fn measure(
    args: &Args,
    target: &mut Target,
    h1_port: u16,
    h2_port: u16,
    dir: &Path,
) -> anyhow::Result<Figures> {
    let name = target.name;
    measure_all(
        args,
        name,
        std::slice::from_mut(target),
        h1_port,
        h2_port,
        dir,
    )
}

/// [`measure`] of what `targets` serve together (a chain of proxies):
/// their CPU and memory summed.
fn measure_all(
    args: &Args,
    name: &str,
    targets: &mut [Target],
    h1_port: u16,
    h2_port: u16,
    dir: &Path,
) -> anyhow::Result<Figures> {
    println!("measuring: {name}");
    let usage = |targets: &[Target]| -> anyhow::Result<usage::Usage> {
        targets
            .iter()
            .try_fold(usage::Usage::default(), |sum, t| Ok(sum + t.usage()?))
    };
    for target in targets.iter_mut() {
        target.group.check_running()?;
    }
    targets[0].wait_serving(h1_port)?;
    let rss_idle_mb = usage(targets)?.rss_mb;
    let h1_rps = wrk(h1_port, args.seconds)?;
    let h2_rps = h2load(h2_port, args.seconds)?;
    // Let the saturation runs' connections close before the quiet run.
    std::thread::sleep(Duration::from_secs(1));
    let before = usage(targets)?.cpu;
    let log = dir.join(format!("{name}.latency.tsv"));
    let (latencies, errors) = fixed_rate(h1_port, args.rate, args.seconds, args.connections, &log)?;
    let after = usage(targets)?;
    let cpu = after.cpu.saturating_sub(before);
    let served = latencies.len().max(1) as f64;
    Ok(Figures {
        h1_rps,
        h2_rps,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        cores: cpu.as_secs_f64() / args.seconds as f64,
        cpu_ms_per_1000: cpu.as_secs_f64() * 1000.0 / (served / 1000.0),
        rss_idle_mb,
        rss_load_mb: after.rss_mb,
        errors,
    })
}

/// New connections per second through `port` at saturation: wrk asking
/// each response to close its connection.
fn connections_per_second(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let output = Command::new("wrk")
        .args([
            "-t1",
            "-c16",
            &format!("-d{seconds}s"),
            "-H",
            "Connection: close",
        ])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    wrk_rate(&output.stdout)
}

/// `program` on `core` only (none: where this process runs, core 0).
fn pinned(core: Option<usize>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match core {
        Some(core) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(core.to_string()).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// nginx with one worker, its files in `dir`, serving `servers`.
fn nginx(
    name: &'static str,
    core: Option<usize>,
    dir: &Path,
    servers: &str,
) -> anyhow::Result<Target> {
    let mut command = pinned(core, "/usr/sbin/nginx");
    nginx_arguments(&mut command, name, dir, servers)?;
    command.args(["-g", "daemon off;"]);
    Target::start(name, dir, command)
}

/// The arguments of `command` (an nginx) for its configuration, written
/// to `dir`.
fn nginx_arguments(
    command: &mut Command,
    name: &str,
    dir: &Path,
    servers: &str,
) -> anyhow::Result<()> {
    let own = dir.join(name);
    std::fs::create_dir_all(&own)?;
    let d = own.display();
    let config = own.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "worker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n  \
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{servers}\n}}\n"
        ),
    )?;
    command.arg("-p").arg(&own).arg("-c").arg(&config);
    Ok(())
}

/// nginx's proxy configuration: to the upstream, keep-alive.
fn nginx_proxy(port: u16, h2: u16, upstream: u16) -> String {
    format!(
        "  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n  server {{\n    \
         listen 127.0.0.1:{port} backlog=4096;\n    listen 127.0.0.1:{h2} http2;\n    location / {{\n      \
         proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}"
    )
}

/// The Envoy bootstrap both Envoy and bowline-proxy read: one listener
/// (HTTP/1.1 and h2c) routing everything to the upstream.
fn bootstrap(port: u16, upstream: u16) -> serde_json::Value {
    json!({"static_resources": {
        "listeners": [{"name": "bench", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "bench", "codec_type": "AUTO",
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
            }}]}]}],
        "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}}],
    }})
}

/// bowline-proxy (one worker) on `core` serving the bootstrap `file`,
/// its own endpoints on free ports.
fn bowline(name: &'static str, args: &Args, file: &Path, dir: &Path) -> anyhow::Result<Target> {
    let mut command = pinned(Some(args.proxy_core), &args.proxy);
    bowline_arguments(&mut command, file)?;
    Target::start(name, dir, command)
}

/// The arguments and environment of `command` (a bowline-proxy) for a
/// gateway on one worker from the bootstrap `file`.
fn bowline_arguments(command: &mut Command, file: &Path) -> anyhow::Result<()> {
    command
        .args(["gateway", "--bootstrap"])
        .arg(file)
        .env("BOWLINE_PROXY_CONCURRENCY", "1")
        .env("RUST_LOG", "warn")
        // Stopped without a drain period, so that what it writes on its
        // way out (callgrind's count, a profile) is written at once.
        .env("TERMINATION_DRAIN_DURATION_SECONDS", "0");
    for variable in [
        "BOWLINE_PROXY_STATUS_ADDRESS",
        "BOWLINE_PROXY_STATS_ADDRESS",
        "BOWLINE_PROXY_PROMETHEUS_ADDRESS",
        "BOWLINE_PROXY_ADMIN_ADDRESS",
    ] {
        command.env(variable, format!("127.0.0.1:{}", free_port()?));
    }
    Ok(())
}

/// The instructions suite: bowline-proxy and nginx, each counted by
/// callgrind serving `--requests` HTTP/1.1 requests on 16 connections.
fn instructions_suite(args: &Args, upstream: u16, root: &Path) -> anyhow::Result<()> {
    let file = root.join("bootstrap.json");
    let port = free_port()?;
    std::fs::write(&file, serde_json::to_vec(&bootstrap(port, upstream))?)?;
    let bowline = instructions("bowline", args, root, port, |out| {
        let mut command = callgrind(args, out);
        command.arg(&args.proxy);
        bowline_arguments(&mut command, &file)?;
        Ok(command)
    })?;
    let (nginx_port, h2) = (free_port()?, free_port()?);
    let servers = nginx_proxy(nginx_port, h2, upstream);
    let nginx = instructions("nginx", args, root, nginx_port, |out| {
        let mut command = callgrind(args, out);
        command.arg("/usr/sbin/nginx");
        nginx_arguments(&mut command, "nginx", root, &servers)?;
        // One process: the one counted.
        command.args(["-g", "daemon off; master_process off;"]);
        Ok(command)
    })?;
    println!();
    println!(
        "instructions per request ({} requests, HTTP/1.1, 16 connections):",
        args.requests
    );
    println!("  bowline {bowline:>9.0}");
    println!("  nginx   {nginx:>9.0}");
    println!("bowline / nginx: {:.2}x", bowline / nginx);
    Ok(())
}

/// valgrind counting instructions into `out`, on the proxies' core.
fn callgrind(args: &Args, out: &Path) -> Command {
    let mut command = pinned(Some(args.proxy_core), "valgrind");
    command
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()));
    command
}

/// Instructions per request of what `command` runs (under callgrind,
/// writing to the path it is given), serving on `port`: the count of a
/// run serving `--requests` requests less that of a run serving one.
fn instructions(
    name: &'static str,
    args: &Args,
    root: &Path,
    port: u16,
    command: impl Fn(&Path) -> anyhow::Result<Command>,
) -> anyhow::Result<f64> {
    println!("counting: {name}");
    let mut counts = Vec::new();
    for requests in [0, args.requests] {
        let out = root.join(format!("{name}-{requests}.callgrind"));
        {
            let mut target = Target::start(name, root, command(&out)?)?;
            target.wait_serving(port)?;
            if requests > 0 {
                let output = Command::new("h2load")
                    .args(["--h1", "-t1", "-c16", "-n", &requests.to_string()])
                    .arg(format!("http://127.0.0.1:{port}/"))
                    .output()
                    .context("running h2load (apt-get install nghttp2-client)")?;
                let text = String::from_utf8_lossy(&output.stdout);
                let succeeded = format!("{requests} succeeded");
                if !text.contains(&succeeded) {
                    bail!("{name}: not every request succeeded: {text}");
                }
            }
            // Dropped: stopped, and callgrind writes its count.
        }
        let text = std::fs::read_to_string(&out)
            .with_context(|| format!("callgrind's count for {name} (apt-get install valgrind)"))?;
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("totals:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("the totals line of {}", out.display()))?;
        counts.push(total);
    }
    Ok((counts[1] - counts[0]) / args.requests as f64)
}

/// How the two sidecars of the mTLS suite speak to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Between {
    Plaintext,
    /// Mutual TLS, sessions resumed (rustls' and Envoy's default).
    Mtls,
    /// Mutual TLS with `max_session_keys: 0`: a full handshake each time.
    MtlsWithoutResumption,
}

/// Where a two-sidecar chain listens: the client sidecar's HTTP and TCP
/// listeners (what the app calls), the server sidecar's (what the client
/// sidecar calls).
#[derive(Clone, Copy)]
struct Chain {
    client_http: u16,
    client_tcp: u16,
    server_http: u16,
    server_tcp: u16,
}

impl Chain {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            client_http: free_port()?,
            client_tcp: free_port()?,
            server_http: free_port()?,
            server_tcp: free_port()?,
        })
    }

    /// The bootstraps of the client's and the server's sidecar, speaking
    /// as `between` says. For mutual TLS, `certificates` are the client's
    /// and the server's workload secrets: each presents its SVID and checks
    /// the other's SPIFFE ID against the mesh root, as Istio's
    /// ISTIO_MUTUAL does.
    fn bootstraps(
        &self,
        upstream: u16,
        between: Between,
        certificates: &(Vec<serde_json::Value>, Vec<serde_json::Value>),
    ) -> (serde_json::Value, serde_json::Value) {
        let tls = |context: &str, peer: &str| {
            let sds = json!({"ads": {}, "resource_api_version": "V3"});
            let context = json!({
                "@type": format!("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}"),
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
                    "combined_validation_context": {
                        "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI",
                            "matcher": {"exact": format!("spiffe://cluster.local/ns/bench/sa/{peer}")}}]},
                        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds},
                    },
                },
            });
            json!({"name": "envoy.transport_sockets.tls", "typed_config": context})
        };
        let http = |cluster: &str| {
            json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "bench", "codec_type": "AUTO",
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
            }})
        };
        let tcp = |cluster: &str| {
            json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "bench", "cluster": cluster}})
        };
        let listener = |name: &str,
                        port: u16,
                        filter: serde_json::Value,
                        tls: Option<serde_json::Value>| {
            let mut chain = json!({"filters": [filter]});
            if let Some(tls) = tls {
                chain["transport_socket"] = tls;
            }
            json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [chain]})
        };
        let cluster = |name: &str, port: u16, tls: Option<serde_json::Value>| {
            let mut cluster = json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}});
            if let Some(tls) = tls {
                cluster["transport_socket"] = tls;
            }
            cluster
        };
        let mtls = between != Between::Plaintext;
        let (client_secrets, server_secrets) = if mtls {
            certificates.clone()
        } else {
            Default::default()
        };
        let upstream_tls = || {
            mtls.then(|| {
                let mut socket = tls("UpstreamTlsContext", "server");
                if between == Between::MtlsWithoutResumption {
                    socket["typed_config"]["max_session_keys"] = json!(0);
                }
                socket
            })
        };
        let downstream_tls = || {
            mtls.then(|| {
                let mut socket = tls("DownstreamTlsContext", "client");
                socket["typed_config"]["require_client_certificate"] = json!(true);
                socket
            })
        };
        let client = json!({"static_resources": {
            "listeners": [
                listener("http", self.client_http, http("server-http"), None),
                listener("tcp", self.client_tcp, tcp("server-tcp"), None),
            ],
            "clusters": [
                cluster("server-http", self.server_http, upstream_tls()),
                cluster("server-tcp", self.server_tcp, upstream_tls()),
            ],
            "secrets": client_secrets,
        }});
        let server = json!({"static_resources": {
            "listeners": [
                listener("http", self.server_http, http("app"), downstream_tls()),
                listener("tcp", self.server_tcp, tcp("app"), downstream_tls()),
            ],
            "clusters": [cluster("app", upstream, None)],
            "secrets": server_secrets,
        }});
        (client, server)
    }
}

/// The two-sidecar chain, plaintext and then mutual TLS, in front of the
/// upstream on `upstream`: figures for each, and the ratios.
fn mtls_suite(args: &Args, upstream: u16, root: &Path) -> anyhow::Result<()> {
    let ca = bowline_controlplane::ca::Authority::self_signed(
        "cluster.local",
        Duration::from_secs(24 * 3600),
    )?;
    let certificates = (
        workload_certificate(&ca, "bench", "client")?,
        workload_certificate(&ca, "bench", "server")?,
    );
    // The two sidecars speaking as `between` says, ready.
    let start = |between: Between| -> anyhow::Result<(Chain, [Target; 2])> {
        let chain = Chain::new()?;
        let (client, server) = chain.bootstraps(upstream, between, &certificates);
        let (client_file, server_file) = (
            root.join(format!("{between:?}-client.json")),
            root.join(format!("{between:?}-server.json")),
        );
        std::fs::write(&client_file, serde_json::to_vec(&client)?)?;
        std::fs::write(&server_file, serde_json::to_vec(&server)?)?;
        let mut sidecars = [
            bowline("client", args, &client_file, root)?,
            bowline("server", args, &server_file, root)?,
        ];
        sidecars[0].wait_serving(chain.client_tcp)?;
        Ok((chain, sidecars))
    };
    let mut results: Vec<(&str, Figures, f64)> = Vec::new();
    for (name, between) in [("plaintext", Between::Plaintext), ("mtls", Between::Mtls)] {
        let (chain, mut sidecars) = start(between)?;
        let figures = measure_all(
            args,
            name,
            &mut sidecars,
            chain.client_http,
            chain.client_http,
            root,
        )?;
        let handshakes = connections_per_second(chain.client_tcp, args.seconds)?;
        results.push((name, figures, handshakes));
    }
    // Without resumption every new connection is a full handshake.
    let full_handshakes = {
        println!("measuring: mtls without resumption");
        let (chain, _sidecars) = start(Between::MtlsWithoutResumption)?;
        connections_per_second(chain.client_tcp, args.seconds)?
    };
    println!();
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>8} {:>11} {:>9} {:>9} {:>12} {:>6}",
        "sidecars",
        "h1 rps",
        "h2 rps",
        "p50 ms",
        "p99 ms",
        "cpu ms/1k",
        "rss idle",
        "rss load",
        "new conn/s",
        "errors"
    );
    for (name, f, handshakes) in &results {
        println!(
            "{:<10} {:>10.0} {:>10.0} {:>8.3} {:>8.3} {:>11.1} {:>8.1}M {:>8.1}M {:>12.0} {:>6}",
            name,
            f.h1_rps,
            f.h2_rps,
            f.p50_ms,
            f.p99_ms,
            f.cpu_ms_per_1000,
            f.rss_idle_mb,
            f.rss_load_mb,
            handshakes,
            f.errors
        );
    }
    if let [(_, plain, plain_new), (_, mtls, mtls_new)] = results.as_slice() {
        println!();
        println!(
            "mtls vs plaintext: p50 +{:.3} ms, p99 +{:.3} ms; h1 rps {:.2}x, h2 rps {:.2}x; \
             cpu at {} rps {:.2}x (+{:.1} ms per 1k); new connections {:.0}/s ({:.2}x plaintext's; \
             TLS 1.3 sessions resumed), full handshakes {:.0}/s (resumption off)",
            mtls.p50_ms - plain.p50_ms,
            mtls.p99_ms - plain.p99_ms,
            mtls.h1_rps / plain.h1_rps,
            mtls.h2_rps / plain.h2_rps,
            args.rate,
            mtls.cpu_ms_per_1000 / plain.cpu_ms_per_1000,
            mtls.cpu_ms_per_1000 - plain.cpu_ms_per_1000,
            mtls_new,
            mtls_new / plain_new,
            full_handshakes,
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let root = dir.path();

    let (upstream, upstream_h2) = (free_port()?, free_port()?);
    let mut direct = nginx(
        "direct",
        None,
        root,
        &format!(
            "  server {{\n    listen 127.0.0.1:{upstream} backlog=4096;\n    listen 127.0.0.1:{upstream_h2} http2;\n    \
             location / {{ return 200 \"hello from the upstream\\n\"; }}\n  }}"
        ),
    )?;
    println!(
        "one worker each on core {}; load and upstream on core 0; {} s per saturation run; {} rps over {} connections for latency and CPU",
        args.proxy_core, args.seconds, args.rate, args.connections
    );
    match args.suite {
        Suite::Mtls => {
            direct.wait_serving(upstream)?;
            mtls_suite(&args, upstream, root)
        }
        Suite::Instructions => {
            direct.wait_serving(upstream)?;
            instructions_suite(&args, upstream, root)
        }
        Suite::Train => {
            direct.wait_serving(upstream)?;
            train_suite(&args, upstream, root)
        }
        Suite::Proxies => proxies_suite(&args, &mut direct, (upstream, upstream_h2), root),
    }
}

/// The train suite: a gateway under the proxies suite's loads (HTTP/1.1
/// and HTTP/2 at saturation, HTTP/1.1 at the fixed rate), then two sidecars
/// under the mTLS suite's (plaintext, mutual TLS, new connections with and
/// without resumption). Each proxy is stopped with SIGTERM, so that an
/// instrumented one writes its profile.
fn train_suite(args: &Args, upstream: u16, root: &Path) -> anyhow::Result<()> {
    {
        let (mut gateway, port, h2) = start_proxy("bowline", args, upstream, root)?;
        measure(args, &mut gateway, port, h2, root)?;
    }
    mtls_suite(args, upstream, root)
}

/// The proxies the proxies suite compares, in the order each round
/// measures them.
const PROXIES: [&str; 4] = ["bowline", "envoy", "nginx", "haproxy"];

/// The proxies suite: `--rounds` rounds, each measuring the upstream alone
/// and then every proxy in [`PROXIES`], started afresh. Rounds alternate the
/// targets so that a slow spell of the machine touches all of them rather
/// than one; the table shows each figure's median over the rounds and each
/// ratio is the median of the rounds' own ratios, with their range.
fn proxies_suite(
    args: &Args,
    direct: &mut Target,
    (upstream, upstream_h2): (u16, u16),
    root: &Path,
) -> anyhow::Result<()> {
    let mut rounds: Vec<Vec<(&str, Figures)>> = Vec::new();
    for round in 1..=args.rounds {
        println!("round {round} of {}", args.rounds);
        let mut results = vec![(
            "direct",
            measure(args, direct, upstream, upstream_h2, root)?,
        )];
        for name in PROXIES {
            let (mut target, port, h2) = start_proxy(name, args, upstream, root)?;
            results.push((name, measure(args, &mut target, port, h2, root)?));
        }
        rounds.push(results);
    }

    println!();
    println!(
        "medians of {} rounds:\n{:<9} {:>10} {:>10} {:>8} {:>8} {:>7} {:>11} {:>9} {:>9} {:>6}",
        args.rounds,
        "target",
        "h1 rps",
        "h2 rps",
        "p50 ms",
        "p99 ms",
        "cores",
        "cpu ms/1k",
        "rss idle",
        "rss load",
        "errors"
    );
    let figures = |name: &str| -> Vec<Figures> {
        rounds
            .iter()
            .filter_map(|round| round.iter().find(|(n, _)| *n == name))
            .map(|(_, f)| f.clone())
            .collect()
    };
    for name in std::iter::once("direct").chain(PROXIES) {
        let all = figures(name);
        let m = |field: fn(&Figures) -> f64| Rounds::of(all.iter().map(field).collect()).median();
        println!(
            "{:<9} {:>10.0} {:>10.0} {:>8.3} {:>8.3} {:>7.3} {:>11.1} {:>8.1}M {:>8.1}M {:>6}",
            name,
            m(|f| f.h1_rps),
            m(|f| f.h2_rps),
            m(|f| f.p50_ms),
            m(|f| f.p99_ms),
            m(|f| f.cores),
            m(|f| f.cpu_ms_per_1000),
            m(|f| f.rss_idle_mb),
            m(|f| f.rss_load_mb),
            all.iter().map(|f| f.errors).sum::<u64>(),
        );
    }
    println!();
    let bowline = figures("bowline");
    for base in std::iter::once("direct")
        .chain(PROXIES)
        .filter(|n| *n != "bowline")
    {
        let other = figures(base);
        let ratio = |field: fn(&Figures) -> f64| {
            Rounds::of(
                bowline
                    .iter()
                    .zip(&other)
                    .map(|(b, o)| field(b) / field(o))
                    .collect(),
            )
        };
        println!(
            "bowline / {base:<7}: h1 rps {}, h2 rps {}, p99 {}, cpu at {} rps {}, rss idle {}",
            ratio(|f| f.h1_rps),
            ratio(|f| f.h2_rps),
            ratio(|f| f.p99_ms),
            args.rate,
            ratio(|f| f.cpu_ms_per_1000),
            ratio(|f| f.rss_idle_mb),
        );
    }
    Ok(())
}

/// Starts the proxy `name` (one of [`PROXIES`]) on the proxies' core in
/// front of `upstream`: the target, its HTTP/1.1 port and its HTTP/2 port.
fn start_proxy(
    name: &'static str,
    args: &Args,
    upstream: u16,
    root: &Path,
) -> anyhow::Result<(Target, u16, u16)> {
    let core = Some(args.proxy_core);
    let port = free_port()?;
    let (target, h2) = match name {
        // bowline-proxy and Envoy read the same bootstrap file; its port
        // speaks both protocols.
        "bowline" | "envoy" => {
            let file = root.join(format!("{name}.bootstrap.json"));
            std::fs::write(&file, serde_json::to_vec(&bootstrap(port, upstream))?)?;
            let target = if name == "bowline" {
                bowline(name, args, &file, root)?
            } else {
                let mut command = pinned(core, bowline_tests::binaries::tool("envoy/fetch.sh")?);
                command.arg("-c").arg(&file).args([
                    "--concurrency",
                    "1",
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                ]);
                Target::start(name, root, command)?
            };
            (target, port)
        }
        // nginx and HAProxy: HTTP/1.1 and h2c need a port each.
        "nginx" => {
            let h2 = free_port()?;
            (
                nginx(name, core, root, &nginx_proxy(port, h2, upstream))?,
                h2,
            )
        }
        "haproxy" => {
            let h2 = free_port()?;
            let config = root.join("haproxy.cfg");
            std::fs::write(
                &config,
                format!(
                    "global\n  nbthread 1\n  maxconn 4000\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
                     option http-keep-alive\n  http-reuse always\n\
                     frontend bench\n  bind 127.0.0.1:{port}\n  bind 127.0.0.1:{h2} proto h2\n  default_backend upstream\n\
                     backend upstream\n  server upstream 127.0.0.1:{upstream}\n"
                ),
            )?;
            let mut command = pinned(core, "/usr/sbin/haproxy");
            command.arg("-db").arg("-f").arg(&config);
            (Target::start(name, root, command)?, h2)
        }
        other => bail!("no proxy called {other}"),
    };
    Ok((target, port, h2))
}

/// A figure measured once per round, sorted: its median and its range.
struct Rounds(Vec<f64>);

impl Rounds {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self(values)
    }

    fn median(&self) -> f64 {
        percentile(&self.0, 0.5)
    }
}

/// A ratio: its median over the rounds, then their range.
impl std::fmt::Display for Rounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}x", self.median())?;
        if let [low, .., high] = self.0.as_slice() {
            write!(f, " ({low:.2}-{high:.2})")?;
        }
        Ok(())
    }
}
