//! Status: the conditions, state and component readiness of a
//! MeshInstallation, computed from what a reconcile did and what the
//! Deployments report. Pure; the controller writes the result.
//!
//! Conditions are kstatus-compatible: `Reconciling` and `Stalled` are the
//! "abnormal-true" ones Argo CD and Flux read, `Reconciled` and `Ready` the
//! ones people read.

use bowline_api::install::{ComponentStatus, MeshInstallationStatus, MeshRevisionStatus};
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

/// How the apply step of a reconcile ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The spec must change first (reason, message naming the field).
    Invalid(String),
    /// Worth retrying (reason, message).
    Failed {
        reason: String,
        message: String,
    },
}

/// One component's readiness from its Deployment: Available, with every
/// replica updated to the current template and ready.
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
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let ready_replicas = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let observed =
        status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    let available = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Available" && c.status == "True");
    let ready = observed
        && available
        && updated >= wanted
        && ready_replicas >= wanted
        && status.replicas.unwrap_or(0) == updated;
    ComponentStatus {
        name: component.name.clone(),
        ready,
        ready_replicas,
        replicas: wanted,
        message: (!ready).then(|| {
            if !observed {
                "the Deployment's rollout has not started".to_string()
            } else {
                format!("{ready_replicas}/{wanted} replicas ready, {updated} updated")
            }
        }),
    }
}

/// The new status. `previous` keeps the lastTransitionTime of conditions
/// whose status did not change, so an unchanged reconcile writes nothing.
pub fn compute(
    previous: Option<&MeshInstallationStatus>,
    generation: Option<i64>,
    outcome: &Outcome,
    components: Vec<ComponentStatus>,
    resolved: Option<bowline_api::install::MeshInstallationSpec>,
    active_revision: Option<String>,
    now: Time,
) -> MeshInstallationStatus {
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
    let reconciling = match outcome {
        Outcome::Invalid(_) => condition(
            RECONCILING,
            false,
            "InvalidSpec",
            "waiting for the spec to change",
        ),
        _ if all_ready && *outcome == Outcome::Applied => {
            condition(RECONCILING, false, "ComponentsReady", "")
        }
        Outcome::Failed { reason, message } => condition(RECONCILING, true, reason, message),
        _ => condition(RECONCILING, true, "ComponentsNotReady", &not_ready_message),
    };

    let mut conditions = vec![reconciled, ready, reconciling, stalled];
    let state = finish(
        &mut conditions,
        previous.map(|p| p.conditions.as_slice()),
        generation,
        now,
    );

    let invalid = matches!(outcome, Outcome::Invalid(_));
    MeshInstallationStatus {
        observed_generation: generation,
        conditions,
        state: Some(state),
        active_revision,
        // With an invalid spec nothing was rendered: keep reporting what runs.
        components: if invalid {
            previous.map(|p| p.components.clone()).unwrap_or_default()
        } else {
            components
        },
        resolved: resolved.or_else(|| previous.and_then(|p| p.resolved.clone())),
    }
}

/// A revision's status: Ready from its control plane, InUse from what
/// selects it or runs its proxies.
pub fn revision(
    previous: Option<&MeshRevisionStatus>,
    generation: Option<i64>,
    control_plane: &ComponentStatus,
    usage: &RevisionUsage,
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
    let in_use = if usage.workloads > 0 || !usage.namespaces.is_empty() {
        let message = format!(
            "{} workloads run its proxy; namespaces selecting it: {}",
            usage.workloads,
            if usage.namespaces.is_empty() {
                "none".to_string()
            } else {
                usage.namespaces.join(", ")
            }
        );
        condition(IN_USE, true, "UsedByWorkloads", &message)
    } else {
        condition(
            IN_USE,
            false,
            "NotInUse",
            "no namespace selects it and no pod runs its proxy",
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
        tags: Vec::new(),
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
            Some(3),
            &Outcome::Applied,
            vec![ready],
            None,
            None,
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
            Some(1),
            &Outcome::Applied,
            vec![ready],
            None,
            None,
            at(10),
        );
        let after = compute(
            Some(&before),
            Some(2),
            &Outcome::Invalid("spec.version: v9 is unknown".into()),
            Vec::new(),
            None,
            None,
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

    #[test]
    fn an_unchanged_reconcile_computes_the_same_status() {
        let ready = component_status(&component(), Some(&deployment(1, true)));
        let first = compute(
            None,
            Some(1),
            &Outcome::Applied,
            vec![ready.clone()],
            None,
            None,
            at(10),
        );
        let second = compute(
            Some(&first),
            Some(1),
            &Outcome::Applied,
            vec![ready],
            None,
            None,
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
