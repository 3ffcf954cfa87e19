//! Benchmarks the control plane's xDS server: a mesh of 1,000 services and
//! 10,000 endpoints, 1,000 simulated proxies on delta ADS over TLS (client
//! certificates from the mesh CA), all on loopback.
//!
//! The server runs as a child process (this binary, `serve`), so its memory
//! and CPU time are its own; it is handed changes on stdin and publishes
//! each as a push at once — the figures are what follows the debounce.
//! Prints, per kind of change (a VirtualService edit every proxy routes
//! by; an endpoint change, which takes the EDS-only path), the time from
//! the change to each proxy having it (p50, p90, p99, max), the server's
//! CPU time for the whole push, and its memory per connected proxy. Run it
//! with `make bench-controlplane`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bowline_api::networking::{DestinationRuleSpec, VirtualServiceSpec};
use bowline_controlplane::ca::{Authority, Identity};
use bowline_controlplane::metrics::Metrics;
use bowline_controlplane::model::{Config, Endpoint, Protocol, Service, ServicePort, Snapshot};
use bowline_controlplane::push::{CLUSTER, ENDPOINT, LISTENER, Push, ROUTE};
use bowline_controlplane::xds::{Authenticator, Discovery};
use bowline_tests::usage;
use bowline_tests::xds::{Credentials, Target, sidecar_node_id};
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use prost::Message;
use serde_json::json;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Services in the mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Connected proxies.
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Changes of each kind to time.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// The server side: serves xDS on the port, pushes on stdin commands.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        ca_dir: std::path::PathBuf,
    },
}

// The control plane's allocator, so that the server measured is the one
// shipped.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const NAMESPACES: usize = 10;

/// Set once the figures are out: the proxies' streams then end with the
/// server, which is not worth reporting.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The mesh: `services` HTTP services over ten namespaces, each with
/// `endpoints` ready endpoints in two versions; one in ten with a
/// DestinationRule (subsets v1, v2) and a 90/10 VirtualService.
fn mesh(services: usize, endpoints: usize, weight: u32, endpoint_round: u32) -> Snapshot {
    let mut model = BTreeMap::new();
    let mut all_endpoints = BTreeMap::new();
    let (mut rules, mut routes) = (Vec::new(), Vec::new());
    for i in 0..services {
        let namespace = format!("ns-{}", i % NAMESPACES);
        let name = format!("svc-{i}");
        let mut service = Service::kubernetes(
            &name,
            &namespace,
            vec![ServicePort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Http,
            }],
        );
        service.address = Some(format!("10.96.{}.{}", i / 250, i % 250 + 1));
        let list: Vec<Endpoint> = (0..endpoints)
            .map(|e| Endpoint {
                // The first service's endpoints move with each round.
                address: format!(
                    "10.{}.{}.{}",
                    100 + (i / 250),
                    i % 250,
                    e + 1
                        + if i == 0 {
                            endpoint_round as usize * endpoints
                        } else {
                            0
                        }
                ),
                service_port: 8080,
                port: 8080,
                labels: [
                    ("app".to_string(), name.clone()),
                    ("version".to_string(), format!("v{}", e % 2 + 1)),
                ]
                .into(),
                ready: true,
                sidecar: true,
                service_account: Some(name.clone()),
            })
            .collect();
        all_endpoints.insert(service.hostname.clone(), list);
        if i % 10 == 0 {
            rules.push(Config::new(&name, &namespace, serde_json::from_value::<DestinationRuleSpec>(json!({
                "host": name, "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            })).expect("a rule")));
            routes.push(Config::new(
                &name,
                &namespace,
                serde_json::from_value::<VirtualServiceSpec>(json!({
                    "hosts": [name], "http": [{"route": [
                        {"destination": {"host": name, "subset": "v1"}, "weight": weight},
                        {"destination": {"host": name, "subset": "v2"}, "weight": 100 - weight},
                    ]}],
                }))
                .expect("a route"),
            ));
        }
        model.insert(service.hostname.clone(), service);
    }
    Snapshot {
        services: Arc::new(model),
        endpoints: Arc::new(all_endpoints),
        destination_rules: Arc::new(rules),
        virtual_services: Arc::new(routes),
        ..Default::default()
    }
}

/// The server: the xDS service over TLS asking for client certificates,
/// pushes published as stdin asks (`route <n>`, `endpoints <n>`).
async fn serve(args: &Args, port: u16, ca_dir: &std::path::Path) -> anyhow::Result<()> {
    let read = |name: &str| std::fs::read_to_string(ca_dir.join(name));
    let authority = Authority::from_files(
        bowline_controlplane::ca::CaFiles {
            ca_cert: read("ca-cert.pem")?,
            ca_key: read("ca-key.pem")?,
            root_cert: read("root-cert.pem")?,
            cert_chain: read("cert-chain.pem")?,
        },
        "cluster.local",
        Duration::from_secs(24 * 3600),
    )?;
    let (chain, key) = authority.serving_certificate(
        &["istiod.istio-system.svc".into()],
        &[],
        Duration::from_secs(3600),
    )?;
    let mut push = Push::first(mesh(args.services, args.endpoints, 90, 0));
    let (pushes, receiver) = watch::channel(Arc::new(push.clone()));
    let discovery = Discovery::new(
        receiver,
        Authenticator {
            client: None,
            trust_domain: "cluster.local".into(),
        },
        Arc::new(Metrics::default()),
    );
    let server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(chain, key))
                .client_ca_root(tonic::transport::Certificate::from_pem(
                    authority.root_pem(),
                )),
        )?
        .add_service(discovery.server())
        .serve(SocketAddr::from(([127, 0, 0, 1], port)));
    tokio::spawn(server);
    println!("serving");
    let (tx, mut commands) = mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(command) = commands.recv().await {
        let mut words = command.split_whitespace();
        let (kind, round) = (
            words.next().unwrap_or_default(),
            words
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0),
        );
        let started = Instant::now();
        let snapshot = match kind {
            "route" => mesh(args.services, args.endpoints, 90 - (round % 80), 0),
            "endpoints" => mesh(args.services, args.endpoints, 90, round),
            _ => continue,
        };
        push = Push {
            number: push.number + 1,
            config: if kind == "endpoints" {
                push.config
            } else {
                push.number + 1
            },
            snapshot: Arc::new(snapshot),
            since: started,
        };
        pushes.send_replace(Arc::new(push.clone()));
    }
    Ok(())
}

/// One simulated proxy: subscribes like a sidecar, keeps only versions,
/// ACKs everything, and reports when a response of a type arrives.
async fn proxy(
    channel: tonic::transport::Channel,
    node_id: String,
    seen: mpsc::UnboundedSender<(String, Instant)>,
) -> anyhow::Result<()> {
    let (requests, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let node = Node {
        id: node_id,
        ..Default::default()
    };
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await?;
    requests
        .send(DeltaDiscoveryRequest {
            type_url: LISTENER.into(),
            ..Default::default()
        })
        .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .delta_aggregated_resources(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await?
        .into_inner();
    let mut endpoints_asked = BTreeSet::new();
    let mut routes_asked = BTreeSet::new();
    while let Some(response) = responses.message().await? {
        let DeltaDiscoveryResponse {
            type_url,
            nonce,
            resources,
            ..
        } = response;
        let now = Instant::now();
        requests
            .send(DeltaDiscoveryRequest {
                type_url: type_url.clone(),
                response_nonce: nonce,
                ..Default::default()
            })
            .await?;
        // Follow what clusters and listeners refer to, as Envoy does.
        let subscribe = |type_url: &str, names: Vec<String>| {
            (!names.is_empty()).then(|| DeltaDiscoveryRequest {
                type_url: type_url.into(),
                resource_names_subscribe: names,
                ..Default::default()
            })
        };
        let follow = if type_url == CLUSTER {
            let names: Vec<String> = resources
                .iter()
                .map(|r| r.name.clone())
                .filter(|n| n.starts_with("outbound|") && endpoints_asked.insert(n.clone()))
                .collect();
            subscribe(ENDPOINT, names)
        } else if type_url == LISTENER {
            let names: Vec<String> = resources
                .iter()
                .filter_map(|r| r.resource.as_ref())
                .filter_map(|any| Listener::decode(any.value.as_slice()).ok())
                .filter_map(|l| l.name.strip_prefix("0.0.0.0_").map(String::from))
                .filter(|n| routes_asked.insert(n.clone()))
                .collect();
            subscribe(ROUTE, names)
        } else {
            None
        };
        if let Some(request) = follow {
            requests.send(request).await?;
        }
        let _ = seen.send((type_url, now));
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let authority = Authority::self_signed("cluster.local", Duration::from_secs(24 * 3600))?;
    let files = authority.files();
    for (name, text) in [
        ("ca-cert.pem", &files.ca_cert),
        ("ca-key.pem", &files.ca_key),
        ("root-cert.pem", &files.root_cert),
        ("cert-chain.pem", &files.cert_chain),
    ] {
        std::fs::write(dir.path().join(name), text)?;
    }
    let port = bowline_tests::cluster::free_port()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--services",
            &args.services.to_string(),
            "--endpoints",
            &args.endpoints.to_string(),
        ])
        .args(["serve", "--port", &port.to_string(), "--ca-dir"])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let pid = child.id();
    let _server = ServerProcess(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "serving" {
        bail!("the server did not start: {line:?}");
    }
    let idle_rss = usage::of(pid)?.rss_mb;

    // Proxies in the ten namespaces, each with a certificate for its
    // namespace's ServiceAccount.
    let root = authority.root_pem().to_string();
    let target = Target {
        address: format!("127.0.0.1:{port}"),
        root_pem: root,
        server_name: "istiod.istio-system.svc".into(),
    };
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    let connect_started = Instant::now();
    for i in 0..args.proxies {
        // Each proxy its own connection, as Envoys have; ten in a row share
        // a namespace and its identity.
        let ns = (i / 10) % NAMESPACES;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let identity = Identity {
            namespace: format!("ns-{ns}"),
            service_account: "app".into(),
        };
        let chain = authority.sign(&csr, &identity, None)?.concat();
        let channel = target
            .channel(&Credentials::Certificate {
                chain,
                key: key.serialize_pem(),
            })
            .await?;
        let node = sidecar_node_id(
            &format!("10.200.{}.{}", i / 250, i % 250 + 1),
            &format!("app-{i}"),
            &format!("ns-{ns}"),
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let seen_tx = seen_tx.clone();
        tokio::spawn(async move {
            while let Some((type_url, at)) = rx.recv().await {
                if seen_tx.send((i, type_url, at)).is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            if let Err(e) = proxy(channel, node, tx).await
                && !DONE.load(std::sync::atomic::Ordering::Relaxed)
            {
                eprintln!("proxy {i}: {e:#}");
            }
        });
    }
    // Connected once every proxy has its routes and endpoints.
    let mut ready: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready.values().filter(|t| t.len() == 4).count() < args.proxies {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((i, type_url, _))) = tokio::time::timeout(left, seen.recv()).await else {
            bail!(
                "only {} proxies got their config",
                ready.values().filter(|t| t.len() == 4).count()
            );
        };
        ready.entry(i).or_default().insert(type_url);
    }
    let connected_in = connect_started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    while seen.try_recv().is_ok() {}
    let connected_rss = usage::of(pid)?.rss_mb;
    println!(
        "mesh: {} services, {} endpoints, {} proxies connected and configured in {:.1?}",
        args.services,
        args.services * args.endpoints,
        args.proxies,
        connected_in
    );
    println!(
        "server memory: {:.1} MiB idle, {:.1} MiB with the proxies: {:.0} KiB per connected proxy",
        idle_rss,
        connected_rss,
        (connected_rss - idle_rss).max(0.0) * 1024.0 / args.proxies as f64
    );

    for (kind, type_url) in [("route", ROUTE), ("endpoints", ENDPOINT)] {
        let mut latencies = Vec::new();
        let mut cpu = Vec::new();
        for round in 1..=args.rounds {
            let before = usage::of(pid)?.cpu;
            let changed = Instant::now();
            writeln!(stdin, "{kind} {round}")?;
            stdin.flush()?;
            let mut got = BTreeSet::new();
            let deadline = changed + Duration::from_secs(120);
            while got.len() < args.proxies {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(Some((i, t, at))) = tokio::time::timeout(left, seen.recv()).await else {
                    bail!(
                        "{kind} round {round}: {} of {} proxies got it",
                        got.len(),
                        args.proxies
                    );
                };
                if t == type_url && got.insert(i) {
                    latencies.push(at.duration_since(changed));
                }
            }
            // Let the server finish its ACK bookkeeping before reading CPU.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = usage::of(pid)?.cpu;
            cpu.push((after - before).as_secs_f64());
            while seen.try_recv().is_ok() {}
        }
        latencies.sort();
        let mean_cpu = cpu.iter().sum::<f64>() / cpu.len() as f64;
        println!(
            "{kind} change → every proxy has it ({} rounds × {} proxies): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; server CPU per push {:.2} s",
            args.rounds,
            args.proxies,
            percentile(&latencies, 0.50).as_millis(),
            percentile(&latencies, 0.90).as_millis(),
            percentile(&latencies, 0.99).as_millis(),
            latencies.last().copied().unwrap_or_default().as_millis(),
            mean_cpu,
        );
    }
    let final_rss = usage::of(pid)?.rss_mb;
    println!("server memory after the pushes: {:.1} MiB", final_rss);
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Sub::Serve { port, ca_dir }) => serve(&args, *port, ca_dir).await,
        None => bench(&args).await,
    }
}
