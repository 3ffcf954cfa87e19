//! The operator's OLM bundle (config/olm/): it is what `make olm` makes from
//! the chart, RBAC, CRDs and samples; the operator framework's validators
//! (default and operatorframework suites) find nothing wrong with it; and
//! what OLM would do with it works — its CRDs applied, its permissions bound
//! to the ServiceAccount, the operator run as that account with the CSV's
//! settings installs a mesh.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, ensure};
use bowline_operator::controller::Options;
use bowline_tests::LocalCluster;
use bowline_tests::binaries::tool;
use bowline_tests::cluster::{create_namespace, service_account_token, wait_established};
use bowline_tests::olm;
use bowline_tests::operator::{Leader, Operator, create_mesh, wait_ready};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const NAMESPACE: &str = "bowline-olm";

fn csv() -> anyhow::Result<Value> {
    let path = olm::dir().join("manifests/bowline-operator.clusterserviceversion.yaml");
    Ok(serde_saphyr::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn the_committed_bundle_is_what_make_olm_makes() -> anyhow::Result<()> {
    let dir = olm::dir();
    let made = olm::bundle()?;
    for file in &made {
        let committed = std::fs::read_to_string(dir.join(&file.path)).unwrap_or_default();
        ensure!(
            committed == file.contents,
            "config/olm/{} is stale: run `make olm` and commit the result",
            file.path.display()
        );
    }
    // Nothing else in the bundle's folders: a file OLM would load that no
    // longer comes from anywhere.
    for folder in ["manifests", "metadata"] {
        for entry in std::fs::read_dir(dir.join(folder))? {
            let path = PathBuf::from(folder).join(entry?.file_name());
            ensure!(
                made.iter().any(|f| f.path == path),
                "config/olm/{} is not part of the bundle `make olm` makes: delete it",
                path.display()
            );
        }
    }
    Ok(())
}

#[test]
fn the_operator_framework_validators_pass() -> anyhow::Result<()> {
    let validator = tool("olm/build.sh")?;
    let output = Command::new(validator)
        .arg(olm::dir())
        .arg("1.33.0")
        .output()?;
    let findings = String::from_utf8(output.stdout)?;
    ensure!(
        output.status.success(),
        "the bundle is invalid:\n{findings}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One warning is expected and wrong: the deprecated-API check reads
    // RBAC rules' resource names (cronjobs, events, ...) as the removed
    // beta versions of those APIs, but a rule names no version.
    let unexpected: Vec<&str> = findings
        .lines()
        .filter(|line| {
            !(line.contains("deprecated and removed")
                && line.contains("StrategySpec.ClusterPermissions"))
        })
        .collect();
    ensure!(
        unexpected.is_empty(),
        "the validators warn:\n{}",
        unexpected.join("\n")
    );
    Ok(())
}

#[test]
fn the_csv_grants_no_crd_writes_and_installs_cluster_wide() -> anyhow::Result<()> {
    let csv = csv()?;
    let install = &csv["spec"]["install"]["spec"];
    let rules = install["clusterPermissions"][0]["rules"]
        .as_array()
        .context("cluster permissions")?;
    ensure!(
        !rules.iter().any(olm::writes_crds),
        "OLM owns the CRDs: the CSV grants no CRD writes"
    );
    let env = &install["deployments"][0]["spec"]["template"]["spec"]["containers"][0]["env"];
    ensure!(
        env.as_array()
            .context("the container's environment")?
            .contains(&json!({"name": "BOWLINE_OPERATOR_MANAGE_CRDS", "value": "false"})),
        "{env}"
    );
    let modes = csv["spec"]["installModes"]
        .as_array()
        .context("install modes")?;
    ensure!(
        modes
            .iter()
            .all(|m| (m["type"] == "AllNamespaces") == (m["supported"] == true)),
        "the mesh is cluster-wide: AllNamespaces only ({modes:?})"
    );
    Ok(())
}

/// What OLM does when it installs the bundle, done by hand: the CRDs, then a
/// ClusterRole and a Role from the CSV's permissions bound to the operator's
/// ServiceAccount. The operator then runs as that account, as the CSV's
/// Deployment says (leader election on, CRDs left alone), and installs a
/// mesh.
#[tokio::test]
async fn an_operator_with_the_csvs_permissions_installs_a_mesh() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let manifests = olm::dir().join("manifests");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("olm").force();
    for entry in std::fs::read_dir(&manifests)? {
        let text = std::fs::read_to_string(entry?.path())?;
        let object: Value = serde_saphyr::from_str(&text)?;
        if object["kind"] == "CustomResourceDefinition" {
            let crd: CustomResourceDefinition = serde_json::from_value(object)?;
            let name = crd.metadata.name.clone().context("a CRD name")?;
            crds.patch(&name, &apply, &Patch::Apply(&crd)).await?;
            wait_established(&crds, &name).await?;
        }
    }

    create_namespace(&client, NAMESPACE, json!({})).await?;
    let account = "bowline-operator";
    let token = service_account_token(&client, NAMESPACE, account, None).await?;
    let install = &csv()?["spec"]["install"]["spec"];
    let subjects = json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]);
    let role_ref = |kind: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": "bowline-olm"});
    let metadata = json!({"name": "bowline-olm"});
    create::<ClusterRole>(
        Api::all(client.clone()),
        json!({"metadata": metadata, "rules": install["clusterPermissions"][0]["rules"]}),
    )
    .await?;
    create::<ClusterRoleBinding>(
        Api::all(client.clone()),
        json!({"metadata": metadata, "roleRef": role_ref("ClusterRole"), "subjects": subjects}),
    )
    .await?;
    create::<Role>(
        Api::namespaced(client.clone(), NAMESPACE),
        json!({"metadata": metadata, "rules": install["permissions"][0]["rules"]}),
    )
    .await?;
    create::<RoleBinding>(
        Api::namespaced(client.clone(), NAMESPACE),
        json!({"metadata": metadata, "roleRef": role_ref("Role"), "subjects": subjects}),
    )
    .await?;

    let options = Options {
        manage_crds: false,
        ..Options::default()
    };
    let leader = Leader {
        namespace: NAMESPACE.into(),
        identity: "bowline-operator-olm".into(),
    };
    let _operator = Operator::start_with(
        cluster.config_with_token(&token).await?,
        Some(leader),
        options,
    )?;
    let meshes = create_mesh(
        &client,
        "olm-mesh",
        json!({"version": "v0.1.0", "profile": "minimal"}),
    )
    .await?;
    wait_ready(&meshes, "olm-mesh").await?;
    Ok(())
}

async fn create<K>(api: Api<K>, object: Value) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    api.create(&PostParams::default(), &serde_json::from_value(object)?)
        .await?;
    Ok(())
}
