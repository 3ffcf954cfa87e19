//! Runs the local cluster by hand.
//!
//! `bowline-cluster` starts it, prints how to point kubectl at it and stays up
//! until Ctrl-C (`--agent` adds the Node whose pods really run).
//! `bowline-cluster --demo` runs the demo on the node agent: the operator
//! from its Helm chart, `kubectl apply -f config/samples/demo.yaml`, the
//! sample app split 90/10, traffic through the ingress gateway, a canary
//! upgrade under traffic — and stops (or stays up with `--stay`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use bowline_tests::mesh;
use bowline_tests::{ClusterOptions, LocalCluster};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "Run Bowline's local Kubernetes cluster")]
struct Args {
    /// kwok Nodes to create.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// Also the Node whose pods really run (processes in network
    /// namespaces; needs root).
    #[arg(long)]
    agent: bool,

    /// Install the demo mesh through the operator and show it.
    #[arg(long)]
    demo: bool,

    /// With --demo: keep the cluster and the operator up afterwards.
    #[arg(long)]
    stay: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The client logs each refused poll while the API server starts.
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let cluster = LocalCluster::start(ClusterOptions {
        // The demo's pods really run, all of them on the agent's Node.
        nodes: if args.demo { 0 } else { args.nodes },
        agent: args.agent || args.demo,
    })
    .await
    .context("starting the local cluster")?;

    if args.demo {
        demo(&cluster).await?;
        if !args.stay {
            println!("\nThe demo is done. `make cluster` keeps a cluster up to explore.");
            return Ok(());
        }
    }

    // Listen before saying how to use the cluster: whoever reads that may
    // send Ctrl-C at once.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    println!(
        "# The local cluster is up (its files: {}).",
        cluster.dir().display()
    );
    println!("# In another shell:");
    println!("export KUBECONFIG={}", cluster.kubeconfig().display());
    println!("export PATH={}:$PATH", cluster.binaries().dir().display());
    println!("# Ctrl-C here stops it and removes everything it wrote.");

    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping the local cluster");
    drop(cluster);
    Ok(())
}

/// The demo: the operator from its Helm chart, the mesh from
/// config/samples/demo.yaml, the sample app split 90/10, traffic through the
/// ingress gateway, and a canary upgrade of the mesh under traffic.
async fn demo(cluster: &LocalCluster) -> anyhow::Result<()> {
    let config = mesh::config_dir();
    let path = |p: &str| config.join(p).display().to_string();

    println!("== Installing the operator with its Helm chart (config/helm/bowline-operator)");
    mesh::install_operator(cluster)?;
    kubectl(
        cluster,
        &["get", "pods", "-n", "bowline-system", "-o", "wide"],
    )?;

    println!("\n== Applying a MeshInstallation with the demo profile, and the default tag");
    println!("$ kubectl apply -f config/samples/demo.yaml -f config/samples/tag-default.yaml");
    mesh::install_mesh(cluster)?;
    kubectl(
        cluster,
        &["get", "meshinstallation,meshrevision,meshrevisiontag"],
    )?;
    kubectl(
        cluster,
        &["get", "pods", "-n", "istio-system", "-o", "wide"],
    )?;

    println!("\n== The sample app: echo v1 and v2 behind one Service, split 90/10");
    kubectl(cluster, &["apply", "-f", &path("samples/demo-app.yaml")])?;
    mesh::wait_available(cluster, "demo")?;
    kubectl(cluster, &["get", "pods", "-n", "demo", "-o", "wide"])?;

    println!("\n== 200 requests from a client pod through the ingress gateway");
    kubectl(cluster, &["create", "namespace", "demo-client"])?;
    mesh::start_caller(
        cluster,
        "demo-client",
        "first",
        &[
            mesh::INGRESS_GATEWAY,
            "--host",
            "echo.example.com",
            "--requests",
            "200",
        ],
    )?;
    kubectl(
        cluster,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/first",
            "-n",
            "demo-client",
            "--timeout=120s",
        ],
    )?;
    let result =
        mesh::caller_result(cluster, ("demo-client", "first"), Duration::from_secs(30)).await?;
    println!("   answered by version: {}", result["versions"]);
    println!("   status codes: {}", result["statuses"]);
    println!(
        "   failed: {}   p50 {:.2} ms   p99 {:.2} ms",
        result["errors"],
        result["p50_ms"].as_f64().unwrap_or_default(),
        result["p99_ms"].as_f64().unwrap_or_default()
    );

    println!("\n== Mutual TLS: what echo-v1's sidecar counted (its 15020/stats/prometheus)");
    let pod = mesh::pod(cluster, "demo", "app=echo,version=v1")?;
    let metrics = mesh::kubectl(
        cluster,
        &[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/demo/pods/{pod}:15020/proxy/stats/prometheus"),
        ],
    )?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        println!(
            "   istio_requests_total reporter={} source={} response_code={} connection_security_policy={} = {}",
            label("reporter"),
            label("source_workload"),
            label("response_code"),
            label("connection_security_policy"),
            line.rsplit(' ').next().unwrap_or("")
        );
    }

    println!("\n== The mesh's Prometheus, as it scraped the sidecars (every 15 s)");
    let query = r#"sum by (source_workload, destination_workload, connection_security_policy) (istio_requests_total{reporter="destination", destination_workload_namespace="demo"})"#;
    println!("   {query}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = loop {
        let series = mesh::prometheus_query(cluster, query)?;
        let seen: f64 = series
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum();
        if seen >= 200.0 || Instant::now() > deadline {
            break series;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    for s in series.as_array().into_iter().flatten() {
        let m = &s["metric"];
        println!(
            "   {} -> {} ({}): {}",
            m["source_workload"].as_str().unwrap_or(""),
            m["destination_workload"].as_str().unwrap_or(""),
            m["connection_security_policy"].as_str().unwrap_or(""),
            s["value"][1].as_str().unwrap_or("")
        );
    }

    println!("\n== Opening Prometheus and Grafana");
    println!("   with --stay: kubectl proxy --port 8001, then");
    println!(
        "   http://127.0.0.1:8001/api/v1/namespaces/istio-system/services/prometheus:9090/proxy/api/v1/query?query=istio_requests_total"
    );
    println!(
        "   http://127.0.0.1:8001/api/v1/namespaces/istio-system/services/grafana:3000/proxy/"
    );
    println!(
        "   http://127.0.0.1:8001/api/v1/namespaces/istio-system/services/tracing:80/proxy/jaeger/api/services"
    );
    println!(
        "   Prometheus and Jaeger serve their APIs here (built from their Go modules, without"
    );
    println!("   their web UIs' assets); Grafana and Kiali are reported running without running:");
    println!("   no local program runs their images (tests/src/agent/images.rs).");

    println!("\n== Canary upgrade of the mesh to v0.2.0, with traffic flowing");
    mesh::start_gateway_caller(
        cluster,
        "demo-client",
        "upgrade",
        "echo.example.com",
        "240s",
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "$ kubectl patch meshinstallation default --type=merge -p '{{\"spec\":{{\"version\":\"v0.2.0\"}}}}'"
    );
    mesh::upgrade_to(cluster, "v0.2.0")?;
    // Done when the new revision serves every workload and the old one is
    // gone (inactiveRevisionDeletionGracePeriodSeconds after its last).
    mesh::wait_for_only_revision(cluster, "default-v0-2-0").await?;
    mesh::stop_caller(cluster, "demo-client", "upgrade")?;
    let result =
        mesh::caller_result(cluster, ("demo-client", "upgrade"), Duration::from_secs(30)).await?;
    kubectl(cluster, &["get", "meshinstallation,meshrevision"])?;
    kubectl(
        cluster,
        &["get", "pods", "-n", "demo", "-L", "istio.io/rev"],
    )?;
    println!(
        "   during the upgrade: {} requests, by version {}, status codes {}, failed {}",
        result["requests"], result["versions"], result["statuses"], result["errors"]
    );
    Ok(())
}

/// Runs the cluster's kubectl with its output going straight to ours.
fn kubectl(cluster: &LocalCluster, args: &[&str]) -> anyhow::Result<()> {
    println!("$ kubectl {}", args.join(" "));
    let status = cluster
        .kubectl()
        .args(args)
        .status()
        .with_context(|| format!("running kubectl {}", args.join(" ")))?;
    if !status.success() {
        bail!("kubectl {} failed with {status}", args.join(" "));
    }
    Ok(())
}
