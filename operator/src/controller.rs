//! The MeshInstallation controller: reconcile = resolve, render, apply,
//! prune, then write status — written even when a step failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bowline_api::install::{
    MeshInstallation, MeshInstallationStatus, MeshRevision, MeshRevisionTag, TargetKind,
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply::{self, FIELD_MANAGER};
use crate::cache::{Caches, Usage};
use crate::error::{Error, Result, backoff};
use crate::metrics::Metrics;
use crate::observe::{self, Observed};
use crate::profile::{self, Resolved};
use crate::render;
use crate::render::meta::INSTALLATION_LABEL;
use crate::restart;
use crate::status::{self, Outcome, Report};
use crate::tags;

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
    /// Every MeshRevisionTag.
    pub tags: Store<MeshRevisionTag>,
    /// Consecutive transient failures per installation, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The status last written per installation, with the resourceVersion
    /// the write produced: a reconcile may start before the watch has
    /// brought that write back, and must not act on the older status (a
    /// restart batch would be started twice).
    written: Mutex<HashMap<String, (u64, MeshInstallationStatus)>>,
}

impl Context {
    /// The installation with the newest status this operator knows of.
    fn freshest(&self, installation: &MeshInstallation) -> MeshInstallation {
        let mut fresh = installation.clone();
        let seen: Option<u64> = installation.resource_version().and_then(|v| v.parse().ok());
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some((version, status)), Some(seen)) = (written.get(&installation.name_any()), seen)
            && *version > seen
        {
            fresh.status = Some(status.clone());
        }
        fresh
    }

    fn remember(&self, installation: &MeshInstallation) {
        if let (Some(version), Some(status)) = (
            installation.resource_version().and_then(|v| v.parse().ok()),
            installation.status.clone(),
        ) {
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(installation.name_any(), (version, status));
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// How the operator runs, from its command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bring the cluster's CRDs up to this release at start-up. Off where
    /// something else owns them (OLM installs a bundle's CRDs itself).
    pub manage_crds: bool,
    /// The namespaces whose workloads count as using a revision and are
    /// restarted onto a new one; empty for every namespace.
    pub watch_namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            manage_crds: true,
            watch_namespaces: Vec::new(),
        }
    }
}

/// Runs the controller until the process is asked to stop.
pub async fn run(client: Client, metrics: Arc<Metrics>, reporter: Reporter, options: Options) {
    // CRDs first: what this operator reconciles is what its release defines.
    if options.manage_crds
        && let Err(error) = crate::crds::upgrade(&client).await
    {
        tracing::warn!(%error, "could not bring the CRDs up to this release; serving with the cluster's");
    }
    let installations: Api<MeshInstallation> = Api::all(client.clone());
    // No debounce: kube-runtime's resets its timer on every request, so a
    // steady stream of namespace events (which reach every installation)
    // would hold a reconcile back for ever. The usage watches pass on only
    // the changes that matter instead.
    let mut controller = Controller::new(installations, watcher::Config::default());
    let (caches, streams) = Caches::watch(&client);
    // Owning every kind it renders puts back what others delete or change;
    // the same watches fill the caches reconciles read from.
    for (resource, stream) in streams {
        controller = controller.watches_stream_with(stream, owning_installation, resource);
    }
    // What uses a revision changes with Namespaces and Pods. A pod keeps its
    // revision label for life; a namespace may drop it, so a namespace
    // change looks at every installation.
    let (usage, namespaces, pods) = Usage::watch(&client, &options.watch_namespaces);
    let (tags, tag_writer) = kube::runtime::reflector::store();
    let tag_stream = watcher(
        Api::<MeshRevisionTag>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(tag_writer)
    .touched_objects();
    let every_installation = controller.store();
    let pod_revisions = caches.clone();
    let tag_revisions = caches.clone();
    let controller = controller
        .watches_stream(namespaces, move |_| {
            every_installation
                .state()
                .iter()
                .map(|i| ObjectRef::from_obj(i.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(pods, move |pod| {
            pod.labels()
                .get(render::meta::REVISION_LABEL)
                .map(|revision| ObjectRef::new(&installation_of(&pod_revisions, revision)))
        })
        .watches_stream(tag_stream, move |tag| {
            let target = &tag.spec.target_ref;
            Some(ObjectRef::new(&match target.kind {
                TargetKind::MeshInstallation => target.name.clone(),
                TargetKind::MeshRevision => installation_of(&tag_revisions, &target.name),
            }))
        });
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        installations: controller.store(),
        caches,
        usage,
        tags,
        failures: Mutex::default(),
        written: Mutex::default(),
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

/// The installation that owns an object. (Not `owns_stream`: it names a
/// cluster-scoped owner with its namespaced child's namespace, a key the
/// controller takes for another object, and would reconcile the same
/// installation twice at once.)
fn owning_installation(object: DynamicObject) -> Option<ObjectRef<MeshInstallation>> {
    object
        .owner_references()
        .iter()
        .find(|o| {
            o.kind == MeshInstallation::kind(&())
                && o.api_version == MeshInstallation::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name))
}

/// The installation a revision belongs to: its MeshRevision says, and an
/// InPlace revision not cached yet is named after it.
fn installation_of(caches: &Caches, revision: &str) -> String {
    caches
        .get(&ApiResource::erase::<MeshRevision>(&()), None, revision)
        .and_then(|r| r.labels().get(INSTALLATION_LABEL).cloned())
        .unwrap_or_else(|| revision.to_string())
}

async fn reconcile(installation: Arc<MeshInstallation>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let name = installation.name_any();
    tracing::debug!(installation = %name, "reconciling");
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
    tracing::debug!(installation = %name, elapsed = ?started.elapsed(), ok = result.is_ok(), "reconciled");
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
    let installation = &ctx.freshest(installation);
    let name = installation.name_any();
    ctx.caches.ready().await;
    ctx.usage.ready().await;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let observed = profile::resolve(&installation.spec)
        .map_err(|e| Error::InvalidSpec(e.to_string()))
        .and_then(|resolved| observe::observe(installation, resolved, ctx, &now));
    let result = match &observed {
        Ok(observed) => install(installation, observed, ctx).await,
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
    let previous = installation.status.as_ref();
    let mut report = Report {
        generation: installation.meta().generation,
        outcome: outcome.clone(),
        ..Default::default()
    };
    let observed = observed
        .ok()
        .filter(|_| !matches!(outcome, Outcome::Invalid(_)));
    let mut restart = None;
    if let Some(observed) = &observed {
        report.components = observe::component_statuses(installation, observed, &ctx.caches)?;
        report.resolved = Some(observed.resolved.spec.clone());
        report.active_revision = Some(observed.plan.active.clone());
        report.waiting_for = observed
            .plan
            .waiting()
            .then(|| observed.plan.desired.clone());
        report.revisions = Some(observe::revisions_status(observed));
        report.outdated = observed
            .revisions
            .iter()
            .filter(|r| r.name != observed.plan.active && r.usage.workloads > 0)
            .map(|r| {
                (
                    r.name.clone(),
                    r.resolved.spec.version.clone(),
                    r.usage.workloads,
                )
            })
            .collect();
        // Independent of the apply: workloads move to the active revision,
        // which serves whatever happened to the rest.
        restart = restart::step(installation, observed, ctx, &now).await?;
        report.workload_restart = restart.as_ref().and_then(|r| r.status.clone());
    }
    let new_status = status::compute(previous, report, now.clone());
    if previous != Some(&new_status) {
        let written = write_status(installation, &new_status, &ctx.client).await?;
        ctx.remember(&written);
    }
    if let Some(observed) = &observed {
        write_revision_statuses(observed, ctx).await?;
        tags::write_statuses(observed, ctx, &now).await?;
        let previous_active = previous.and_then(|p| p.active_revision.as_deref());
        if let Some(previous_active) = previous_active.filter(|a| *a != observed.plan.active) {
            publish(
                ctx,
                installation,
                EventType::Normal,
                "Promoted",
                "Promote",
                format!(
                    "revision {} is Ready and now active (was {previous_active}); tags that \
                     follow the installation point at it",
                    observed.plan.active
                ),
            )
            .await;
        }
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
                        ("Upgraded", "upgrading to")
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
            // Look again when a grace period ends or a restart batch is due.
            let mut next = RESYNC;
            if let Some(expiry) = observed.as_ref().and_then(|o| o.plan.next_expiry) {
                next = next.min(expiry + Duration::from_secs(1));
            }
            if let Some(after) = restart.as_ref().and_then(|r| r.requeue) {
                next = next.min(after);
            }
            Ok(Action::requeue(next))
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

/// Namespace, tags' finalizers, apply, prune. Returns what changed, for the
/// event.
async fn install(
    installation: &MeshInstallation,
    observed: &Observed,
    ctx: &Context,
) -> Result<Vec<String>> {
    let name = installation.name_any();
    let resolved = &observed.resolved;
    check_namespace_conflict(installation, resolved, &ctx.installations)?;
    let mut changed: Vec<String> =
        apply::ensure_namespace(&ctx.client, resolved.namespace(), &name)
            .await?
            .into_iter()
            .collect();
    let tags = tags::guard(installation, observed, ctx).await?;
    let active = observed.active();
    let mesh = render::Mesh {
        installation,
        resolved,
        revisions: observed
            .revisions
            .iter()
            .map(|r| (r.name.as_str(), &r.resolved))
            .collect(),
        active: (active.name.as_str(), &active.resolved),
        tags: tags
            .iter()
            .map(|(tag, revision)| (tag.as_str(), revision.as_str()))
            .collect(),
    };
    let objects = render::render_mesh(&mesh)?;
    changed.extend(
        apply::apply_all(&ctx.client, &ctx.caches, &objects)
            .await?
            .changed,
    );
    let pruned = apply::prune(&ctx.client, &ctx.caches, &name, &objects).await?;
    if !pruned.is_empty() {
        let mut note = format!("deleted {}", pruned.join(", "));
        if !observed.plan.expired.is_empty() {
            note = format!(
                "revisions {} unused for the grace period: {note}",
                observed.plan.expired.join(", ")
            );
        }
        publish(
            ctx,
            installation,
            EventType::Normal,
            "Pruned",
            "Prune",
            note,
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

/// Each kept revision's status, written when it changed.
async fn write_revision_statuses(observed: &Observed, ctx: &Context) -> Result<()> {
    for revision in &observed.revisions {
        // Not in the cache yet: its creation brings the next reconcile.
        let Some(recorded) = &revision.recorded else {
            continue;
        };
        if recorded.status.as_ref() == Some(&revision.status) {
            continue;
        }
        let patch = json!({
            "apiVersion": MeshRevision::api_version(&()),
            "kind": MeshRevision::kind(&()),
            "status": revision.status,
        });
        Api::<MeshRevision>::all(ctx.client.clone())
            .patch_status(
                &revision.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
            .map_err(Error::kube(format!(
                "writing the status of MeshRevision {}",
                revision.name
            )))?;
    }
    Ok(())
}

async fn write_status(
    installation: &MeshInstallation,
    status: &MeshInstallationStatus,
    client: &Client,
) -> Result<MeshInstallation> {
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
    )))
}

/// Removes what the installation made: every labelled object (cluster-scoped
/// ones included; garbage collection would get the namespaced ones anyway)
/// and the namespace if it created it. CRDs stay: deleting them would delete
/// every user's mesh configuration.
async fn cleanup(installation: &MeshInstallation, ctx: &Context) -> Result<Action> {
    let name = installation.name_any();
    ctx.written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    ctx.caches.ready().await;
    let deleted = apply::prune(&ctx.client, &ctx.caches, &name, &[]).await?;
    // Its tags point nowhere now; nothing is left for them to protect.
    for tag in tags::of_installation(&name, ctx) {
        tags::release(&ctx.client, &tag.tag).await?;
    }
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
pub(crate) async fn publish(
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
