//! Runs the local cluster by hand.
//!
//! `bowline-cluster` starts it, prints how to point kubectl at it and stays up
//! until Ctrl-C. `bowline-cluster --demo` also installs the mesh through the
//! operator — CRDs, the operator's RBAC, the operator running as its own
//! ServiceAccount, then `kubectl apply -f config/samples/demo.yaml` — shows
//! what it made, and stops (or stays up with `--stay`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use bowline_tests::operator::{Operator, install_crds, operator_token};
use bowline_tests::{ClusterOptions, LocalCluster};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "Run Bowline's local Kubernetes cluster")]
struct Args {
    /// kwok Nodes to create.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

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

    let cluster = LocalCluster::start(ClusterOptions { nodes: args.nodes })
        .await
        .context("starting the local cluster")?;

    let _operator = if args.demo {
        let operator = demo(&cluster).await?;
        if !args.stay {
            println!("\nThe demo is done. `make cluster` keeps a cluster up to explore.");
            return Ok(());
        }
        Some(operator)
    } else {
        None
    };

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

/// Installs the demo mesh through the operator and shows the result.
async fn demo(cluster: &LocalCluster) -> anyhow::Result<Operator> {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config");
    let path = |p: &str| config.join(p).display().to_string();
    let client = cluster.client().await?;

    println!("== Installing Bowline's CRDs and the operator's RBAC (config/crd, config/rbac)");
    install_crds(&client).await?;
    let token = operator_token(cluster, &client).await?;
    let operator = Operator::start(cluster.config_with_token(&token).await?, None)?;
    println!("   the operator runs as ServiceAccount bowline-system/bowline-operator");

    println!("\n== Applying a MeshInstallation with the demo profile");
    kubectl(cluster, &["apply", "-f", &path("samples/demo.yaml")])?;
    kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "meshinstallation/default",
            "--timeout=120s",
        ],
    )?;
    println!();
    kubectl(cluster, &["get", "meshinstallation"])?;
    println!();
    kubectl(
        cluster,
        &["get", "deployments,services", "-n", "istio-system"],
    )?;
    println!();
    kubectl(cluster, &["get", "nodes,pods", "-A", "-o", "wide"])?;
    println!(
        "\nThe operator sent {} requests to the API server, {} of them writes, over {} reconciles.",
        operator.metrics.api_requests_total(),
        operator.writes(),
        operator.reconciles()
    );
    println!("kwok reports these Pods Ready without running them: the data plane comes next.");
    Ok(operator)
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
