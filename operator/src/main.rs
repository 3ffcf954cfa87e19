//! `bowline-operator`: runs the operator, or prints what it would apply.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use bowline_api::install::MeshInstallation;
use bowline_operator::metrics::Metrics;
use bowline_operator::{controller, leader, profile, release, render};
use clap::{Parser, Subcommand};
use kube::runtime::events::Reporter;

#[derive(Debug, Parser)]
#[command(
    name = "bowline-operator",
    about = "Installs and upgrades the Bowline service mesh"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    /// Without a subcommand, the operator runs.
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every object a MeshInstallation file would make, as YAML.
    Render {
        /// The MeshInstallation, as YAML.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print the CustomResourceDefinitions the operator serves.
    Crds,
    /// List the releases the operator can install.
    Versions,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "BOWLINE_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http_address: SocketAddr,

    /// Take a Lease before reconciling, so that only one replica writes.
    #[arg(long, env = "BOWLINE_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// The namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "bowline-system")]
    namespace: String,

    /// This replica's name in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Bring the cluster's CRDs up to this release at start-up; off where
    /// OLM owns them.
    #[arg(long, env = "BOWLINE_OPERATOR_MANAGE_CRDS", default_value_t = true, action = clap::ArgAction::Set)]
    manage_crds: bool,

    /// The namespaces whose workloads count as using a revision and are
    /// restarted onto a new one, comma-separated; every namespace if unset.
    #[arg(long, env = "BOWLINE_OPERATOR_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,

    /// Log lines as text for people or JSON for log pipelines; the level
    /// comes from RUST_LOG (default `info`).
    #[arg(long, env = "BOWLINE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(command) = args.command else {
        return run(args.run).await;
    };
    match command {
        Command::Render { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut installation: MeshInstallation = serde_saphyr::from_str(&text)
                .with_context(|| format!("{} is not a MeshInstallation", file.display()))?;
            installation
                .metadata
                .uid
                .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
            let resolved = profile::resolve(&installation.spec)?;
            let objects = render::render(
                &installation,
                &resolved,
                &bowline_operator::revisions::asked_for(&installation, &resolved)?,
            )?;
            print!("{}", render::to_yaml(&objects)?);
            Ok(())
        }
        Command::Crds => {
            for crd in bowline_api::crds::all() {
                print!("---\n{}", bowline_api::crds::to_yaml(&crd)?);
            }
            Ok(())
        }
        Command::Versions => {
            for release in release::all() {
                println!("{}\t{}", release.version, release.tag);
            }
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    let metrics = Arc::new(Metrics::default());
    let config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API")?;
    let client = bowline_operator::counting_client(config, Arc::clone(&metrics))?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("bowline-operator-{}", std::process::id()));

    let served = Arc::clone(&metrics);
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(served.encode())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route("/readyz", get(|| std::future::ready("ok")));
    let listener = tokio::net::TcpListener::bind(args.http_address)
        .await
        .with_context(|| format!("listening on {}", args.http_address))?;
    tracing::info!(address = %args.http_address, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let reporter = Reporter {
        controller: "bowline-operator".into(),
        instance: Some(identity.clone()),
    };
    let options = controller::Options {
        manage_crds: args.manage_crds,
        watch_namespaces: args
            .watch_namespaces
            .into_iter()
            .map(|ns| ns.trim().to_string())
            .filter(|ns| !ns.is_empty())
            .collect(),
    };
    if !args.leader_elect {
        controller::run(client, metrics, reporter, options).await;
        return Ok(());
    }

    leader::run_as_leader(
        client.clone(),
        &args.namespace,
        &identity,
        controller::run(client, metrics, reporter, options),
    )
    .await?;
    Ok(())
}
