//! Benchmarks the operator on the local cluster: the release build of
//! `bowline-operator` runs as a process (so its memory is its own), installs
//! the demo profile, and is then poked into no-op reconciles.
//!
//! Prints: time from apply to Ready, API requests for the install and per
//! no-op reconcile, and the operator's resident memory idle and at its peak.
//! Run it with `make bench-operator`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bowline_api::install::MeshInstallation;
use bowline_tests::cluster::{free_port, wait_until};
use bowline_tests::operator::install_crds;
use bowline_tests::{ClusterOptions, LocalCluster};
use clap::Parser;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// The bowline-operator binary to measure (a release build).
    #[arg(long, env = "BOWLINE_OPERATOR_BIN")]
    operator: PathBuf,

    /// Installs (each followed by a deletion) to time.
    #[arg(long, default_value_t = 3)]
    rounds: u32,

    /// No-op reconciles to count requests over.
    #[arg(long, default_value_t = 20)]
    noops: u64,

    /// Injected Deployments running during the canary upgrade.
    #[arg(long, default_value_t = 50)]
    workloads: usize,

    /// How many of them are restarted at a time.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
}

/// The operator process; killed on drop.
struct OperatorProcess {
    child: Child,
    metrics_url: String,
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OperatorProcess {
    fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let output = Command::new("curl")
            .args(["-sf", &self.metrics_url])
            .output()?;
        let text = String::from_utf8(output.stdout)?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Resident and peak resident memory, in MiB.
    fn memory(&self) -> anyhow::Result<(f64, f64)> {
        let usage = bowline_tests::usage::of(self.child.id())?;
        Ok((usage.rss_mb, usage.peak_rss_mb))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = LocalCluster::start(ClusterOptions::default()).await?;
    let client = cluster.client().await?;
    install_crds(&client).await?;

    let port = free_port()?;
    let operator = OperatorProcess {
        child: Command::new(&args.operator)
            .args([
                "--leader-elect=false",
                &format!("--http-address=127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.operator.display()))?,
        metrics_url: format!("http://127.0.0.1:{port}/metrics"),
    };
    wait_until("the operator's metrics endpoint", || async {
        Ok(operator.metric("bowline_operator_reconciles").is_ok())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = operator.memory()?;

    let api: Api<MeshInstallation> = Api::all(client.clone());
    let mut ready_times = Vec::new();
    let mut install_requests = Vec::new();
    for round in 0..args.rounds {
        let name = format!("bench-{round}");
        let mesh: MeshInstallation = serde_json::from_value(json!({
            "apiVersion": "install.bowline.dev/v1alpha1",
            "kind": "MeshInstallation",
            "metadata": {"name": name},
            "spec": {"version": "v0.1.0", "profile": "demo", "namespace": name},
        }))?;
        let before = operator.metric("bowline_operator_api_requests_total")?;
        let started = Instant::now();
        api.create(&PostParams::default(), &mesh).await?;
        wait_until("the demo installation to be Ready", || async {
            let status = api.get(&name).await?.status.unwrap_or_default();
            Ok(status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await?;
        ready_times.push(started.elapsed());
        install_requests.push(operator.metric("bowline_operator_api_requests_total")? - before);
        if round + 1 < args.rounds {
            api.delete(&name, &DeleteParams::default()).await?;
            wait_until("the installation to be deleted", || async {
                Ok(api.get_opt(&name).await?.is_none())
            })
            .await?;
        }
    }

    // No-op reconciles: touch the last installation's metadata.
    let name = format!("bench-{}", args.rounds - 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests_before = operator.metric("bowline_operator_api_requests_total")?;
    let writes_before = operator.metric("bowline_operator_api_writes_total")?;
    let reconciles_before = operator.metric("bowline_operator_reconciles_total")?;
    for i in 0..args.noops {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"bench.bowline.dev/touch": i.to_string()}}}),
            ),
        )
        .await?;
        let target = reconciles_before + (i + 1) as f64;
        wait_until("a reconcile", || async {
            Ok(operator
                .metric("bowline_operator_reconciles_total")
                .unwrap_or(0.0)
                >= target)
        })
        .await?;
    }
    let reconciles = operator.metric("bowline_operator_reconciles_total")? - reconciles_before;
    let requests = operator.metric("bowline_operator_api_requests_total")? - requests_before;
    let writes = operator.metric("bowline_operator_api_writes_total")? - writes_before;
    let (rss, peak) = operator.memory()?;
    if reconciles < 1.0 {
        bail!("no reconcile was observed");
    }

    let mut sorted = ready_times.clone();
    sorted.sort();
    let demo = api.get(&name).await?;
    let resolved = bowline_operator::profile::resolve(&demo.spec)?;
    let objects = bowline_operator::render::render(
        &demo,
        &resolved,
        &bowline_operator::revisions::asked_for(&demo, &resolved)?,
    )?;
    let deployments = objects
        .iter()
        .filter(|o| o.resource.kind == "Deployment")
        .count();
    println!(
        "bowline-operator benchmark (demo profile: {} objects, {deployments} Deployments; {} rounds)",
        objects.len(),
        args.rounds
    );
    println!(
        "  apply -> Ready          median {:.2} s   (each: {})",
        sorted[sorted.len() / 2].as_secs_f64(),
        ready_times
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  API requests, install   {}",
        install_requests
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  no-op reconcile         {:.1} requests, {:.1} writes per reconcile ({reconciles:.0} reconciles)",
        requests / reconciles,
        writes / reconciles
    );
    println!(
        "  operator RSS            {idle_rss:.1} MiB idle, {rss:.1} MiB after, {peak:.1} MiB peak"
    );

    let canary = canary(&client, &operator, args.workloads, args.batch_size).await?;
    let (rss, peak) = operator.memory()?;
    println!(
        "canary upgrade v0.1.0 -> v0.2.0 (default profile, RevisionBased, {} injected Deployments, batches of {})",
        args.workloads, args.batch_size
    );
    println!(
        "  version set -> new revision active   {:.2} s, {:.0} API requests ({:.0} writes)",
        canary.promoted.as_secs_f64(),
        canary.promotion_requests,
        canary.promotion_writes
    );
    println!(
        "  -> every workload restarted, Available   {:.2} s, {:.0} API requests ({:.0} writes)",
        canary.restarted.as_secs_f64(),
        canary.restart_requests,
        canary.restart_writes
    );
    println!("  operator RSS            {rss:.1} MiB after, {peak:.1} MiB peak");
    Ok(())
}

/// What the canary upgrade took.
struct Canary {
    promoted: Duration,
    promotion_requests: f64,
    promotion_writes: f64,
    restarted: Duration,
    restart_requests: f64,
    restart_writes: f64,
}

/// A RevisionBased installation with `workloads` Deployments injected by its
/// first revision, upgraded to the next release with Auto restarts.
///
/// No injection webhook serves on this machine, so the Deployments' pods
/// carry what injection leaves (the revision label, the status annotation)
/// and opt out of the registered webhooks; after a restart they still say
/// the old revision, so "restarted" is measured from the installation's
/// restart status, not from the pods' labels.
async fn canary(
    client: &kube::Client,
    operator: &OperatorProcess,
    workloads: usize,
    batch_size: usize,
) -> anyhow::Result<Canary> {
    use bowline_api::install::MeshInstallationStatus;
    use k8s_openapi::api::apps::v1::Deployment;

    let name = "bench-canary";
    let apps = "bench-apps";
    let api: Api<MeshInstallation> = Api::all(client.clone());
    let mesh: MeshInstallation = serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": name},
        "spec": {
            "version": "v0.1.0",
            "profile": "default",
            "namespace": name,
            "updateStrategy": {
                "type": "RevisionBased",
                "workloads": {"restart": "Auto", "batchSize": batch_size, "batchTimeout": "2m"},
            },
        },
    }))?;
    api.create(&PostParams::default(), &mesh).await?;
    let status = |api: Api<MeshInstallation>| async move {
        Ok::<MeshInstallationStatus, kube::Error>(api.get(name).await?.status.unwrap_or_default())
    };
    wait_until("the canary installation to be Ready", || async {
        let status = status(api.clone()).await?;
        Ok(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await?;

    bowline_tests::cluster::create_namespace(client, apps, json!({})).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), apps);
    for i in 0..workloads {
        let app = format!("app-{i:02}");
        deployments
            .create(
                &PostParams::default(),
                &serde_json::from_value(bowline_tests::operator::injected_deployment(
                    &app,
                    "bench-canary-v0-1-0",
                ))?,
            )
            .await?;
    }
    wait_until("the workloads to count on the first revision", || async {
        let status = status(api.clone()).await?;
        Ok(status
            .revisions
            .and_then(|r| r.items.into_iter().next())
            .is_some_and(|r| r.workloads == workloads as i64))
    })
    .await?;

    let requests = || operator.metric("bowline_operator_api_requests_total");
    let writes = || operator.metric("bowline_operator_api_writes_total");
    let (requests_before, writes_before) = (requests()?, writes()?);
    let started = Instant::now();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"version": "v0.2.0"}})),
    )
    .await?;
    wait_until("the new revision to be active", || async {
        Ok(status(api.clone()).await?.active_revision.as_deref() == Some("bench-canary-v0-2-0"))
    })
    .await?;
    let promoted = started.elapsed();
    let (promotion_requests, promotion_writes) =
        (requests()? - requests_before, writes()? - writes_before);
    // 50 workloads in batches of 10 each waiting to be Available: longer
    // than one default wait.
    for _ in 0..5 {
        let done = wait_until("every workload to be restarted", || async {
            let status = status(api.clone()).await?;
            Ok(status
                .workload_restart
                .is_some_and(|r| r.restarted == workloads as i32 && r.batch_finished.is_some()))
        })
        .await;
        if done.is_ok() {
            break;
        }
    }
    let restart = status(api.clone()).await?.workload_restart;
    if !restart
        .as_ref()
        .is_some_and(|r| r.restarted == workloads as i32 && r.batch_finished.is_some())
    {
        bail!("the restarts did not finish: {restart:#?}");
    }
    Ok(Canary {
        promoted,
        promotion_requests,
        promotion_writes,
        restarted: started.elapsed(),
        restart_requests: requests()? - requests_before,
        restart_writes: writes()? - writes_before,
    })
}
