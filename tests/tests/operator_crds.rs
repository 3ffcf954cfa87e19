//! The operator brings the cluster's CRDs up to its release at start-up
//! (Helm never upgrades a chart's CRDs): an older CRD is replaced by its
//! own, a missing one created, and one from a newer release left alone.
//! The operator runs under config/rbac's ServiceAccount token.

use anyhow::ensure;
use bowline_api::crds::{VERSION, VERSION_ANNOTATION};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::{Operator, install_crds, operator_token};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

const VIRTUAL_SERVICES: &str = "virtualservices.networking.istio.io";
const DESTINATION_RULES: &str = "destinationrules.networking.istio.io";
const SIDECARS: &str = "sidecars.networking.istio.io";

fn release(crd: &CustomResourceDefinition) -> Option<String> {
    crd.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VERSION_ANNOTATION).cloned())
}

#[tokio::test]
async fn older_crds_are_upgraded_and_newer_ones_kept() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mark = |release: &str, short: &str| {
        json!({
            "metadata": {"annotations": {VERSION_ANNOTATION: release}},
            "spec": {"names": {"shortNames": [short]}},
        })
    };
    // An older release's VirtualService CRD, a newer release's
    // DestinationRule CRD, and no Sidecar CRD.
    crds.patch(
        VIRTUAL_SERVICES,
        &PatchParams::default(),
        &Patch::Merge(mark("0.0.1", "oldvs")),
    )
    .await?;
    crds.patch(
        DESTINATION_RULES,
        &PatchParams::default(),
        &Patch::Merge(mark("99.0.0", "newdr")),
    )
    .await?;
    crds.delete(SIDECARS, &DeleteParams::default()).await?;
    wait_until("the Sidecar CRD to be gone", || async {
        Ok(crds.get_opt(SIDECARS).await?.is_none())
    })
    .await?;

    let token = operator_token(cluster, &client).await?;
    let _operator = Operator::start(cluster.config_with_token(&token).await?, None)?;

    wait_until("the Sidecar CRD to be created again", || async {
        Ok(crds
            .get_opt(SIDECARS)
            .await?
            .is_some_and(|c| release(&c).as_deref() == Some(VERSION)))
    })
    .await?;
    let upgraded = crds.get(VIRTUAL_SERVICES).await?;
    ensure!(
        release(&upgraded).as_deref() == Some(VERSION),
        "upgraded: {:?}",
        release(&upgraded)
    );
    ensure!(
        upgraded.spec.names.short_names == Some(vec!["vs".to_string()]),
        "the operator's definition replaced the old one: {:?}",
        upgraded.spec.names.short_names
    );
    let kept = crds.get(DESTINATION_RULES).await?;
    ensure!(
        release(&kept).as_deref() == Some("99.0.0"),
        "not downgraded: {:?}",
        release(&kept)
    );
    ensure!(kept.spec.names.short_names == Some(vec!["newdr".to_string()]));
    Ok(())
}
