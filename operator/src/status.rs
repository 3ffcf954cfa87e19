//! Status: the conditions, state and component readiness of a
//! MeshInstallation, computed from what a reconcile did and what the
//! Deployments report. Pure; the controller writes the result.
//!
//! Conditions are kstatus-compatible: `Reconciling` and `Stalled` are the
//! "abnormal-true" ones Argo CD and Flux read, `Reconciled` and `Ready` the
//! ones people read.

use bowline_api::install::{
    ComponentStatus, MeshInstallationSpec, MeshInstallationStatus, MeshRevisionStatus,
    MeshRevisionTagStatus, RevisionsStatus, WorkloadRestartStatus,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::cache::RevisionUsage;
use crate::render::Component;

pub const RECONCILED: &str = "Reconciled";
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const IN_USE: &str = "InUse";
pub const HEALTHY: &str = "Healthy";
pub const WORKLOADS_UPDATED: &str = "WorkloadsUpdated";

/// How the apply step of a reconcile ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    #[default]
    Applied,
    /// The spec must change first (reason, message naming the field).
    Invalid(String),
    /// Worth retrying (reason, message).
    Failed { reason: String, message: String },
}

/// Where a Deployment's rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// The replicas it wants.
    pub wanted: i32,
    pub ready: i32,
    /// Replicas on the current template.
    pub updated: i32,
    /// The controller has seen the current template.
    pub observed: bool,
    /// Available, with every wanted replica updated and ready and no old
    /// one left.
    pub complete: bool,
}

pub fn rollout(deployment: &Deployment) -> Rollout {
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let observed =
        status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    let available = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Available" && c.status == "True");
    Rollout {
        wanted,
        ready,
        updated,
        observed,
        complete: observed
            && available
            && updated >= wanted
            && ready >= wanted
            && status.replicas.unwrap_or(0) == updated,
    }
}

/// One component's readiness from its Deployment's rollout.
pub fn component_status(component: &Component, deployment: Option<&Deployment>) -> ComponentStatus {
    let Some(deployment) = deployment else {
        return ComponentStatus {
            name: component.name.clone(),
            ready: false,
            message: Some(format!(
                "Deployment {} does not exist yet",
                component.deployment
            )),
            ..Default::default()
        };
    };
    let Rollout {
        wanted,
        ready: ready_replicas,
        updated,
        observed,
        complete,
    } = rollout(deployment);
    ComponentStatus {
        name: component.name.clone(),
        ready: complete,
        ready_replicas,
        replicas: wanted,
        message: (!complete).then(|| {
            if !observed {
                "the Deployment's rollout has not started".to_string()
            } else {
                format!("{ready_replicas}/{wanted} replicas ready, {updated} updated")
            }
        }),
    }
}

/// What a reconcile found, for [`compute`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub generation: Option<i64>,
    pub outcome: Outcome,
    /// Each enabled component; the control plane is the asked-for revision's.
    pub components: Vec<ComponentStatus>,
    /// The resolved spec, when it is valid.
    pub resolved: Option<MeshInstallationSpec>,
    /// The revision workloads are injected by.
    pub active_revision: Option<String>,
    /// The revision the spec asks for, while it is not active yet.
    pub waiting_for: Option<String>,
    pub revisions: Option<RevisionsStatus>,
    /// Injected pods on revisions other than the active one, per revision
    /// and its version.
    pub outdated: Vec<(String, String, i64)>,
    pub workload_restart: Option<WorkloadRestartStatus>,
}

/// The new status. `previous` keeps the lastTransitionTime of conditions
/// whose status did not change, so an unchanged reconcile writes nothing.
pub fn compute(
    previous: Option<&MeshInstallationStatus>,
    report: Report,
    now: Time,
) -> MeshInstallationStatus {
    let Report {
        generation,
        outcome,
        components,
        resolved,
        active_revision,
        waiting_for,
        revisions,
        outdated,
        workload_restart,
    } = report;
    let outcome = &outcome;
    let not_ready: Vec<&ComponentStatus> = components.iter().filter(|c| !c.ready).collect();
    let all_ready = not_ready.is_empty();
    let not_ready_message = not_ready
        .iter()
        .map(|c| {
            format!(
                "{}: {}",
                c.name,
                c.message.as_deref().unwrap_or("not ready")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");

    let (reconciled, stalled) = match outcome {
        Outcome::Applied => (
            condition(
                RECONCILED,
                true,
                "ReconcileSucceeded",
                "every object is applied as the spec says",
            ),
            condition(STALLED, false, "ReconcileSucceeded", ""),
        ),
        Outcome::Invalid(message) => (
            condition(RECONCILED, false, "InvalidSpec", message),
            condition(STALLED, true, "InvalidSpec", message),
        ),
        Outcome::Failed { reason, message } => (
            condition(RECONCILED, false, reason, message),
            condition(STALLED, false, reason, "retrying"),
        ),
    };
    let ready = if all_ready {
        condition(
            READY,
            true,
            "ComponentsReady",
            "every enabled component is available",
        )
    } else {
        condition(READY, false, "ComponentsNotReady", &not_ready_message)
    };
    let previous_version = previous.and_then(|p| p.version.clone());
    let asked_version = resolved.as_ref().map(|r| r.version.clone());
    let upgrading = previous_version.is_some() && previous_version != asked_version;
    let reconciling = match outcome {
        Outcome::Invalid(_) => condition(
            RECONCILING,
            false,
            "InvalidSpec",
            "waiting for the spec to change",
        ),
        Outcome::Failed { reason, message } => condition(RECONCILING, true, reason, message),
        _ if waiting_for.is_some() => condition(
            RECONCILING,
            true,
            "WaitingForRevision",
            &format!(
                "revision {} is not Ready yet ({}); revision {} stays active until it is",
                waiting_for.as_deref().unwrap_or_default(),
                if not_ready_message.is_empty() {
                    "its control plane is starting"
                } else {
                    &not_ready_message
                },
                active_revision.as_deref().unwrap_or("none"),
            ),
        ),
        _ if all_ready => condition(RECONCILING, false, "ComponentsReady", ""),
        _ if upgrading => condition(
            RECONCILING,
            true,
            "Upgrading",
            &format!(
                "upgrading from {} to {}: {not_ready_message}",
                previous_version.as_deref().unwrap_or_default(),
                asked_version.as_deref().unwrap_or_default()
            ),
        ),
        _ => condition(RECONCILING, true, "ComponentsNotReady", &not_ready_message),
    };
    let workloads = workloads_condition(
        active_revision.as_deref(),
        &outdated,
        workload_restart.as_ref(),
    );

    let mut conditions = vec![reconciled, ready, reconciling, stalled, workloads];
    let state = finish(
        &mut conditions,
        previous.map(|p| p.conditions.as_slice()),
        generation,
        now,
    );

    let invalid = matches!(outcome, Outcome::Invalid(_));
    let settled = *outcome == Outcome::Applied && all_ready && waiting_for.is_none();
    MeshInstallationStatus {
        observed_generation: generation,
        conditions,
        state: Some(state),
        // With an invalid spec nothing was rendered: keep reporting what runs.
        active_revision: if invalid {
            previous.and_then(|p| p.active_revision.clone())
        } else {
            active_revision
        },
        version: if settled {
            asked_version
        } else {
            previous_version
        },
        revisions: if invalid {
            previous.and_then(|p| p.revisions.clone())
        } else {
            revisions
        },
        workload_restart: if invalid {
            previous.and_then(|p| p.workload_restart.clone())
        } else {
            workload_restart
        },
        components: if invalid {
            previous.map(|p| p.components.clone()).unwrap_or_default()
        } else {
            components
        },
        resolved: resolved.or_else(|| previous.and_then(|p| p.resolved.clone())),
    }
}

/// `WorkloadsUpdated`: whether every injected pod runs the active
/// revision's proxy, and if not, how many do not and what is done about it.
fn workloads_condition(
    active: Option<&str>,
    outdated: &[(String, String, i64)],
    restart: Option<&WorkloadRestartStatus>,
) -> Condition {
    let count: i64 = outdated.iter().map(|(_, _, n)| n).sum();
    if count == 0 {
        return condition(
            WORKLOADS_UPDATED,
            true,
            "WorkloadsOnActiveRevision",
            "every injected workload runs the active revision's proxy",
        );
    }
    let where_ = outdated
        .iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(revision, version, n)| format!("{n} on {version} (revision {revision})"))
        .collect::<Vec<_>>()
        .join(", ");
    let active = active.unwrap_or("the active revision");
    match restart {
        Some(r) if r.failed.is_some() => condition(
            WORKLOADS_UPDATED,
            false,
            "RestartFailed",
            &format!(
                "{count} workloads still on older revisions: {where_}; restarts stopped: {}",
                r.failed.as_deref().unwrap_or_default()
            ),
        ),
        Some(r) => condition(
            WORKLOADS_UPDATED,
            false,
            "Restarting",
            &format!(
                "{count} workloads still on older revisions: {where_}; restarting them in \
                 batches onto {active}, {} restarted so far",
                r.restarted
            ),
        ),
        None => condition(
            WORKLOADS_UPDATED,
            false,
            "WorkloadsOnOldRevision",
            &format!(
                "{count} workloads still on older revisions: {where_}; restart them to move \
                 them to {active} (or set spec.updateStrategy.workloads.restart: Auto)"
            ),
        ),
    }
}

/// A revision's status: Ready from its control plane, InUse from the tags
/// that point at it and what selects it or runs its proxies.
pub fn revision(
    previous: Option<&MeshRevisionStatus>,
    generation: Option<i64>,
    control_plane: &ComponentStatus,
    usage: &RevisionUsage,
    tags: &[String],
    now: Time,
) -> MeshRevisionStatus {
    let ready = if control_plane.ready {
        condition(
            READY,
            true,
            "ControlPlaneReady",
            "its control plane is available",
        )
    } else {
        condition(
            READY,
            false,
            "ControlPlaneNotReady",
            control_plane.message.as_deref().unwrap_or("not ready"),
        )
    };
    let in_use = if usage.workloads > 0 || !usage.namespaces.is_empty() || !tags.is_empty() {
        let list = |items: &[String]| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        };
        let message = format!(
            "{} workloads run its proxy; namespaces selecting it: {}; tags: {}",
            usage.workloads,
            list(&usage.namespaces),
            list(tags),
        );
        condition(IN_USE, true, "InUse", &message)
    } else {
        condition(
            IN_USE,
            false,
            "NotInUse",
            "no tag points at it, no namespace selects it and no pod runs its proxy",
        )
    };
    let mut conditions = vec![
        condition(
            RECONCILED,
            true,
            "ReconcileSucceeded",
            "its objects are applied",
        ),
        ready,
        in_use,
    ];
    let state = finish(
        &mut conditions,
        previous.map(|p| p.conditions.as_slice()),
        generation,
        now,
    );
    MeshRevisionStatus {
        observed_generation: generation,
        conditions,
        state: Some(state),
        workloads: usage.workloads,
        namespaces: usage.namespaces.clone(),
        tags: tags.to_vec(),
    }
}

/// Since when nothing uses a revision, from its status' InUse condition.
pub fn unused_since(status: &MeshRevisionStatus) -> Option<k8s_openapi::jiff::Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == IN_USE && c.status == "False")
        .map(|c| c.last_transition_time.0)
}

/// A tag's status: the revision it points at (none when it is in conflict)
/// and the namespaces that select it.
pub fn tag(
    previous: Option<&MeshRevisionTagStatus>,
    generation: Option<i64>,
    revision: std::result::Result<&str, &str>,
    namespaces: Vec<String>,
    now: Time,
) -> MeshRevisionTagStatus {
    let reconciled = match revision {
        Ok(revision) => condition(
            RECONCILED,
            true,
            "ReconcileSucceeded",
            &format!("namespaces labelled with the tag are injected by revision {revision}"),
        ),
        Err(conflict) => condition(RECONCILED, false, "Conflict", conflict),
    };
    let stalled = match revision {
        Ok(_) => condition(STALLED, false, "ReconcileSucceeded", ""),
        Err(conflict) => condition(STALLED, true, "Conflict", conflict),
    };
    let in_use = if namespaces.is_empty() {
        condition(IN_USE, false, "NotInUse", "no namespace selects it")
    } else {
        condition(
            IN_USE,
            true,
            "InUse",
            &format!("namespaces selecting it: {}", namespaces.join(", ")),
        )
    };
    let mut conditions = vec![reconciled, in_use, stalled];
    let state = finish(
        &mut conditions,
        previous.map(|p| p.conditions.as_slice()),
        generation,
        now,
    );
    MeshRevisionTagStatus {
        observed_generation: generation,
        conditions,
        state: Some(state),
        revision: revision.ok().map(str::to_string),
        namespaces,
    }
}

/// Completes freshly computed conditions and returns the `state`: keeps the
/// lastTransitionTime of conditions whose status did not change (so an
/// unchanged reconcile computes an unchanged status), records the generation,
/// and names the reason of the first of Reconciled and Ready that is not
/// True, or Healthy.
fn finish(
    conditions: &mut [Condition],
    previous: Option<&[Condition]>,
    generation: Option<i64>,
    now: Time,
) -> String {
    for c in conditions.iter_mut() {
        c.last_transition_time = previous
            .and_then(|p| p.iter().find(|o| o.type_ == c.type_))
            .filter(|o| o.status == c.status)
            .map(|o| o.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        c.observed_generation = generation;
    }
    conditions
        .iter()
        .filter(|c| c.type_ == RECONCILED || c.type_ == READY)
        .find(|c| c.status != "True")
        .map(|c| c.reason.clone())
        .unwrap_or_else(|| HEALTHY.into())
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};

    use super::*;

    fn component() -> Component {
        Component {
            name: "controlPlane".into(),
            deployment: "istiod".into(),
        }
    }

    fn deployment(ready: i32, available: bool) -> Deployment {
        Deployment {
            metadata: kube::api::ObjectMeta {
                generation: Some(2),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(2),
                updated_replicas: Some(2),
                ready_replicas: Some(ready),
                conditions: Some(vec![DeploymentCondition {
                    type_: "Available".into(),
                    status: if available { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    fn get<'a>(status: &'a MeshInstallationStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn a_deployment_is_ready_only_when_available_with_every_replica() {
        assert!(component_status(&component(), Some(&deployment(2, true))).ready);
        let half = component_status(&component(), Some(&deployment(1, true)));
        assert!(!half.ready);
        assert_eq!(
            half.message.as_deref(),
            Some("1/2 replicas ready, 2 updated")
        );
        assert!(!component_status(&component(), None).ready);
    }

    #[test]
    fn ready_installation_is_healthy_and_not_reconciling() {
        let ready = component_status(&component(), Some(&deployment(2, true)));
        let status = compute(
            None,
            Report {
                generation: Some(3),
                outcome: Outcome::Applied,
                components: vec![ready],
                ..Default::default()
            },
            at(10),
        );
        assert_eq!(status.state.as_deref(), Some(HEALTHY));
        assert_eq!(get(&status, READY).status, "True");
        assert_eq!(get(&status, RECONCILING).status, "False");
        assert_eq!(get(&status, STALLED).status, "False");
        assert_eq!(get(&status, READY).observed_generation, Some(3));
    }

    #[test]
    fn an_invalid_spec_stalls_and_keeps_the_components_it_had() {
        let ready = component_status(&component(), Some(&deployment(2, true)));
        let before = compute(
            None,
            Report {
                generation: Some(1),
                outcome: Outcome::Applied,
                components: vec![ready],
                ..Default::default()
            },
            at(10),
        );
        let after = compute(
            Some(&before),
            Report {
                generation: Some(2),
                outcome: Outcome::Invalid("spec.version: v9 is unknown".into()),
                components: Vec::new(),
                ..Default::default()
            },
            at(20),
        );
        assert_eq!(get(&after, STALLED).status, "True");
        assert_eq!(get(&after, STALLED).message, "spec.version: v9 is unknown");
        assert_eq!(after.state.as_deref(), Some("InvalidSpec"));
        assert_eq!(after.components, before.components);
        assert_eq!(
            get(&after, READY).last_transition_time,
            at(10),
            "Ready did not change"
        );
        assert_eq!(get(&after, STALLED).last_transition_time, at(20));
    }

    fn report(components: Vec<ComponentStatus>) -> Report {
        Report {
            generation: Some(1),
            components,
            resolved: Some(MeshInstallationSpec {
                version: "v0.2.0".into(),
                ..Default::default()
            }),
            active_revision: Some("m-v0-1-0".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_waiting_revision_is_named_with_the_active_one() {
        let unready = component_status(&component(), Some(&deployment(0, false)));
        let status = compute(
            None,
            Report {
                waiting_for: Some("m-v0-2-0".into()),
                ..report(vec![unready])
            },
            at(10),
        );
        let reconciling = get(&status, RECONCILING);
        assert_eq!(reconciling.reason, "WaitingForRevision");
        assert!(
            reconciling.message.starts_with(
                "revision m-v0-2-0 is not Ready yet (controlPlane: 0/2 replicas ready"
            ),
            "{}",
            reconciling.message
        );
        assert!(
            reconciling
                .message
                .ends_with("revision m-v0-1-0 stays active until it is")
        );
        assert_eq!(status.version, None, "no version has been fully rolled out");
    }

    #[test]
    fn the_version_moves_when_every_component_runs_it() {
        let previous = MeshInstallationStatus {
            version: Some("v0.1.0".into()),
            ..Default::default()
        };
        let rolling = component_status(&component(), Some(&deployment(1, true)));
        let upgrading = compute(Some(&previous), report(vec![rolling]), at(10));
        assert_eq!(get(&upgrading, RECONCILING).reason, "Upgrading");
        assert!(
            get(&upgrading, RECONCILING)
                .message
                .starts_with("upgrading from v0.1.0 to v0.2.0: ")
        );
        assert_eq!(upgrading.version.as_deref(), Some("v0.1.0"));
        let ready = component_status(&component(), Some(&deployment(2, true)));
        let done = compute(Some(&upgrading), report(vec![ready]), at(20));
        assert_eq!(done.version.as_deref(), Some("v0.2.0"));
        assert_eq!(get(&done, RECONCILING).status, "False");
    }

    #[test]
    fn workloads_on_older_revisions_are_counted() {
        let ready = component_status(&component(), Some(&deployment(2, true)));
        let status = compute(
            None,
            Report {
                outdated: vec![("m-v0-1-0".into(), "v0.1.0".into(), 12)],
                ..report(vec![ready])
            },
            at(10),
        );
        let workloads = get(&status, WORKLOADS_UPDATED);
        assert_eq!(workloads.status, "False");
        assert!(
            workloads.message.starts_with(
                "12 workloads still on older revisions: 12 on v0.1.0 (revision m-v0-1-0)"
            ),
            "{}",
            workloads.message
        );
        assert_eq!(
            status.state.as_deref(),
            Some(HEALTHY),
            "health is the mesh's, not the workloads'"
        );
    }

    #[test]
    fn an_unchanged_reconcile_computes_the_same_status() {
        let ready = component_status(&component(), Some(&deployment(1, true)));
        let first = compute(
            None,
            Report {
                generation: Some(1),
                outcome: Outcome::Applied,
                components: vec![ready.clone()],
                ..Default::default()
            },
            at(10),
        );
        let second = compute(
            Some(&first),
            Report {
                generation: Some(1),
                outcome: Outcome::Applied,
                components: vec![ready],
                ..Default::default()
            },
            at(99),
        );
        assert_eq!(first, second);
        assert_eq!(
            get(&second, RECONCILING).status,
            "True",
            "waiting for replicas"
        );
    }
}
