//! Profiles, and the resolution of a spec into the complete configuration the
//! operator installs.
//!
//! `config/profiles/base.yaml` ← `config/profiles/<profile>.yaml` ← the spec,
//! merged as JSON merge patches (RFC 7386): objects merge field by field, the
//! later document wins, lists are replaced whole. The result is written to
//! status, never to spec.

use bowline_api::install::{MeshInstallationSpec, Profile};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::release;

/// The spec with every default filled in, and the release it names.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub spec: MeshInstallationSpec,
    pub release: &'static release::Release,
}

impl Resolved {
    pub fn namespace(&self) -> &str {
        self.spec
            .namespace
            .as_deref()
            .unwrap_or(bowline_api::install::DEFAULT_NAMESPACE)
    }

    pub fn hub(&self) -> &str {
        self.spec.hub.as_deref().unwrap_or(release::default_hub())
    }

    pub fn tag(&self) -> &str {
        self.spec.tag.as_deref().unwrap_or(&self.release.tag)
    }

    /// The configuration a MeshRevision records: already resolved, so the
    /// profile is not merged in again.
    pub fn recorded(spec: &MeshInstallationSpec) -> Result<Self> {
        Ok(Self {
            spec: spec.clone(),
            release: release::find(&spec.version)?,
        })
    }

    /// `<hub>/<name>:<tag>`, one of Bowline's images.
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}:{}", self.hub(), self.tag())
    }
}

/// The profile's YAML.
pub fn profile_yaml(profile: Profile) -> &'static str {
    match profile {
        Profile::Default => include_str!("../../config/profiles/default.yaml"),
        Profile::Demo => include_str!("../../config/profiles/demo.yaml"),
        Profile::Minimal => include_str!("../../config/profiles/minimal.yaml"),
        Profile::Empty => include_str!("../../config/profiles/empty.yaml"),
    }
}

const BASE: &str = include_str!("../../config/profiles/base.yaml");

/// Resolves a spec: its release, then base ← profile ← spec.
pub fn resolve(spec: &MeshInstallationSpec) -> Result<Resolved> {
    let release = release::find(&spec.version)?;
    let profile = spec.profile.unwrap_or_default();

    let mut merged = parse(BASE, "base")?;
    json_patch::merge(
        &mut merged,
        &parse(profile_yaml(profile), profile.as_str())?,
    );
    let user = serde_json::to_value(spec).map_err(|source| Error::Encode {
        what: "the spec".into(),
        source,
    })?;
    json_patch::merge(&mut merged, &user);

    let mut resolved: MeshInstallationSpec = serde_json::from_value(merged).map_err(|e| {
        Error::InvalidSpec(format!(
            "the spec merged with the {} profile is not valid: {e}",
            profile.as_str()
        ))
    })?;
    resolved.profile = Some(profile);
    resolved
        .hub
        .get_or_insert_with(|| release::default_hub().to_string());
    resolved.tag.get_or_insert_with(|| release.tag.clone());
    Ok(Resolved {
        spec: resolved,
        release,
    })
}

fn parse(yaml: &str, name: &str) -> Result<Value> {
    serde_saphyr::from_str(yaml).map_err(|e| {
        Error::InvalidSpec(format!(
            "the {name} profile does not parse (an operator bug): {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use bowline_api::install::{Components, ControlPlaneComponent, GatewayComponent};

    use super::*;

    fn spec(profile: Profile) -> MeshInstallationSpec {
        MeshInstallationSpec {
            version: "v0.1.0".into(),
            profile: Some(profile),
            ..Default::default()
        }
    }

    fn enabled_gateways(gateways: &Option<Vec<GatewayComponent>>) -> Vec<&str> {
        gateways
            .iter()
            .flatten()
            .filter(|g| g.enabled.unwrap_or(true))
            .map(|g| g.name.as_str())
            .collect()
    }

    #[test]
    fn every_profile_resolves() {
        for profile in Profile::ALL {
            let resolved = resolve(&spec(profile)).unwrap();
            assert_eq!(resolved.spec.profile, Some(profile));
            assert_eq!(resolved.namespace(), "istio-system");
            assert_eq!(
                resolved.image("controlplane"),
                "ghcr.io/bowline-mesh/controlplane:0.1.0"
            );
        }
    }

    #[test]
    fn profiles_differ_as_documented() {
        let components = |p| resolve(&spec(p)).unwrap().spec.components.unwrap();
        let control_plane =
            |c: &Components| c.control_plane.as_ref().and_then(|c| c.enabled) == Some(true);

        let default = components(Profile::Default);
        assert!(control_plane(&default));
        assert_eq!(
            enabled_gateways(&default.ingress_gateways),
            ["istio-ingressgateway"]
        );
        assert!(enabled_gateways(&default.egress_gateways).is_empty());

        let demo = resolve(&spec(Profile::Demo)).unwrap().spec;
        let addons = demo.addons.unwrap();
        for addon in [
            &addons.prometheus,
            &addons.grafana,
            &addons.jaeger,
            &addons.kiali,
        ] {
            assert_eq!(addon.as_ref().and_then(|a| a.enabled), Some(true));
        }
        let mesh = demo.mesh_config.unwrap();
        assert_eq!(mesh.access_log_file.as_deref(), Some("/dev/stdout"));
        assert_eq!(
            mesh.default_config.unwrap().tracing.unwrap().sampling,
            Some(100.0)
        );
        let demo = demo.components.unwrap();
        assert_eq!(
            enabled_gateways(&demo.egress_gateways),
            ["istio-egressgateway"]
        );

        let minimal = components(Profile::Minimal);
        assert!(control_plane(&minimal));
        assert!(enabled_gateways(&minimal.ingress_gateways).is_empty());

        let empty = components(Profile::Empty);
        assert!(!control_plane(&empty));
    }

    #[test]
    fn the_user_wins_field_by_field() {
        let mut user = spec(Profile::Demo);
        user.namespace = Some("mesh".into());
        user.tag = Some("dev".into());
        user.components = Some(Components {
            control_plane: Some(ControlPlaneComponent {
                k8s: bowline_api::install::KubernetesSettings {
                    replica_count: Some(3),
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        });
        let resolved = resolve(&user).unwrap();
        let cp = resolved
            .spec
            .components
            .as_ref()
            .unwrap()
            .control_plane
            .as_ref()
            .unwrap();
        assert_eq!(cp.k8s.replica_count, Some(3), "the user's field");
        assert_eq!(cp.enabled, Some(true), "the profile's field beside it");
        let requests = cp
            .k8s
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(
            requests["cpu"].0, "10m",
            "the demo profile's resources, not base's"
        );
        assert_eq!(resolved.namespace(), "mesh");
        assert_eq!(resolved.image("proxy"), "ghcr.io/bowline-mesh/proxy:dev");
        assert_eq!(
            enabled_gateways(&resolved.spec.components.unwrap().egress_gateways),
            ["istio-egressgateway"],
            "lists the user did not set come from the profile"
        );
    }

    #[test]
    fn a_user_list_replaces_the_profile_list() {
        let mut user = spec(Profile::Default);
        user.components = Some(Components {
            ingress_gateways: Some(vec![GatewayComponent {
                name: "edge".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let resolved = resolve(&user).unwrap().spec.components.unwrap();
        assert_eq!(enabled_gateways(&resolved.ingress_gateways), ["edge"]);
    }

    #[test]
    fn an_unknown_version_is_an_invalid_spec() {
        let mut user = spec(Profile::Default);
        user.version = "v0.0.1".into();
        assert!(resolve(&user).unwrap_err().is_invalid_spec());
    }
}
