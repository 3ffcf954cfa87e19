//! Rendering: from a MeshInstallation and its resolved spec to every object
//! the operator applies. A pure function, tested against golden files.

pub mod addons;
pub mod controlplane;
pub mod gateway;
pub mod meta;
pub mod workload;

use bowline_api::install::MeshInstallation;

pub use meta::{DEFAULT_REVISION, Managed, Target, revision_name};

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
    let target = Target {
        installation,
        resolved,
        revision,
    };
    let mut objects = Vec::new();
    if control_plane_enabled(resolved) {
        objects.extend(controlplane::render(&target)?);
    }
    for (direction, index, gateway) in gateway::enabled(&target) {
        objects.extend(gateway::render(&target, direction, index, gateway)?);
    }
    objects.extend(addons::render(&target)?);
    Ok(objects)
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
