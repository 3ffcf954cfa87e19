//! Runs the local cluster by hand.
//!
//! `bowline-cluster` starts it, prints how to point kubectl at it and stays up
//! until Ctrl-C; `bowline-cluster --demo` also deploys a sample workload,
//! shows `kubectl get nodes,pods -A` and stops.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bowline_tests::{ClusterOptions, LocalCluster};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "Run Bowline's local Kubernetes cluster")]
struct Args {
    /// kwok Nodes to create.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// Deploy config/samples/hello.yaml, show the cluster's nodes and pods, and stop.
    #[arg(long)]
    demo: bool,
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
    let bin_dir = cluster.binaries().dir().display().to_string();

    if args.demo {
        let sample = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/samples/hello.yaml");
        kubectl(&cluster, &["apply", "-f", &sample.display().to_string()])?;
        kubectl(
            &cluster,
            &[
                "rollout",
                "status",
                "deployment/hello",
                "-n",
                "demo",
                "--timeout=90s",
            ],
        )?;
        println!();
        kubectl(&cluster, &["version"])?;
        println!();
        kubectl(&cluster, &["get", "nodes,pods", "-A", "-o", "wide"])?;
        println!("\nThe demo is done; `make cluster` keeps a cluster up to explore.");
        return Ok(());
    }

    println!(
        "# The local cluster is up (its files: {}).",
        cluster.dir().display()
    );
    println!("# In another shell:");
    println!("export KUBECONFIG={}", cluster.kubeconfig().display());
    println!("export PATH={bin_dir}:$PATH");
    println!("# Ctrl-C here stops it and removes everything it wrote.");

    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping the local cluster");
    drop(cluster);
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
