//! The CRDs the operator was built with, applied at start-up when the
//! cluster's are older — Helm installs CRDs from a chart's `crds/` once and
//! never upgrades them — and never downgraded: a cluster whose CRDs come
//! from a newer Bowline keeps them, and this operator says so.

use bowline_api::crds::{VERSION, VERSION_ANNOTATION};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use semver::Version;

/// The field manager the operator applies CRDs with.
const MANAGER: &str = "bowline-operator";

/// What to do with one CRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Not in the cluster: create it.
    Create,
    /// Older (or of no known release): apply ours.
    Upgrade { from: Option<String> },
    /// The same release: nothing to write.
    Keep,
    /// Newer than ours: leave it.
    RefuseDowngrade { theirs: String },
}

/// The action for a CRD the cluster has at release `theirs` (its
/// annotation), `None` when it has no such CRD.
pub fn decide(ours: &Version, theirs: Option<Option<&str>>) -> Action {
    match theirs {
        None => Action::Create,
        Some(None) => Action::Upgrade { from: None },
        Some(Some(text)) => match Version::parse(text) {
            Err(_) => Action::Upgrade {
                from: Some(text.to_string()),
            },
            Ok(version) if version < *ours => Action::Upgrade {
                from: Some(text.to_string()),
            },
            Ok(version) if version == *ours => Action::Keep,
            Ok(_) => Action::RefuseDowngrade {
                theirs: text.to_string(),
            },
        },
    }
}

/// Applies every CRD of this release the cluster lacks or has older, and
/// returns what it did with each, by name.
pub async fn upgrade(client: &Client) -> Result<Vec<(String, Action)>, kube::Error> {
    let ours = Version::parse(VERSION).expect("the crate version is semver");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut done = Vec::new();
    for crd in bowline_api::crds::all() {
        let name = crd.name_any();
        let existing = api.get_opt(&name).await?;
        let action = decide(
            &ours,
            existing
                .as_ref()
                .map(|c| c.annotations().get(VERSION_ANNOTATION).map(String::as_str)),
        );
        match &action {
            Action::Create | Action::Upgrade { .. } => {
                api.patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&crd),
                )
                .await?;
                tracing::info!(crd = %name, ?action, release = VERSION, "applied the CRD");
            }
            Action::Keep => {}
            Action::RefuseDowngrade { theirs } => tracing::warn!(
                crd = %name,
                cluster = %theirs,
                operator = VERSION,
                "the cluster's CRD comes from a newer Bowline than this operator; leaving it \
                 as it is (upgrade the operator)"
            ),
        }
        done.push((name, action));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_or_unknown_crds_are_upgraded_newer_ones_kept() {
        let ours = Version::new(0, 2, 0);
        assert_eq!(decide(&ours, None), Action::Create);
        assert_eq!(decide(&ours, Some(None)), Action::Upgrade { from: None });
        assert_eq!(
            decide(&ours, Some(Some("0.1.0"))),
            Action::Upgrade {
                from: Some("0.1.0".into())
            }
        );
        assert_eq!(decide(&ours, Some(Some("0.2.0"))), Action::Keep);
        assert_eq!(
            decide(&ours, Some(Some("0.10.0"))),
            Action::RefuseDowngrade {
                theirs: "0.10.0".into()
            },
            "compared as versions, not as text"
        );
        assert_eq!(
            decide(&ours, Some(Some("not-a-version"))),
            Action::Upgrade {
                from: Some("not-a-version".into())
            }
        );
    }
}
