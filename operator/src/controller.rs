//! The MeshInstallation controller: reconcile = resolve, render, apply,
//! prune, then write status — written even when a step failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bowline_api::install::{
    MeshInstallation, MeshInstallationStatus, MeshRevision, MeshRevisionStatus,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply::{self, FIELD_MANAGER};
use crate::cache::{Caches, Usage};
use crate::error::{Error, Result, backoff};
use crate::metrics::Metrics;
use crate::profile::{self, Resolved};
use crate::render::{self, revision_name};
use crate::status::{self, Outcome};

/// Keeps the installation until its cluster-scoped objects are removed.
pub const FINALIZER: &str = "install.bowline.dev/cleanup";
/// How often an installation is looked at when nothing happens.
const RESYNC: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every MeshInstallation, for conflicts between them.
    pub installations: Store<MeshInstallation>,
    /// Every object the operator manages, as its watches see them.
    pub caches: Caches,
    /// Namespaces and injected Pods, for what uses each revision.
    pub usage: Usage,
    /// Consecutive transient failures per installation, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Runs the controller until the process is asked to stop.
pub async fn run(client: Client, metrics: Arc<Metrics>, reporter: Reporter) {
    let installations: Api<MeshInstallation> = Api::all(client.clone());
    let mut controller = Controller::new(installations, watcher::Config::default());
    let (caches, streams) = Caches::watch(&client);
    // Owning every kind it renders puts back what others delete or change;
    // the same watches fill the caches reconciles read from.
    for (resource, stream) in streams {
        controller = controller.owns_stream_with(stream, resource);
    }
    // What uses a revision changes with Namespaces and Pods. A pod keeps its
    // revision label for life; a namespace may drop it, so a namespace
    // change looks at every installation.
    let (usage, namespaces, pods) = Usage::watch(&client);
    let every_installation = controller.store();
    let controller = controller
        .watches_stream(namespaces, move |_| {
            every_installation
                .state()
                .iter()
                .map(|i| ObjectRef::from_obj(i.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(pods, |pod| {
            pod.labels()
                .get(render::meta::REVISION_LABEL)
                .map(|revision| ObjectRef::new(revision))
        });
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        installations: controller.store(),
        caches,
        usage,
        failures: Mutex::default(),
    });
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                // Logged with its backoff by error_policy.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // A change to an object whose installation is gone.
                Err(kube::runtime::controller::Error::ObjectNotFound(..)) => {}
                // A watch that fails (RBAC, a missing CRD) stops reconciles.
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
        })
        .await;
}

async fn reconcile(installation: Arc<MeshInstallation>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let api: Api<MeshInstallation> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, installation, |event| async {
        match event {
            Finalizer::Apply(installation) => apply(&installation, &ctx).await,
            Finalizer::Cleanup(installation) => cleanup(&installation, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .observe(started.elapsed(), result.as_ref().err());
    result
}

fn error_policy(installation: Arc<MeshInstallation>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_invalid_spec() {
        return Action::await_change();
    }
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let attempt = failures.entry(installation.name_any()).or_insert(0);
    *attempt += 1;
    tracing::warn!(installation = %installation.name_any(), error = %error, attempt, "reconcile failed, retrying");
    Action::requeue(backoff(*attempt))
}

/// Installs or updates everything, then writes status.
async fn apply(installation: &MeshInstallation, ctx: &Context) -> Result<Action> {
    let name = installation.name_any();
    ctx.caches.ready().await;
    let resolved = profile::resolve(&installation.spec);
    let result = match &resolved {
        Ok(resolved) => install(installation, resolved, ctx).await,
        Err(e) => Err(Error::InvalidSpec(e.to_string())),
    };

    let outcome = match &result {
        Ok(_) => Outcome::Applied,
        Err(e) if e.is_invalid_spec() => Outcome::Invalid(e.to_string()),
        Err(e) => Outcome::Failed {
            reason: e.condition_reason().into(),
            message: e.to_string(),
        },
    };
    let resolved = resolved
        .ok()
        .filter(|_| !matches!(outcome, Outcome::Invalid(_)));
    let components = match &resolved {
        Some(resolved) => component_statuses(installation, resolved, &ctx.caches)?,
        None => Vec::new(),
    };
    let previous = installation.status.as_ref();
    let new_status = status::compute(
        previous,
        installation.meta().generation,
        &outcome,
        components,
        resolved.as_ref().map(|r| r.spec.clone()),
        resolved.as_ref().map(|_| revision_name(installation)),
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    if previous != Some(&new_status) {
        write_status(installation, &new_status, &ctx.client).await?;
    }
    if let Some(control_plane) = new_status
        .components
        .iter()
        .find(|c| c.name == "controlPlane")
    {
        write_revision_status(installation, control_plane, ctx).await?;
    }

    match result {
        Ok(applied) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            if !applied.is_empty() {
                let (reason, verb) = match previous.and_then(|p| p.resolved.as_ref()) {
                    None => ("Installed", "installed"),
                    Some(old) if old.version != installation.spec.version => {
                        ("Upgraded", "upgraded to")
                    }
                    Some(_) => ("Applied", "applied"),
                };
                let note = format!(
                    "{verb} {}: {}",
                    installation.spec.version,
                    applied.join(", ")
                );
                publish(ctx, installation, EventType::Normal, reason, "Apply", note).await;
            }
            Ok(Action::requeue(RESYNC))
        }
        Err(e) => {
            let changed = previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == status::RECONCILED))
                .is_none_or(|c| c.message != e.to_string());
            if changed {
                publish(
                    ctx,
                    installation,
                    EventType::Warning,
                    e.condition_reason(),
                    "Apply",
                    e.to_string(),
                )
                .await;
            }
            if e.is_invalid_spec() {
                tracing::warn!(installation = %name, error = %e, "invalid spec; waiting for it to change");
                Ok(Action::await_change())
            } else {
                Err(e)
            }
        }
    }
}

/// Namespace, apply, prune. Returns what changed, for the event.
async fn install(
    installation: &MeshInstallation,
    resolved: &Resolved,
    ctx: &Context,
) -> Result<Vec<String>> {
    let name = installation.name_any();
    check_namespace_conflict(installation, resolved, &ctx.installations)?;
    let mut changed: Vec<String> =
        apply::ensure_namespace(&ctx.client, resolved.namespace(), &name)
            .await?
            .into_iter()
            .collect();
    let objects = render::render(installation, resolved, &revision_name(installation))?;
    changed.extend(
        apply::apply_all(&ctx.client, &ctx.caches, &objects)
            .await?
            .changed,
    );
    let pruned = apply::prune(&ctx.client, &ctx.caches, &name, &objects).await?;
    if !pruned.is_empty() {
        publish(
            ctx,
            installation,
            EventType::Normal,
            "Pruned",
            "Prune",
            format!("deleted {}", pruned.join(", ")),
        )
        .await;
    }
    Ok(changed)
}

/// Only one installation may use a namespace: the oldest keeps it.
fn check_namespace_conflict(
    installation: &MeshInstallation,
    resolved: &Resolved,
    installations: &Store<MeshInstallation>,
) -> Result<()> {
    let namespace = resolved.namespace();
    let key = |m: &MeshInstallation| (m.meta().creation_timestamp.clone(), m.name_any());
    let owner = installations
        .state()
        .into_iter()
        .filter(|other| other.meta().deletion_timestamp.is_none())
        .filter(|other| {
            other
                .spec
                .namespace
                .as_deref()
                .unwrap_or(bowline_api::install::DEFAULT_NAMESPACE)
                == namespace
        })
        .min_by_key(|other| key(other));
    match owner {
        Some(owner)
            if owner.name_any() != installation.name_any() && key(&owner) < key(installation) =>
        {
            Err(Error::InvalidSpec(format!(
                "spec.namespace: {namespace} is already used by MeshInstallation {}; choose another namespace",
                owner.name_any()
            )))
        }
        _ => Ok(()),
    }
}

fn component_statuses(
    installation: &MeshInstallation,
    resolved: &Resolved,
    caches: &Caches,
) -> Result<Vec<bowline_api::install::ComponentStatus>> {
    let resource = ApiResource::erase::<Deployment>(&());
    render::components(installation, resolved, &revision_name(installation))
        .into_iter()
        .map(|component| {
            let cached = caches.get(&resource, Some(resolved.namespace()), &component.deployment);
            let deployment: Option<Deployment> = cached
                .map(|d| serde_json::to_value(&*d).and_then(serde_json::from_value))
                .transpose()
                .map_err(|source| Error::Encode {
                    what: format!("Deployment {}", component.deployment),
                    source,
                })?;
            Ok(status::component_status(&component, deployment.as_ref()))
        })
        .collect()
}

/// The status of the installation's revision: its control plane's readiness
/// and what uses it. Written only when it changed.
async fn write_revision_status(
    installation: &MeshInstallation,
    control_plane: &bowline_api::install::ComponentStatus,
    ctx: &Context,
) -> Result<()> {
    let name = revision_name(installation);
    let Some(cached) = ctx
        .caches
        .get(&ApiResource::erase::<MeshRevision>(&()), None, &name)
    else {
        // Not in the cache yet: its creation will bring the next reconcile.
        return Ok(());
    };
    let previous: Option<MeshRevisionStatus> = cached
        .data
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok());
    ctx.usage.ready().await;
    let status = status::revision(
        previous.as_ref(),
        cached.metadata.generation,
        control_plane,
        &ctx.usage.of(&name),
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    if previous.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": MeshRevision::api_version(&()),
        "kind": MeshRevision::kind(&()),
        "status": status,
    });
    Api::<MeshRevision>::all(ctx.client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(Error::kube(format!(
            "writing the status of MeshRevision {name}"
        )))?;
    Ok(())
}

async fn write_status(
    installation: &MeshInstallation,
    status: &MeshInstallationStatus,
    client: &Client,
) -> Result<()> {
    let api: Api<MeshInstallation> = Api::all(client.clone());
    let patch = json!({
        "apiVersion": MeshInstallation::api_version(&()),
        "kind": MeshInstallation::kind(&()),
        "status": status,
    });
    api.patch_status(
        &installation.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(Error::kube(format!(
        "writing the status of MeshInstallation {}",
        installation.name_any()
    )))?;
    Ok(())
}

/// Removes what the installation made: every labelled object (cluster-scoped
/// ones included; garbage collection would get the namespaced ones anyway)
/// and the namespace if it created it. CRDs stay: deleting them would delete
/// every user's mesh configuration.
async fn cleanup(installation: &MeshInstallation, ctx: &Context) -> Result<Action> {
    let name = installation.name_any();
    ctx.caches.ready().await;
    let deleted = apply::prune(&ctx.client, &ctx.caches, &name, &[]).await?;
    let namespace = installation
        .status
        .as_ref()
        .and_then(|s| s.resolved.as_ref())
        .and_then(|r| r.namespace.clone())
        .or_else(|| installation.spec.namespace.clone())
        .unwrap_or_else(|| bowline_api::install::DEFAULT_NAMESPACE.into());
    let namespace_deleted = apply::delete_created_namespace(&ctx.client, &namespace, &name).await?;
    let mut note = format!("deleted {} objects", deleted.len());
    if namespace_deleted {
        note.push_str(&format!(" and namespace {namespace}"));
    }
    publish(
        ctx,
        installation,
        EventType::Normal,
        "Deleted",
        "Delete",
        note,
    )
    .await;
    Ok(Action::await_change())
}

/// The Events API refuses notes longer than this many bytes.
const MAX_EVENT_NOTE: usize = 1024;

/// `text` cut to at most `max` bytes on a character boundary, marked with an
/// ellipsis when cut.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// Records an Event on the installation. A failure to record is logged, not
/// fatal: events are for people, the status is the record.
async fn publish(
    ctx: &Context,
    installation: &MeshInstallation,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, MAX_EVENT_NOTE)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &installation.object_ref(&()))
        .await
    {
        tracing::warn!(error = %e, reason, "could not record an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_event_notes_are_cut_to_what_the_api_accepts() {
        let cut = truncate("é".repeat(600), MAX_EVENT_NOTE);
        assert!(cut.len() <= MAX_EVENT_NOTE);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short".into(), MAX_EVENT_NOTE), "short");
    }
}
