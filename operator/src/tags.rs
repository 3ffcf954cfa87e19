//! MeshRevisionTags: stable names for revisions. Each belongs to the
//! installation it targets (or whose revision it targets), whose reconcile
//! resolves it, renders its webhook, guards its deletion and writes its
//! status.

use std::sync::Arc;

use bowline_api::install::{MeshInstallation, MeshRevision, MeshRevisionTag, TargetKind};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::apply::FIELD_MANAGER;
use crate::controller::{Context, publish};
use crate::error::{Error, Result};
use crate::observe::Observed;
use crate::render::meta::INSTALLATION_LABEL;
use crate::status;

/// Keeps a tag while namespaces still select it.
pub const TAG_FINALIZER: &str = "install.bowline.dev/tag-in-use";
/// A MeshRevisionTag that points at one of the installation's revisions.
#[derive(Clone, Debug)]
pub struct Tag {
    pub tag: Arc<MeshRevisionTag>,
    /// The revision it points at, or why it cannot point anywhere.
    pub revision: std::result::Result<String, String>,
    /// Namespaces that select it.
    pub namespaces: Vec<String>,
}

/// The tags that point at `installation` or at one of its revisions, each
/// with the revision it resolves to (for a tag following the installation,
/// settled once the active revision is known) or its conflict.
pub fn of_installation(installation: &str, ctx: &Context) -> Vec<Tag> {
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

/// Keeps a tag that namespaces still select from being deleted, the way a
/// PersistentVolumeClaim in use is kept: it gets a finalizer, removed once
/// the tag is being deleted and no namespace selects it. Returns the tags to
/// render, with their revisions.
pub async fn guard(
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
            release(&ctx.client, &tag.tag).await?;
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

/// Removes the operator's finalizer from a tag, letting it go.
pub async fn release(client: &kube::Client, tag: &MeshRevisionTag) -> Result<()> {
    if !tag.finalizers().iter().any(|f| f == TAG_FINALIZER) {
        return Ok(());
    }
    let rest: Vec<&String> = tag
        .finalizers()
        .iter()
        .filter(|f| *f != TAG_FINALIZER)
        .collect();
    set_finalizers(&Api::all(client.clone()), tag, json!(rest)).await
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

/// Each tag's status, written when it changed.
pub async fn write_statuses(observed: &Observed, ctx: &Context, now: &Time) -> Result<()> {
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
        let written = Api::<MeshRevisionTag>::all(ctx.client.clone())
            .patch_status(
                &tag.tag.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await;
        match written {
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            other => {
                other.map_err(Error::kube(format!(
                    "writing the status of MeshRevisionTag {}",
                    tag.tag.name_any()
                )))?;
            }
        }
    }
    Ok(())
}
