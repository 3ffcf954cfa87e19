//! Rendering: from a MeshInstallation and its resolved spec to every object
//! the operator applies. A pure function, tested against golden files.

pub mod addons;
pub mod controlplane;
pub mod gateway;
pub mod meta;
pub mod workload;

use bowline_api::install::MeshInstallation;

pub use meta::{DEFAULT_REVISION, Managed, Target};

use crate::error::Result;
use crate::profile::Resolved;

/// A component whose readiness status reports: its status name and the
/// Deployment that runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub deployment: String,
}

/// Every object of the installation, for the control plane of `revision`.
pub fn render(
    installation: &MeshInstallation,
    resolved: &Resolved,
    revision: &str,
) -> Result<Vec<Managed>> {
    render_mesh(&Mesh {
        installation,
        resolved,
        revisions: vec![(revision, resolved)],
        active: (revision, resolved),
        tags: Vec::new(),
    })
}

/// An installation with every revision it runs.
#[derive(Clone, Debug)]
pub struct Mesh<'a> {
    pub installation: &'a MeshInstallation,
    /// The current spec, resolved: gateways and addons follow it.
    pub resolved: &'a Resolved,
    /// Every revision that runs, with the configuration it runs: the
    /// asked-for one with the current spec, older ones with what they were
    /// last given.
    pub revisions: Vec<(&'a str, &'a Resolved)>,
    /// The active revision: gateways and addons run its release and
    /// gateways get their configuration from it.
    pub active: (&'a str, &'a Resolved),
    /// The tags that point at this installation's revisions: (tag, revision).
    pub tags: Vec<(&'a str, &'a str)>,
}

/// Every object of an installation that runs several revisions.
pub fn render_mesh(mesh: &Mesh<'_>) -> Result<Vec<Managed>> {
    let mut objects = Vec::new();
    for (revision, resolved) in &mesh.revisions {
        let target = Target {
            installation: mesh.installation,
            resolved,
            revision,
        };
        if control_plane_enabled(resolved) {
            objects.extend(controlplane::render(&target)?);
            for (tag, _) in mesh.tags.iter().filter(|(_, r)| r == revision) {
                objects.push(controlplane::tag_webhook(&target, tag)?);
                if *tag == DEFAULT_REVISION {
                    objects.push(controlplane::default_tag_validator(&target)?);
                }
            }
        }
    }
    let (active, active_resolved) = mesh.active;
    let following = following(mesh.resolved, active_resolved);
    let target = Target {
        installation: mesh.installation,
        resolved: &following,
        revision: active,
    };
    for (direction, index, gateway) in gateway::enabled(&target) {
        objects.extend(gateway::render(&target, direction, index, gateway)?);
    }
    objects.extend(addons::render(&target)?);
    Ok(objects)
}

/// The current spec with the release, hub and tag of the active revision:
/// what gateways and addons run, so that they move to a new version only
/// when its control plane has taken over.
pub fn following(current: &Resolved, active: &Resolved) -> Resolved {
    let mut resolved = current.clone();
    resolved.spec.version = active.spec.version.clone();
    resolved.spec.hub = active.spec.hub.clone();
    resolved.spec.tag = active.spec.tag.clone();
    resolved.release = active.release;
    resolved
}

/// The enabled components, each with the Deployment that runs it.
pub fn components(
    installation: &MeshInstallation,
    resolved: &Resolved,
    revision: &str,
) -> Vec<Component> {
    let target = Target {
        installation,
        resolved,
        revision,
    };
    let mut components = Vec::new();
    if control_plane_enabled(resolved) {
        components.push(Component {
            name: "controlPlane".into(),
            deployment: controlplane::ControlPlaneNames::new(&target).istiod,
        });
    }
    for (direction, _, gateway) in gateway::enabled(&target) {
        components.push(Component {
            name: direction.component_name(&gateway.name),
            deployment: gateway.name.clone(),
        });
    }
    for addon in addons::Addon::ALL
        .into_iter()
        .filter(|a| a.enabled(&target))
    {
        components.push(Component {
            name: addon.component_name(),
            deployment: addon.name().into(),
        });
    }
    components
}

fn control_plane_enabled(resolved: &Resolved) -> bool {
    resolved
        .spec
        .components
        .as_ref()
        .and_then(|c| c.control_plane.as_ref())
        .and_then(|c| c.enabled)
        .unwrap_or(false)
}

/// The objects as one multi-document YAML stream, the way
/// `bowline-operator render` prints them.
pub fn to_yaml(objects: &[Managed]) -> Result<String> {
    let mut out = String::new();
    for managed in objects {
        let yaml = serde_saphyr::to_string(&managed.object).map_err(|e| {
            crate::error::Error::InvalidSpec(format!(
                "{} cannot be written as YAML: {e}",
                managed.describe()
            ))
        })?;
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}
