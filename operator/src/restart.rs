//! Moving injected workloads to the active revision, when
//! `spec.updateStrategy.workloads.restart` is Auto: their Deployments,
//! StatefulSets and DaemonSets are restarted a batch at a time (the pod
//! template's `kubectl.kubernetes.io/restartedAt` annotation, as
//! `kubectl rollout restart` does), each batch must become Available within
//! the batch timeout, and a pause separates batches. A batch that does not
//! make it stops the restarts until the spec changes, and the status names
//! the workload.
//!
//! Progress lives in the installation's status, so a restarted operator
//! carries on where it was; a workload's template records the revision it
//! was restarted for, so none is restarted twice for the same revision.

use std::collections::BTreeSet;
use std::time::Duration;

use bowline_api::install::{MeshInstallation, WorkloadRestart, WorkloadRestartStatus};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::controller::Context;
use crate::error::{Error, Result};
use crate::observe::Observed;
use crate::revisions::parse_duration;

/// The annotation `kubectl rollout restart` sets on a pod template.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// The revision a workload was restarted for.
pub const RESTARTED_FOR: &str = "install.bowline.dev/restarted-for";

/// How often a batch in flight is looked at.
const POLL: Duration = Duration::from_secs(2);

/// A restartable workload, found through its pods' owners.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Workload {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The workload that runs `pod`: a Deployment through its ReplicaSet (whose
/// name is the Deployment's and the pod template hash), a StatefulSet or a
/// DaemonSet. Bare pods and Jobs are not restarted.
pub fn owner(pod: &PartialObjectMeta<Pod>) -> Option<Workload> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))?;
    let namespace = pod.namespace()?;
    let (kind, name) = match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.labels().get("pod-template-hash")?;
            let name = owner.name.strip_suffix(&format!("-{hash}"))?;
            (Kind::Deployment, name.to_string())
        }
        "StatefulSet" => (Kind::StatefulSet, owner.name.clone()),
        "DaemonSet" => (Kind::DaemonSet, owner.name.clone()),
        _ => return None,
    };
    Some(Workload {
        kind,
        namespace,
        name,
    })
}

/// What a step of restarts decided.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub status: Option<WorkloadRestartStatus>,
    /// When to look again.
    pub requeue: Option<Duration>,
}

/// One step: check the batch in flight, or start the next one.
pub async fn step(
    installation: &MeshInstallation,
    observed: &Observed,
    ctx: &Context,
    now: &Time,
) -> Result<Option<Step>> {
    let Some(settings) = observed
        .resolved
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.workloads.as_ref())
        .filter(|w| w.restart == Some(WorkloadRestart::Auto))
    else {
        return Ok(None);
    };
    let batch_size = settings.batch_size.unwrap_or(1).max(1) as usize;
    let pause = parse_duration(
        "spec.updateStrategy.workloads.pauseBetweenBatches",
        settings.pause_between_batches.as_deref().unwrap_or("0s"),
    )?;
    let timeout_text = settings.batch_timeout.as_deref().unwrap_or("5m");
    let timeout = parse_duration("spec.updateStrategy.workloads.batchTimeout", timeout_text)?;
    let active = &observed.plan.active;
    let spec_changed = installation.metadata.generation
        != installation
            .status
            .as_ref()
            .and_then(|s| s.observed_generation);
    let mut status = installation
        .status
        .as_ref()
        .and_then(|s| s.workload_restart.clone())
        .filter(|s| s.revision == *active)
        .unwrap_or_else(|| WorkloadRestartStatus {
            revision: active.clone(),
            ..Default::default()
        });
    if status.failed.is_some() {
        if !spec_changed {
            return Ok(Some(Step {
                status: Some(status),
                requeue: None,
            }));
        }
        // A changed spec is the signal to try again.
        status.failed = None;
        status.batch_finished = Some(MicroTime(now.0));
    }

    if !status.batch.is_empty() && status.batch_finished.is_none() {
        let started = status.batch_started.as_ref().map_or(now.0, |t| t.0);
        let elapsed = Duration::try_from(now.0.duration_since(started)).unwrap_or_default();
        // The first one still rolling is enough to know: one read per look.
        let mut waiting = Vec::new();
        for workload in status.batch.iter().filter_map(|entry| parse(entry)) {
            if !available(&ctx.client, &workload).await? {
                waiting.push(workload);
                break;
            }
        }
        if waiting.is_empty() {
            status.batch_finished = Some(MicroTime(now.0));
        } else if elapsed >= timeout {
            status.failed = Some(format!(
                "{} did not become Available within {} of its restart; fix it and change the \
                 spec (or restart it by hand) to go on",
                waiting[0], timeout_text
            ));
            return Ok(Some(Step {
                status: Some(status),
                requeue: None,
            }));
        } else {
            return Ok(Some(Step {
                status: Some(status),
                requeue: Some(POLL),
            }));
        }
    }

    if let Some(finished) = &status.batch_finished {
        let since = Duration::try_from(now.0.duration_since(finished.0)).unwrap_or_default();
        if since < pause {
            return Ok(Some(Step {
                status: Some(status),
                requeue: Some(pause - since),
            }));
        }
    }

    let outdated: BTreeSet<Workload> = observed
        .revisions
        .iter()
        .filter(|r| r.name != *active)
        .flat_map(|r| ctx.usage.injected_pods(&r.name))
        // A pod made from a template already restarted for this revision
        // (it carries the template's annotation) needs nothing more.
        .filter(|pod| pod.annotations().get(RESTARTED_FOR) != Some(active))
        .filter_map(|pod| owner(&pod))
        .collect();
    let mut batch = Vec::new();
    for workload in outdated {
        if batch.len() == batch_size {
            break;
        }
        if restart(&ctx.client, &workload, active, now).await? {
            batch.push(workload);
        }
    }
    if batch.is_empty() {
        let idle = status.restarted == 0;
        return Ok(Some(Step {
            status: (!idle).then_some(status),
            requeue: None,
        }));
    }
    tracing::info!(
        installation = %installation.name_any(),
        revision = %active,
        batch = ?batch.iter().map(ToString::to_string).collect::<Vec<_>>(),
        before = status.restarted,
        "restarting a batch of workloads"
    );
    status.restarted += batch.len() as i32;
    status.batch = batch.iter().map(ToString::to_string).collect();
    status.batch_started = Some(MicroTime(now.0));
    status.batch_finished = None;
    Ok(Some(Step {
        status: Some(status),
        requeue: Some(POLL),
    }))
}

fn parse(entry: &str) -> Option<Workload> {
    let (kind, rest) = entry.split_once(' ')?;
    let (namespace, name) = rest.split_once('/')?;
    let kind = match kind {
        "Deployment" => Kind::Deployment,
        "StatefulSet" => Kind::StatefulSet,
        "DaemonSet" => Kind::DaemonSet,
        _ => return None,
    };
    Some(Workload {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// Restarts `workload` for `revision` unless it already was. Returns
/// whether it restarted it; a workload that is gone is skipped.
async fn restart(
    client: &kube::Client,
    workload: &Workload,
    revision: &str,
    now: &Time,
) -> Result<bool> {
    async fn once<K>(
        client: &kube::Client,
        workload: &Workload,
        revision: &str,
        now: &Time,
        template_annotations: impl Fn(&K) -> Option<String>,
    ) -> Result<bool>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(client.clone(), &workload.namespace);
        let Some(object) = api
            .get_opt(&workload.name)
            .await
            .map_err(Error::kube(format!("reading {workload}")))?
        else {
            return Ok(false);
        };
        if template_annotations(&object).as_deref() == Some(revision) {
            return Ok(false);
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT: now.0.to_string(),
            RESTARTED_FOR: revision,
        }}}}});
        api.patch(
            &workload.name,
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(Error::kube(format!("restarting {workload}")))?;
        Ok(true)
    }
    fn restarted_for(
        template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>,
    ) -> Option<String> {
        template?
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get(RESTARTED_FOR)
            .cloned()
    }
    match workload.kind {
        Kind::Deployment => {
            once::<Deployment>(client, workload, revision, now, |d| {
                restarted_for(d.spec.as_ref().map(|s| &s.template))
            })
            .await
        }
        Kind::StatefulSet => {
            once::<StatefulSet>(client, workload, revision, now, |d| {
                restarted_for(d.spec.as_ref().map(|s| &s.template))
            })
            .await
        }
        Kind::DaemonSet => {
            once::<DaemonSet>(client, workload, revision, now, |d| {
                restarted_for(d.spec.as_ref().map(|s| &s.template))
            })
            .await
        }
    }
}

/// Whether the workload has rolled out its current template and every
/// replica is available. A workload that is gone counts as done.
async fn available(client: &kube::Client, workload: &Workload) -> Result<bool> {
    let action = || format!("reading {workload}");
    Ok(match workload.kind {
        Kind::Deployment => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &workload.namespace);
            match api
                .get_opt(&workload.name)
                .await
                .map_err(Error::kube(action()))?
            {
                None => true,
                Some(d) => crate::status::rollout(&d).complete,
            }
        }
        Kind::StatefulSet => {
            let api: Api<StatefulSet> = Api::namespaced(client.clone(), &workload.namespace);
            match api
                .get_opt(&workload.name)
                .await
                .map_err(Error::kube(action()))?
            {
                None => true,
                Some(s) => {
                    let wanted = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let status = s.status.unwrap_or_default();
                    status.observed_generation >= s.metadata.generation
                        && status.updated_replicas.unwrap_or(0) >= wanted
                        && status.ready_replicas.unwrap_or(0) >= wanted
                        && status.current_revision == status.update_revision
                }
            }
        }
        Kind::DaemonSet => {
            let api: Api<DaemonSet> = Api::namespaced(client.clone(), &workload.namespace);
            match api
                .get_opt(&workload.name)
                .await
                .map_err(Error::kube(action()))?
            {
                None => true,
                Some(d) => {
                    let status = d.status.unwrap_or_default();
                    status.observed_generation >= d.metadata.generation
                        && status.updated_number_scheduled.unwrap_or(0)
                            >= status.desired_number_scheduled
                        && status.number_available.unwrap_or(0) >= status.desired_number_scheduled
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(owner_kind: &str, owner_name: &str, hash: Option<&str>) -> PartialObjectMeta<Pod> {
        let mut labels = std::collections::BTreeMap::new();
        if let Some(hash) = hash {
            labels.insert("pod-template-hash".to_string(), hash.to_string());
        }
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("shop".into()),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    kind: owner_kind.into(),
                    name: owner_name.into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_leads_to_its_workload() {
        let deployment = owner(&pod("ReplicaSet", "cart-7d9f8", Some("7d9f8"))).unwrap();
        assert_eq!(deployment.to_string(), "Deployment shop/cart");
        assert_eq!(parse(&deployment.to_string()), Some(deployment));
        let set = owner(&pod("StatefulSet", "db", None)).unwrap();
        assert_eq!(set.to_string(), "StatefulSet shop/db");
        assert_eq!(owner(&pod("Job", "migrate", None)), None);
        assert_eq!(
            owner(&pod("ReplicaSet", "bare-rs", Some("other"))),
            None,
            "a ReplicaSet that no Deployment made"
        );
    }
}
