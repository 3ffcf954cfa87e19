//! `bowline-proxy`: the sidecar and gateway proxy.

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Context;
use bowline_proxy::admin::SetLogFilter;
use bowline_proxy::config::{Config, Mode, ProcessEnv};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bowline-proxy",
    version,
    about = "The Bowline sidecar and gateway proxy"
)]
struct Args {
    #[command(subcommand)]
    mode: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A workload's sidecar.
    Sidecar(RunArgs),
    /// An ingress or egress gateway.
    Gateway(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// An Envoy bootstrap file (YAML or JSON) whose static resources are
    /// served instead of configuration from the control plane.
    #[arg(long, env = "BOWLINE_PROXY_BOOTSTRAP")]
    bootstrap: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let log_filter = logging();
    let args = Args::parse();
    let (mode, run) = match args.mode {
        Command::Sidecar(run) => (Mode::Sidecar, run),
        Command::Gateway(run) => (Mode::Gateway, run),
    };
    let config = Config::from_env(mode, run.bootstrap, &ProcessEnv)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        tracing::info!(node = %config.node_id, "starting");
        bowline_proxy::run(config, stopped, Some(log_filter)).await
    })?;
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); the filter can
/// be changed while running through the admin endpoint.
fn logging() -> SetLogFilter {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer())
        .init();
    Arc::new(move |directives: &str| {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// SIGTERM (the kubelet) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
