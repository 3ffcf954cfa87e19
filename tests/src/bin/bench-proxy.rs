//! Benchmarks bowline-proxy side by side with Envoy, nginx and HAProxy,
//! each an equivalent L7 proxy (one worker, keep-alive to the upstream) in
//! front of the same upstream, and with the upstream alone (the limit).
//!
//! Everything is on loopback. The upstream (nginx answering a short body)
//! and the load generators run on core 0 — run this binary under
//! `taskset -c 0`, as `make bench-proxy` does — and each proxy on core 1.
//! Per target: saturation throughput with wrk (HTTP/1.1) and h2load
//! (HTTP/2, prior knowledge); p50/p99 latency and CPU at a fixed rate on
//! kept-alive connections; resident memory idle and under load. Every load
//! is bounded in time. Prints a table and the ratios of bowline-proxy to
//! the upstream alone, to Envoy and to nginx.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bowline_tests::cluster::free_port;
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

    /// Requests per second of the fixed-rate run.
    #[arg(long, default_value_t = 1000)]
    rate: u64,

    /// Connections of the fixed-rate run.
    #[arg(long, default_value_t = 10)]
    connections: u64,

    /// The core the proxies run on.
    #[arg(long, default_value_t = 1)]
    proxy_core: usize,

    /// Skip targets whose binary is missing instead of failing.
    #[arg(long)]
    skip_missing: bool,
}

/// A process (tree) killed on drop.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn spawn(name: &str, mut command: Command, path: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(path)?;
        let child = command
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.into(),
            child,
            log: path.into(),
        })
    }

    /// The process and its descendants.
    fn tree(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        let mut i = 0;
        while i < pids.len() {
            let pid = pids[i];
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for task in tasks.flatten() {
                    let children =
                        std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                    pids.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
            i += 1;
        }
        pids
    }

    /// CPU time used so far, user and system, by the whole tree.
    fn cpu(&self) -> Duration {
        let ticks: u64 = self
            .tree()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .filter_map(|stat| {
                // After the command's closing parenthesis: state is field 3,
                // utime 14 and stime 15.
                let rest = &stat[stat.rfind(')')? + 2..];
                let fields: Vec<&str> = rest.split_whitespace().collect();
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            })
            .sum();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// Resident memory of the whole tree, in MB.
    fn rss_mb(&self) -> f64 {
        let kb: u64 = self
            .tree()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        kb as f64 / 1024.0
    }
}

/// Waits until `port` answers an HTTP/1.1 GET with 200.
fn wait_serving(port: u16, process: &mut Process) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "{} exited with {status}; its output is in {}",
                process.name,
                process.log.display()
            );
        }
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port))
            && one_request(&mut stream, port).is_ok_and(|status| status == 200)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not answer on {port}", process.name)
}

/// One GET on a kept-alive connection; the status.
fn one_request(stream: &mut TcpStream, port: u16) -> anyhow::Result<u16> {
    write!(stream, "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut reader = BufReader::new(&mut *stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .context("a status line")?
        .parse()?;
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(status)
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
    let text = String::from_utf8_lossy(&output.stdout);
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
/// connections, each sending on its own schedule (so a slow answer delays
/// only its connection): latencies in milliseconds, and errors.
fn fixed_rate(port: u16, rate: u64, seconds: u64, connections: u64) -> (Vec<f64>, u64) {
    let per_connection = Duration::from_secs_f64(connections as f64 / rate as f64);
    let count = rate * seconds / connections;
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(count as usize);
                let mut errors = 0;
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                    return (latencies, count);
                };
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                // Spread the connections' schedules over one period.
                let start = Instant::now() + per_connection.mul_f64(c as f64 / connections as f64);
                for i in 0..count {
                    let due = start + per_connection * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let sent = Instant::now();
                    match one_request(&mut stream, port) {
                        Ok(200) => latencies.push(sent.elapsed().as_secs_f64() * 1000.0),
                        _ => {
                            errors += 1;
                            match TcpStream::connect(("127.0.0.1", port)) {
                                Ok(fresh) => stream = fresh,
                                Err(_) => return (latencies, errors + count - i - 1),
                            }
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for thread in threads {
        if let Ok((latencies, e)) = thread.join() {
            all.extend(latencies);
            errors += e;
        }
    }
    all.sort_by(f64::total_cmp);
    (all, errors)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn measure(
    args: &Args,
    process: &mut Process,
    h1_port: u16,
    h2_port: u16,
) -> anyhow::Result<Figures> {
    wait_serving(h1_port, process)?;
    let rss_idle_mb = process.rss_mb();
    let h1_rps = wrk(h1_port, args.seconds)?;
    let h2_rps = h2load(h2_port, args.seconds)?;
    // Let the saturation runs' connections close before the quiet run.
    std::thread::sleep(Duration::from_secs(1));
    let cpu_before = process.cpu();
    let started = Instant::now();
    let (latencies, errors) = fixed_rate(h1_port, args.rate, args.seconds, args.connections);
    let wall = started.elapsed();
    let cpu = process.cpu().saturating_sub(cpu_before);
    let rss_load_mb = process.rss_mb();
    let served = latencies.len().max(1) as f64;
    Ok(Figures {
        h1_rps,
        h2_rps,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        cores: cpu.as_secs_f64() / wall.as_secs_f64(),
        cpu_ms_per_1000: cpu.as_secs_f64() * 1000.0 / (served / 1000.0),
        rss_idle_mb,
        rss_load_mb,
        errors,
    })
}

fn pinned(core: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(core.to_string()).arg(program);
    command
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// nginx with one worker, its files in `dir`, serving `servers`.
fn nginx_config(dir: &Path, servers: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{servers}\n}}\n"
    )
}

fn nginx(core: Option<usize>, dir: &Path, servers: &str, name: &str) -> anyhow::Result<Process> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("nginx.conf");
    std::fs::write(&config, nginx_config(dir, servers))?;
    let binary = which("nginx").context("nginx (apt-get install nginx-light)")?;
    let mut command = match core {
        Some(core) => pinned(core, &binary),
        None => Command::new(&binary),
    };
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&config)
        .args(["-g", "daemon off;"]);
    Process::spawn(name, command, &dir.join("out.log"))
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let core = args.proxy_core;

    let (upstream, upstream_h2) = (free_port()?, free_port()?);
    let mut upstream_process = nginx(
        None,
        &root.join("upstream"),
        &format!(
            "  server {{\n    listen 127.0.0.1:{upstream} backlog=4096;\n    listen 127.0.0.1:{upstream_h2} http2;\n    \
             location / {{ return 200 \"hello from the upstream\\n\"; }}\n  }}"
        ),
        "upstream nginx",
    )?;
    wait_serving(upstream, &mut upstream_process)?;

    let mut results: Vec<(&str, Figures)> = Vec::new();
    println!(
        "one worker each on core {core}; load and upstream on core 0; {} s per saturation run; {} rps over {} connections for latency and CPU",
        args.seconds, args.rate, args.connections
    );

    // The upstream alone: its own process is what is measured.
    println!("measuring: direct");
    let figures = measure(&args, &mut upstream_process, upstream, upstream_h2)?;
    results.push(("direct", figures));

    // bowline-proxy.
    {
        let (port, status) = (free_port()?, free_port()?);
        let file = root.join("bowline.yaml");
        std::fs::write(&file, serde_json::to_vec(&bootstrap(port, upstream))?)?;
        let mut command = pinned(core, &args.proxy);
        command
            .args(["gateway", "--bootstrap"])
            .arg(&file)
            .env("BOWLINE_PROXY_CONCURRENCY", "1")
            .env(
                "BOWLINE_PROXY_STATUS_ADDRESS",
                format!("127.0.0.1:{status}"),
            )
            .env("RUST_LOG", "warn");
        let mut process = Process::spawn("bowline-proxy", command, &root.join("bowline.log"))?;
        println!("measuring: bowline-proxy");
        results.push(("bowline", measure(&args, &mut process, port, port)?));
    }

    // Envoy, from the same bootstrap.
    match bowline_tests::binaries::tool("envoy/fetch.sh") {
        Ok(envoy) => {
            let port = free_port()?;
            let file = root.join("envoy.json");
            std::fs::write(&file, serde_json::to_vec(&bootstrap(port, upstream))?)?;
            let mut command = pinned(core, &envoy);
            command.arg("-c").arg(&file).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]);
            let mut process = Process::spawn("envoy", command, &root.join("envoy.log"))?;
            println!("measuring: envoy");
            results.push(("envoy", measure(&args, &mut process, port, port)?));
        }
        Err(error) if args.skip_missing => eprintln!("skipping Envoy: {error}"),
        Err(error) => return Err(error.into()),
    }

    // nginx as a proxy: HTTP/1.1 and h2c need a port each.
    {
        let (port, h2) = (free_port()?, free_port()?);
        let mut process = nginx(
            Some(core),
            &root.join("nginx"),
            &format!(
                "  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n  server {{\n    \
                 listen 127.0.0.1:{port} backlog=4096;\n    listen 127.0.0.1:{h2} http2;\n    location / {{\n      \
                 proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}"
            ),
            "nginx",
        )?;
        println!("measuring: nginx");
        results.push(("nginx", measure(&args, &mut process, port, h2)?));
    }

    // HAProxy.
    match which("haproxy") {
        Some(binary) => {
            let (port, h2) = (free_port()?, free_port()?);
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
            let mut command = pinned(core, &binary);
            command.arg("-db").arg("-f").arg(&config);
            let mut process = Process::spawn("haproxy", command, &root.join("haproxy.log"))?;
            println!("measuring: haproxy");
            results.push(("haproxy", measure(&args, &mut process, port, h2)?));
        }
        None if args.skip_missing => eprintln!("skipping HAProxy: not installed"),
        None => bail!("haproxy (apt-get install haproxy)"),
    }

    println!();
    println!(
        "{:<9} {:>10} {:>10} {:>8} {:>8} {:>7} {:>11} {:>9} {:>9} {:>6}",
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
    for (name, f) in &results {
        println!(
            "{:<9} {:>10.0} {:>10.0} {:>8.3} {:>8.3} {:>7.3} {:>11.1} {:>8.1}M {:>8.1}M {:>6}",
            name,
            f.h1_rps,
            f.h2_rps,
            f.p50_ms,
            f.p99_ms,
            f.cores,
            f.cpu_ms_per_1000,
            f.rss_idle_mb,
            f.rss_load_mb,
            f.errors
        );
    }
    let find = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f.clone())
    };
    if let Some(bowline) = find("bowline") {
        println!();
        for base in ["direct", "envoy", "nginx", "haproxy"] {
            let Some(other) = find(base) else { continue };
            println!(
                "bowline / {base:<7}: h1 rps {:.2}x, h2 rps {:.2}x, p99 {:.2}x, cpu at {} rps {:.2}x, rss idle {:.2}x",
                bowline.h1_rps / other.h1_rps,
                bowline.h2_rps / other.h2_rps,
                bowline.p99_ms / other.p99_ms,
                args.rate,
                bowline.cpu_ms_per_1000 / other.cpu_ms_per_1000,
                bowline.rss_idle_mb / other.rss_idle_mb,
            );
        }
    }
    Ok(())
}
