//! The MeshInstallation controller: reconcile = resolve, render, apply,
//! prune, then write status — written even when a step failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bowline_api::install::{
    ComponentStatus, MeshInstallation, MeshInstallationStatus, MeshRevision, MeshRevisionStatus,
    MeshRevisionTag, RevisionSummary, RevisionsStatus, TargetKind,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
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
use crate::cache::{Caches, RevisionUsage, Usage};
use crate::error::{Error, Result, backoff};
use crate::metrics::Metrics;
use crate::profile::{self, Resolved};
use crate::render::meta::INSTALLATION_LABEL;
use crate::render::{self, controlplane};
use crate::restart;
use crate::revisions::{self, Plan};
use crate::status::{self, Outcome, Report};

/// Keeps the installation until its cluster-scoped objects are removed.
pub const FINALIZER: &str = "install.bowline.dev/cleanup";
/// Keeps a tag while namespaces still select it.
pub const TAG_FINALIZER: &str = "install.bowline.dev/tag-in-use";
/// How long a reconcile request waits for more of its kind.
const DEBOUNCE: Duration = Duration::from_millis(200);
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

/// Runs the controller until the process is asked to stop.
pub async fn run(client: Client, metrics: Arc<Metrics>, reporter: Reporter) {
    let installations: Api<MeshInstallation> = Api::all(client.clone());
    // Pods and Namespaces churn: a burst of their changes (a workload's
    // rollout) becomes one reconcile, not one per event.
    let mut controller = Controller::new(installations, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE));
    let (caches, streams) = Caches::watch(&client);
    // Owning every kind it renders puts back what others delete or change;
    // the same watches fill the caches reconciles read from.
    for (resource, stream) in streams {
        controller = controller.watches_stream_with(stream, owning_installation, resource);
    }
    // What uses a revision changes with Namespaces and Pods. A pod keeps its
    // revision label for life; a namespace may drop it, so a namespace
    // change looks at every installation.
    let (usage, namespaces, pods) = Usage::watch(&client);
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
    let installation = &ctx.freshest(installation);
    let name = installation.name_any();
    ctx.caches.ready().await;
    ctx.usage.ready().await;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let observed = profile::resolve(&installation.spec)
        .map_err(|e| Error::InvalidSpec(e.to_string()))
        .and_then(|resolved| observe(installation, resolved, ctx, &now));
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
        report.components = component_statuses(installation, observed, &ctx.caches)?;
        report.resolved = Some(observed.resolved.spec.clone());
        report.active_revision = Some(observed.plan.active.clone());
        report.waiting_for = observed
            .plan
            .waiting()
            .then(|| observed.plan.desired.clone());
        report.revisions = Some(revisions_status(observed));
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
        write_tag_statuses(observed, ctx, &now).await?;
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

/// One revision of the installation, as a reconcile sees it.
#[derive(Clone, Debug)]
pub struct Revision {
    pub name: String,
    /// The configuration it runs.
    pub resolved: Resolved,
    /// Its MeshRevision, once the cache has it.
    pub recorded: Option<MeshRevision>,
    pub control_plane: ComponentStatus,
    pub usage: RevisionUsage,
    /// The status to write to its MeshRevision.
    pub status: MeshRevisionStatus,
}

/// A MeshRevisionTag that points at one of the installation's revisions.
#[derive(Clone, Debug)]
pub struct Tag {
    pub tag: Arc<MeshRevisionTag>,
    /// The revision it points at, or why it cannot point anywhere.
    pub revision: std::result::Result<String, String>,
    /// Namespaces that select it.
    pub namespaces: Vec<String>,
}

/// What the installation runs, worked out from the caches before anything
/// is applied.
#[derive(Clone, Debug)]
pub struct Observed {
    pub resolved: Resolved,
    pub plan: Plan,
    /// The revisions that keep running, in the plan's order.
    pub revisions: Vec<Revision>,
    pub tags: Vec<Tag>,
}

impl Observed {
    pub fn active(&self) -> &Revision {
        self.revisions
            .iter()
            .find(|r| r.name == self.plan.active)
            .unwrap_or(&self.revisions[0])
    }
}

/// The revisions, the tags and the plan, from the caches.
fn observe(
    installation: &MeshInstallation,
    resolved: Resolved,
    ctx: &Context,
    now: &Time,
) -> Result<Observed> {
    let name = installation.name_any();
    let desired = revisions::asked_for(installation, &resolved)?;
    let revision_kind = ApiResource::erase::<MeshRevision>(&());
    if let Some(owner) = ctx
        .caches
        .get(&revision_kind, None, &desired)
        .and_then(|r| r.labels().get(INSTALLATION_LABEL).cloned())
        .filter(|owner| *owner != name)
    {
        return Err(Error::InvalidSpec(format!(
            "spec.version: the revision {desired} belongs to MeshInstallation {owner}; a \
             revision has one owner: rename this installation or choose another version"
        )));
    }
    let mut recorded: Vec<MeshRevision> = ctx
        .caches
        .of_installation(&name)
        .into_iter()
        .filter(|(resource, _)| *resource == revision_kind)
        .map(|(_, object)| decode::<MeshRevision>(&object))
        .collect::<Result<_>>()?;
    recorded.sort_by_key(|r| r.name_any());

    let tags = tags_of(&name, ctx);
    let direct_tags = |revision: &str| -> Vec<String> {
        tags.iter()
            .filter(|t| t.revision.as_deref() == Ok(revision))
            .filter(|t| t.tag.spec.target_ref.kind == TargetKind::MeshRevision)
            .map(|t| t.tag.name_any())
            .collect()
    };

    let mut names: Vec<String> = recorded.iter().map(|r| r.name_any()).collect();
    if !names.contains(&desired) {
        names.push(desired.clone());
    }
    let mut all = Vec::new();
    for revision in names {
        let record = recorded.iter().find(|r| r.name_any() == revision).cloned();
        let resolved = match &record {
            Some(record) if revision != desired => Resolved::recorded(&record.spec.config)?,
            _ => resolved.clone(),
        };
        let tags = direct_tags(&revision);
        all.push(observe_revision(
            revision, resolved, record, tags, ctx, now,
        )?);
    }

    let grace = resolved
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.inactive_revision_deletion_grace_period_seconds)
        .map_or(revisions::DEFAULT_GRACE_PERIOD, |s| {
            Duration::from_secs(s.max(0) as u64)
        });
    let existing: Vec<revisions::Existing> = all
        .iter()
        .filter(|r| r.recorded.is_some())
        .map(|r| revisions::Existing {
            name: r.name.clone(),
            ready: r.control_plane.ready,
            unused_since: status::unused_since(&r.status),
        })
        .collect();
    let previous_active = installation
        .status
        .as_ref()
        .and_then(|s| s.active_revision.as_deref());
    let plan = revisions::plan(&desired, previous_active, &existing, grace, now.0);

    // Tags that follow the installation point at the active revision.
    let followed: Vec<Tag> = tags
        .iter()
        .cloned()
        .map(|mut t| {
            if t.tag.spec.target_ref.kind == TargetKind::MeshInstallation && t.revision.is_ok() {
                t.revision = Ok(plan.active.clone());
            }
            t
        })
        .collect();
    let mut revisions: Vec<Revision> = Vec::new();
    for name in &plan.keep {
        let Some(revision) = all.iter().find(|r| &r.name == name) else {
            continue;
        };
        let pointing: Vec<String> = followed
            .iter()
            .filter(|t| t.revision.as_deref() == Ok(name.as_str()))
            .map(|t| t.tag.name_any())
            .collect();
        if pointing.len() == direct_tags(name).len() {
            revisions.push(revision.clone());
        } else {
            let Revision {
                name,
                resolved,
                recorded,
                ..
            } = revision.clone();
            revisions.push(observe_revision(
                name, resolved, recorded, pointing, ctx, now,
            )?);
        }
    }
    Ok(Observed {
        resolved,
        plan,
        revisions,
        tags: followed,
    })
}

fn observe_revision(
    name: String,
    resolved: Resolved,
    recorded: Option<MeshRevision>,
    tags: Vec<String>,
    ctx: &Context,
    now: &Time,
) -> Result<Revision> {
    let component = render::Component {
        name: "controlPlane".into(),
        deployment: controlplane::istiod_name(&name),
    };
    let deployment = ctx
        .caches
        .get(
            &ApiResource::erase::<Deployment>(&()),
            Some(resolved.namespace()),
            &component.deployment,
        )
        .map(|d| decode::<Deployment>(&d))
        .transpose()?;
    let control_plane = status::component_status(&component, deployment.as_ref());
    let usage = ctx.usage.of(&name, &tags);
    let previous = recorded.as_ref().and_then(|r| r.status.clone());
    let status = status::revision(
        previous.as_ref(),
        recorded.as_ref().and_then(|r| r.metadata.generation),
        &control_plane,
        &usage,
        &tags,
        now.clone(),
    );
    Ok(Revision {
        name,
        resolved,
        recorded,
        control_plane,
        usage,
        status,
    })
}

/// The tags that point at `installation` or at one of its revisions, each
/// with the revision it resolves to (for a tag following the installation,
/// settled once the active revision is known) or its conflict.
fn tags_of(installation: &str, ctx: &Context) -> Vec<Tag> {
    let revision_kind = ApiResource::erase::<MeshRevision>(&());
    let owner_of = |revision: &str| {
        ctx.caches
            .get(&revision_kind, None, revision)
            .and_then(|r| r.labels().get(INSTALLATION_LABEL).cloned())
    };
    let mut tags: Vec<Tag> = ctx
        .tags
        .state()
        .into_iter()
        .filter_map(|tag| {
            let target = &tag.spec.target_ref;
            let revision = match target.kind {
                TargetKind::MeshInstallation if target.name == installation => Ok(String::new()),
                TargetKind::MeshRevision
                    if owner_of(&target.name).as_deref() == Some(installation) =>
                {
                    Ok(target.name.clone())
                }
                _ => return None,
            };
            let name = tag.name_any();
            let revision = match owner_of(&name) {
                Some(owner) => Err(format!(
                    "{name} is the name of a revision of MeshInstallation {owner}: namespaces \
                     labelled istio.io/rev={name} already select that revision, so the tag \
                     cannot; give the tag another name"
                )),
                None => revision,
            };
            Some(Tag {
                namespaces: ctx.usage.selecting(&name),
                tag,
                revision,
            })
        })
        .collect();
    tags.sort_by_key(|t| t.tag.name_any());
    tags
}

fn revisions_status(observed: &Observed) -> RevisionsStatus {
    let count =
        |f: fn(&Revision) -> bool| observed.revisions.iter().filter(|r| f(r)).count() as i32;
    let mut items: Vec<RevisionSummary> = observed
        .revisions
        .iter()
        .map(|r| RevisionSummary {
            name: r.name.clone(),
            version: r.resolved.spec.version.clone(),
            ready: r.control_plane.ready,
            in_use: status::unused_since(&r.status).is_none(),
            workloads: r.usage.workloads,
        })
        .collect();
    items.sort_by_key(|r| r.name != observed.plan.active);
    RevisionsStatus {
        total: observed.revisions.len() as i32,
        ready: count(|r| r.control_plane.ready),
        in_use: count(|r| status::unused_since(&r.status).is_none()),
        items,
    }
}

/// A cached object as its type.
fn decode<K: serde::de::DeserializeOwned>(object: &DynamicObject) -> Result<K> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|source| Error::Encode {
            what: format!(
                "{} {}",
                object.types.as_ref().map_or("", |t| t.kind.as_str()),
                object.name_any()
            ),
            source,
        })
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
    let tags = guard_tags(installation, observed, ctx).await?;
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

/// Keeps a tag that namespaces still select from being deleted, the way a
/// PersistentVolumeClaim in use is kept: it gets a finalizer, removed once
/// the tag is being deleted and no namespace selects it. Returns the tags to
/// render, with their revisions.
async fn guard_tags(
    installation: &MeshInstallation,
    observed: &Observed,
    ctx: &Context,
) -> Result<Vec<(String, String)>> {
    let api: Api<MeshRevisionTag> = Api::all(ctx.client.clone());
    let mut render = Vec::new();
    for tag in &observed.tags {
        let name = tag.tag.name_any();
        let has_finalizer = tag.tag.finalizers().iter().any(|f| f == TAG_FINALIZER);
        let deleting = tag.tag.meta().deletion_timestamp.is_some();
        if deleting && tag.namespaces.is_empty() {
            if has_finalizer {
                let rest: Vec<&String> = tag
                    .tag
                    .finalizers()
                    .iter()
                    .filter(|f| *f != TAG_FINALIZER)
                    .collect();
                set_finalizers(&api, &tag.tag, json!(rest)).await?;
            }
            continue;
        }
        if deleting {
            publish(
                ctx,
                installation,
                EventType::Warning,
                "TagInUse",
                "Delete",
                format!(
                    "MeshRevisionTag {name} is kept while namespaces select it: {}; relabel \
                     them (istio.io/rev=<another tag or revision>) and it goes",
                    tag.namespaces.join(", ")
                ),
            )
            .await;
        } else if !has_finalizer {
            let mut all = tag.tag.finalizers().to_vec();
            all.push(TAG_FINALIZER.into());
            set_finalizers(&api, &tag.tag, json!(all)).await?;
        }
        if let Ok(revision) = &tag.revision {
            render.push((name, revision.clone()));
        }
    }
    Ok(render)
}

/// Replaces a tag's finalizers, if nobody changed the tag meanwhile.
async fn set_finalizers(
    api: &Api<MeshRevisionTag>,
    tag: &MeshRevisionTag,
    finalizers: serde_json::Value,
) -> Result<()> {
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": tag.resource_version(),
    }});
    api.patch(
        &tag.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map_err(Error::kube(format!(
        "setting the finalizers of MeshRevisionTag {}",
        tag.name_any()
    )))?;
    Ok(())
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

/// The components' readiness; the control plane's is the asked-for
/// revision's.
fn component_statuses(
    installation: &MeshInstallation,
    observed: &Observed,
    caches: &Caches,
) -> Result<Vec<ComponentStatus>> {
    let resolved = &observed.resolved;
    let resource = ApiResource::erase::<Deployment>(&());
    render::components(installation, resolved, &observed.plan.desired)
        .into_iter()
        .map(|component| {
            // The plan was made from this reading: the same one, so that the
            // status never says Ready while the plan still waits for it.
            if let Some(desired) = observed
                .revisions
                .iter()
                .find(|r| r.name == observed.plan.desired && r.control_plane.name == component.name)
            {
                return Ok(desired.control_plane.clone());
            }
            let deployment = caches
                .get(&resource, Some(resolved.namespace()), &component.deployment)
                .map(|d| decode::<Deployment>(&d))
                .transpose()?;
            Ok(status::component_status(&component, deployment.as_ref()))
        })
        .collect()
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

/// Each tag's status, written when it changed.
async fn write_tag_statuses(observed: &Observed, ctx: &Context, now: &Time) -> Result<()> {
    for tag in &observed.tags {
        let previous = tag.tag.status.as_ref();
        let status = status::tag(
            previous,
            tag.tag.metadata.generation,
            tag.revision.as_deref().map_err(String::as_str),
            tag.namespaces.clone(),
            now.clone(),
        );
        if previous == Some(&status) {
            continue;
        }
        let patch = json!({
            "apiVersion": MeshRevisionTag::api_version(&()),
            "kind": MeshRevisionTag::kind(&()),
            "status": status,
        });
        Api::<MeshRevisionTag>::all(ctx.client.clone())
            .patch_status(
                &tag.tag.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
            .map_err(Error::kube(format!(
                "writing the status of MeshRevisionTag {}",
                tag.tag.name_any()
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
    let tags: Api<MeshRevisionTag> = Api::all(ctx.client.clone());
    for tag in tags_of(&name, ctx) {
        if tag.tag.finalizers().iter().any(|f| f == TAG_FINALIZER) {
            let rest: Vec<&String> = tag
                .tag
                .finalizers()
                .iter()
                .filter(|f| *f != TAG_FINALIZER)
                .collect();
            set_finalizers(&tags, &tag.tag, json!(rest)).await?;
        }
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
