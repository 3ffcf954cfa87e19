//! Running the Bowline operator against a local cluster, in-process, with
//! its metrics at hand (API requests included).

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use anyhow::Context as _;
use bowline_api::install::{MeshInstallation, MeshInstallationStatus};
use bowline_operator::metrics::Metrics;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Client, Config};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::Error;
use crate::cluster::{wait_established, wait_until};

/// Leader election settings for an instance.
#[derive(Clone, Debug)]
pub struct Leader {
    pub namespace: String,
    pub identity: String,
}

/// One operator instance on a thread and runtime of its own; dropping it
/// stops it.
#[derive(Debug)]
pub struct Operator {
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Operator {
    /// Starts an instance that talks to the API server as `config` says:
    /// with leader election when `leader` is given.
    pub fn start(config: Config, leader: Option<Leader>) -> Result<Self, Error> {
        Self::start_with(
            config,
            leader,
            bowline_operator::controller::Options::default(),
        )
    }

    /// [`Operator::start`] with the operator's command-line options.
    pub fn start_with(
        config: Config,
        leader: Option<Leader>,
        options: bowline_operator::controller::Options,
    ) -> Result<Self, Error> {
        // Its logs go with the test's output (warnings and up, or RUST_LOG).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let reporter = Reporter {
            controller: "bowline-operator".into(),
            instance: leader.as_ref().map(|l| l.identity.clone()),
        };
        let run_metrics = Arc::clone(&metrics);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = started_tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                // A client's connection pool lives on the runtime that made
                // it: make them here, on the instance's own runtime.
                let clients =
                    bowline_operator::counting_client(config.clone(), Arc::clone(&run_metrics))
                        .and_then(|counted| Ok((counted, kube::Client::try_from(config)?)));
                let (client, lease_client) = match clients {
                    Ok(clients) => clients,
                    Err(e) => {
                        let _ = started_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                let work =
                    bowline_operator::controller::run(client, run_metrics, reporter, options);
                match leader {
                    None => {
                        tokio::select! { _ = work => {}, _ = stopped => {} }
                    }
                    Some(leader) => {
                        // The Lease's own requests are not the controller's:
                        // they go through a client that is not counted.
                        let leading = bowline_operator::leader::run_as_leader(
                            lease_client,
                            &leader.namespace,
                            &leader.identity,
                            work,
                        );
                        tokio::select! {
                            result = leading => {
                                if let Err(e) = result {
                                    tracing::warn!(error = %e, "operator instance stopped leading");
                                }
                            }
                            _ = stopped => {}
                        }
                    }
                }
            });
        });
        started_rx
            .recv()
            .unwrap_or_else(|_| Err("the operator thread died".into()))
            .map_err(Error::Shared)?;
        Ok(Self {
            metrics,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Write requests this instance has sent so far.
    pub fn writes(&self) -> u64 {
        self.metrics.api_writes.get()
    }

    /// Reconciles this instance has finished so far.
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every object the operator makes for a MeshInstallation, as
/// `bowline-operator render` prints them, without a cluster.
pub fn render(installation: Value) -> anyhow::Result<Vec<Value>> {
    let mut installation: MeshInstallation = serde_json::from_value(installation)?;
    installation
        .metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    let resolved = bowline_operator::profile::resolve(&installation.spec)?;
    let revisions = bowline_operator::revisions::asked_for(&installation, &resolved)?;
    let objects = bowline_operator::render::render(&installation, &resolved, &revisions)?;
    crate::manifests::documents(&bowline_operator::render::to_yaml(&objects)?)
}

/// Applies Bowline's CRDs and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in bowline_api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("bowline-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        wait_established(&crds, &name).await?;
    }
    Ok(())
}

/// The operator's namespace, where config/rbac puts its ServiceAccount.
pub const OPERATOR_NAMESPACE: &str = "bowline-system";

/// Applies config/rbac with the built kubectl, as an administrator would,
/// and returns a token of the operator's ServiceAccount: a client with it
/// may do exactly what that RBAC grants.
pub async fn operator_token(
    cluster: &crate::LocalCluster,
    client: &Client,
) -> Result<String, Error> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::PostParams;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(OPERATOR_NAMESPACE).await?.is_none() {
        let namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": OPERATOR_NAMESPACE}}))?;
        match namespaces.create(&PostParams::default(), &namespace).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let rbac = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rbac");
    let output = cluster
        .kubectl()
        .args(["apply", "--server-side", "-f"])
        .arg(&rbac)
        .output()
        .map_err(|e| Error::Spawn {
            name: "kubectl".into(),
            source: e,
        })?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "kubectl apply -f {}: {}",
            rbac.display(),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    crate::cluster::service_account_token(client, OPERATOR_NAMESPACE, "bowline-operator", None)
        .await
}

/// The local cluster with one operator for every test of the binary,
/// started on first use: the CRDs and config/rbac applied, the operator
/// authenticated as its own ServiceAccount, so everything a test sees it do,
/// that RBAC allows.
pub fn shared() -> anyhow::Result<&'static crate::LocalCluster> {
    static STARTED: OnceLock<Result<Operator, String>> = OnceLock::new();
    let cluster = crate::LocalCluster::shared()?;
    STARTED
        .get_or_init(|| {
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
                runtime
                    .block_on(async {
                        let client = cluster.client().await?;
                        install_crds(&client).await?;
                        let token = operator_token(cluster, &client).await?;
                        Operator::start(cluster.config_with_token(&token).await?, None)
                    })
                    .map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("the operator start-up thread panicked".into()))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cluster)
}

/// A MeshInstallation named `name` installing into a namespace of the same
/// name (unique per test).
pub async fn create_mesh(
    client: &Client,
    name: &str,
    spec: Value,
) -> anyhow::Result<Api<MeshInstallation>> {
    let api: Api<MeshInstallation> = Api::all(client.clone());
    let mut spec = spec;
    spec["namespace"] = json!(name);
    let mesh: MeshInstallation = serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": name},
        "spec": spec,
    }))?;
    api.create(&PostParams::default(), &mesh).await?;
    Ok(api)
}

pub fn condition<'a>(status: &'a MeshInstallationStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

pub async fn wait_ready(
    api: &Api<MeshInstallation>,
    name: &str,
) -> anyhow::Result<MeshInstallationStatus> {
    let waited = wait_until(&format!("MeshInstallation {name} to be Ready"), || async {
        let mesh = api.get(name).await?;
        let status = mesh.status.unwrap_or_default();
        Ok(condition(&status, "Ready") == Some("True")
            && status.observed_generation == mesh.metadata.generation)
    })
    .await;
    let status = api.get_status(name).await?.status.unwrap_or_default();
    waited.with_context(|| format!("its status: {:#?}", status.conditions))?;
    Ok(status)
}

/// What stands for an injected workload in tests: a pod carrying what
/// injection by `revision` leaves (the revision label, the
/// `sidecar.istio.io/status` annotation), opted out of the injection
/// webhooks the operator registers for real — nothing serves those where
/// the API server could reach it, and it would dial their Service's
/// ClusterIP.
pub fn injected_pod(name: &str, revision: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "labels": {"app": name, "istio.io/rev": revision, "sidecar.istio.io/inject": "false"},
            "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    })
}

/// A one-replica Deployment of [`injected_pod`]s.
pub fn injected_deployment(name: &str, revision: &str) -> Value {
    let mut template = injected_pod(name, revision);
    if let Some(metadata) = template["metadata"].as_object_mut() {
        metadata.remove("name");
    }
    json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": template,
        },
    })
}
