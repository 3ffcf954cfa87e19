//! The operator's Helm chart (config/helm/bowline-operator) with the real
//! helm, built from its Go module (`make helm`): it lints, its ClusterRole
//! is config/rbac's and its CRDs are config/crd's, it installs into the
//! local cluster, the operator running as the chart's ServiceAccount then
//! installs a mesh, an upgrade applies new values, and an uninstall leaves
//! nothing but the CRDs (Helm never deletes what `crds/` installed).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, ensure};
use bowline_api::install::MeshInstallation;
use bowline_tests::LocalCluster;
use bowline_tests::binaries::tool;
use bowline_tests::cluster::{service_account_token, wait_until};
use bowline_tests::manifests::{KUBE_VERSION, chart_dir, documents, read, repo};
use bowline_tests::operator::{Operator, create_mesh, wait_ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use serde_json::json;

const NAMESPACE: &str = "bowline-helm";

/// helm, with its own state in `home` and the cluster's kubeconfig.
fn helm(cluster: &LocalCluster, home: &Path) -> anyhow::Result<Command> {
    let binary = tool("helm/build.sh")?;
    let mut command = Command::new(binary);
    command
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(command)
}

fn run(mut command: Command) -> anyhow::Result<String> {
    let output = command.output()?;
    ensure!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test]
async fn the_chart_installs_the_operator_which_installs_a_mesh() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let home = tempfile::tempdir()?;

    // Lint, and render as `helm install` would.
    let mut lint = helm(cluster, home.path())?;
    lint.arg("lint").arg(chart_dir());
    run(lint)?;
    let mut template = helm(cluster, home.path())?;
    template
        .args([
            "template",
            "bowline",
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ])
        .arg(chart_dir());
    let rendered = documents(&run(template)?)?;
    let kinds: Vec<&str> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        ensure!(
            kinds.contains(&kind),
            "the chart renders a {kind}: {kinds:?}"
        );
    }
    // The ClusterRole is config/rbac's, rule for rule.
    let rbac = read(&repo().join("config/rbac/role.yaml"))?;
    let role = rendered
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .context("a ClusterRole")?;
    ensure!(
        role["rules"] == rbac[0]["rules"],
        "the chart's ClusterRole differs from config/rbac/role.yaml"
    );
    // Its CRDs are config/crd's, file for file.
    for entry in std::fs::read_dir(repo().join("config/crd"))? {
        let path = entry?.path();
        let name = path.file_name().context("a name")?;
        let copy = chart_dir().join("crds").join(name);
        ensure!(
            std::fs::read(&copy).ok() == Some(std::fs::read(&path)?),
            "{} differs from {}: copy config/crd/ into the chart's crds/",
            copy.display(),
            path.display()
        );
    }
    let deployment = rendered
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("a Deployment")?;
    ensure!(
        deployment["spec"]["replicas"] == json!(2),
        "two replicas: {deployment}"
    );

    // Install into the cluster.
    let mut install = helm(cluster, home.path())?;
    install
        .args([
            "install",
            "bowline",
            "--namespace",
            NAMESPACE,
            "--create-namespace",
        ])
        .arg(chart_dir());
    run(install)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    ensure!(
        crds.get_opt("meshinstallations.install.bowline.dev")
            .await?
            .is_some()
    );
    ensure!(
        crds.get_opt("virtualservices.networking.istio.io")
            .await?
            .is_some()
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    ensure!(
        deployments
            .get("bowline-operator")
            .await?
            .spec
            .and_then(|s| s.replicas)
            == Some(2)
    );

    // No container runs here: the operator runs in-process as the chart's
    // ServiceAccount, with exactly the permissions the chart grants.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let token = service_account_token(&client, NAMESPACE, "bowline-operator", None).await?;
    let operator = Operator::start(cluster.config_with_token(&token).await?, None)?;
    let meshes: Api<MeshInstallation> = create_mesh(
        &client,
        "helm-mesh",
        json!({"version": "v0.1.0", "profile": "minimal"}),
    )
    .await?;
    wait_ready(&meshes, "helm-mesh").await?;
    drop(operator);

    // Upgrade with new values.
    let mut upgrade = helm(cluster, home.path())?;
    upgrade
        .args([
            "upgrade",
            "bowline",
            "--namespace",
            NAMESPACE,
            "--set",
            "replicaCount=3",
            "--set",
            "log.format=json",
            "--set",
            "watchNamespaces={shop,payments}",
        ])
        .arg(chart_dir());
    run(upgrade)?;
    let upgraded = deployments.get("bowline-operator").await?;
    ensure!(upgraded.spec.as_ref().and_then(|s| s.replicas) == Some(3));
    let env = serde_json::to_string(
        &upgraded
            .spec
            .and_then(|s| s.template.spec)
            .map(|s| s.containers[0].env.clone()),
    )?;
    ensure!(
        env.contains("BOWLINE_OPERATOR_LOG_FORMAT") && env.contains("json"),
        "{env}"
    );
    ensure!(
        env.contains(r#""name":"BOWLINE_OPERATOR_WATCH_NAMESPACES","value":"shop,payments""#),
        "{env}"
    );

    // Uninstall: everything goes but the CRDs.
    let _ = meshes.delete("helm-mesh", &Default::default()).await;
    let mut uninstall = helm(cluster, home.path())?;
    uninstall.args(["uninstall", "bowline", "--namespace", NAMESPACE, "--wait"]);
    run(uninstall)?;
    let roles: Api<ClusterRole> = Api::all(client.clone());
    wait_until("the chart's objects to be gone", || async {
        Ok(deployments.get_opt("bowline-operator").await?.is_none()
            && accounts.get_opt("bowline-operator").await?.is_none()
            && roles.get_opt("bowline-operator").await?.is_none())
    })
    .await?;
    ensure!(
        crds.get_opt("meshinstallations.install.bowline.dev")
            .await?
            .is_some(),
        "Helm leaves the CRDs it installed from crds/"
    );
    Ok(())
}
