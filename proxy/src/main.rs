//! `bowline-proxy`: the sidecar and gateway proxy.

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Context;
use bowline_proxy::admin::SetLogFilter;
use bowline_proxy::capture::Capture;
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
    /// Writes the iptables rules that send a pod's TCP through its
    /// sidecar (istio-iptables' flags), in the current network namespace.
    Init(InitArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    #[command(flatten)]
    capture: Capture,
    /// Print the rules (iptables-restore input) instead of writing them.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Remove the rules an earlier run wrote, and nothing else.
    #[arg(long, conflicts_with = "dry_run")]
    cleanup: bool,
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
        Command::Init(init) => return capture(init),
    };
    let config = Config::from_env(mode, run.bootstrap, &ProcessEnv)?;
    // One worker: everything on this thread, as Envoy's one worker —
    // no hand-offs between threads, no parking a second one.
    let mut builder = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.workers);
        builder
    };
    let runtime = builder
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

fn capture(init: InitArgs) -> anyhow::Result<()> {
    if init.cleanup {
        Capture::cleanup()?;
        tracing::info!("capture rules removed");
    } else if init.dry_run {
        print!("{}", init.capture.rules()?);
    } else {
        init.capture.apply()?;
        tracing::info!("capture rules written");
    }
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
