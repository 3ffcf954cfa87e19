//! What an installation runs, read from the caches before anything is
//! applied: each revision with its configuration, readiness and users, the
//! tags that point at them, and the plan of which revision is active and
//! which are deleted.

use std::time::Duration;

use bowline_api::install::{
    ComponentStatus, MeshInstallation, MeshRevision, MeshRevisionStatus, RevisionSummary,
    RevisionsStatus, TargetKind,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};

use crate::cache::{Caches, RevisionUsage};
use crate::controller::Context;
use crate::error::{Error, Result};
use crate::profile::Resolved;
use crate::render::meta::INSTALLATION_LABEL;
use crate::render::{self, controlplane};
use crate::revisions::{self, Plan};
use crate::status;
use crate::tags::{self, Tag};

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
pub fn observe(
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

    let tags = tags::of_installation(&name, ctx);
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

pub fn revisions_status(observed: &Observed) -> RevisionsStatus {
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
pub fn decode<K: serde::de::DeserializeOwned>(object: &DynamicObject) -> Result<K> {
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

/// The components' readiness; the control plane's is the asked-for
/// revision's.
pub fn component_statuses(
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
