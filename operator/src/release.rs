//! The releases the operator can install: a table embedded at build time from
//! `config/releases.yaml`.

use std::sync::LazyLock;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One installable release.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Release {
    /// `v0.1.0`, as `spec.version` names it.
    pub version: String,
    /// The tag of Bowline's images.
    pub tag: String,
    /// The upstream image of each addon, by addon name.
    pub addons: AddonImages,
}

/// The pinned images of the addons.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AddonImages {
    pub prometheus: String,
    pub grafana: String,
    pub jaeger: String,
    pub kiali: String,
}

#[derive(Debug, Deserialize)]
struct Table {
    hub: String,
    releases: Vec<Release>,
}

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    serde_saphyr::from_str(include_str!("../../config/releases.yaml"))
        .expect("config/releases.yaml is valid (checked by a unit test)")
});

/// The default registry and repository prefix of Bowline's images.
pub fn default_hub() -> &'static str {
    &TABLE.hub
}

/// Every release, oldest first.
pub fn all() -> &'static [Release] {
    &TABLE.releases
}

/// The release `spec.version` names, or an error that lists the known ones.
pub fn find(version: &str) -> Result<&'static Release> {
    all().iter().find(|r| r.version == version).ok_or_else(|| {
        let known: Vec<&str> = all().iter().map(|r| r.version.as_str()).collect();
        Error::InvalidSpec(format!(
            "spec.version: {version} is not a release this operator can install; \
             use one of {} or upgrade the operator",
            known.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parses_and_versions_are_unique() {
        assert!(!all().is_empty());
        let versions: std::collections::BTreeSet<&str> =
            all().iter().map(|r| r.version.as_str()).collect();
        assert_eq!(
            versions.len(),
            all().len(),
            "duplicate versions in config/releases.yaml"
        );
    }

    #[test]
    fn an_unknown_version_names_the_field_and_the_known_ones() {
        let err = find("v9.9.9").unwrap_err();
        assert!(err.is_invalid_spec());
        let message = err.to_string();
        assert!(message.starts_with("spec.version: v9.9.9"), "{message}");
        assert!(message.contains("v0.1.0"), "{message}");
    }
}
