//! Which control-plane revisions an installation runs, which of them is
//! active, and which are deleted. Pure: the controller gathers the facts and
//! carries the plan out.
//!
//! The rules, for both update strategies:
//! - the spec asks for one revision (the installation's name with InPlace,
//!   `<installation>-<version with dots as dashes>` with RevisionBased);
//! - the active revision (the one workloads are injected by, and that tags
//!   following the installation point at) moves to the asked-for revision
//!   only once that revision is Ready; until then the previous active one
//!   stays. A revision that is already Ready (a rollback to one still
//!   running) becomes active at once;
//! - any other revision is kept while a tag, namespace or pod uses it, and
//!   deleted once it has been unused for the grace period.

use std::time::Duration;

use bowline_api::install::UpdateStrategyType;
use k8s_openapi::jiff::Timestamp;

use crate::error::{Error, Result};

/// The longest revision name: `istiod-<revision>` names a Service, a
/// DNS-1035 label of at most 63 characters.
pub const MAX_REVISION_NAME: usize = 56;

/// How long an unused inactive revision is kept when the spec does not say.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// The revision the spec asks for.
pub fn desired(installation: &str, strategy: UpdateStrategyType, version: &str) -> Result<String> {
    match strategy {
        UpdateStrategyType::InPlace => Ok(installation.to_string()),
        UpdateStrategyType::RevisionBased => {
            let name = format!(
                "{installation}-{}",
                version.to_ascii_lowercase().replace('.', "-")
            );
            if name.len() > MAX_REVISION_NAME {
                return Err(Error::InvalidSpec(format!(
                    "spec.version: the revision for {version} would be named {name}, longer than \
                     {MAX_REVISION_NAME} characters (it names the control plane's Service, \
                     istiod-<revision>); give the MeshInstallation a shorter name"
                )));
            }
            Ok(name)
        }
    }
}

/// The revision `installation` asks for, with its resolved spec's strategy.
pub fn asked_for(
    installation: &bowline_api::install::MeshInstallation,
    resolved: &crate::profile::Resolved,
) -> Result<String> {
    use kube::ResourceExt;
    let strategy = resolved
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_)
        .unwrap_or_default();
    desired(&installation.name_any(), strategy, &resolved.spec.version)
}

/// A revision of the installation that exists now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    pub name: String,
    /// Its control plane serves.
    pub ready: bool,
    /// Since when nothing uses it; `None` while something does.
    pub unused_since: Option<Timestamp>,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The revision the spec asks for.
    pub desired: String,
    /// The revision workloads are injected by.
    pub active: String,
    /// The revisions that keep running: the desired one, the active one,
    /// then the others still in use or in their grace period.
    pub keep: Vec<String>,
    /// Inactive revisions unused for the whole grace period.
    pub expired: Vec<String>,
    /// How long until the next kept revision's grace period ends.
    pub next_expiry: Option<Duration>,
}

impl Plan {
    /// Whether the asked-for revision is not active yet.
    pub fn waiting(&self) -> bool {
        self.desired != self.active
    }
}

pub fn plan(
    desired: &str,
    previous_active: Option<&str>,
    existing: &[Existing],
    grace: Duration,
    now: Timestamp,
) -> Plan {
    let find = |name: &str| existing.iter().find(|e| e.name == name);
    let desired_ready = find(desired).is_some_and(|e| e.ready);
    let active = match previous_active.filter(|p| find(p).is_some()) {
        Some(previous) if !desired_ready => previous.to_string(),
        _ => desired.to_string(),
    };
    let mut keep = vec![desired.to_string()];
    if active != desired {
        keep.push(active.clone());
    }
    let mut expired = Vec::new();
    let mut next_expiry: Option<Duration> = None;
    let mut others: Vec<&Existing> = existing
        .iter()
        .filter(|e| !keep.contains(&e.name))
        .collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    for revision in others {
        let Some(since) = revision.unused_since else {
            keep.push(revision.name.clone());
            continue;
        };
        // A clock that went back counts as no time passed.
        let unused_for = Duration::try_from(now.duration_since(since)).unwrap_or_default();
        match grace.checked_sub(unused_for).filter(|left| !left.is_zero()) {
            Some(left) => {
                keep.push(revision.name.clone());
                next_expiry = Some(next_expiry.map_or(left, |n| n.min(left)));
            }
            None => expired.push(revision.name.clone()),
        }
    }
    Plan {
        desired: desired.to_string(),
        active,
        keep,
        expired,
        next_expiry,
    }
}

/// A duration field of the spec (Go's syntax, which the schema's pattern
/// admits a subset of), or an error naming it.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration> {
    bowline_api::duration::parse(text).ok_or_else(|| {
        Error::InvalidSpec(format!(
            "{field}: {text:?} is not a duration; write it like 30s, 5m or 1h30m"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn revision(name: &str, ready: bool, unused_since: Option<i64>) -> Existing {
        Existing {
            name: name.into(),
            ready,
            unused_since: unused_since.map(at),
        }
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn revision_names_follow_the_strategy() {
        assert_eq!(
            desired("default", UpdateStrategyType::InPlace, "v0.2.0").unwrap(),
            "default"
        );
        assert_eq!(
            desired("default", UpdateStrategyType::RevisionBased, "v0.2.0").unwrap(),
            "default-v0-2-0"
        );
        assert_eq!(
            desired("mesh", UpdateStrategyType::RevisionBased, "v1.0.0-RC.1").unwrap(),
            "mesh-v1-0-0-rc-1"
        );
        let long = "m".repeat(50);
        let error = desired(&long, UpdateStrategyType::RevisionBased, "v0.2.0").unwrap_err();
        assert!(error.to_string().starts_with("spec.version:"), "{error}");
    }

    #[test]
    fn the_first_revision_is_active_before_it_is_ready() {
        let plan = plan("m-v1", None, &[], GRACE, at(0));
        assert_eq!(plan.active, "m-v1");
        assert_eq!(plan.keep, ["m-v1"]);
        assert!(!plan.waiting());
    }

    #[test]
    fn a_new_revision_takes_over_only_when_ready() {
        let old = revision("m-v1", true, None);
        let waiting = plan(
            "m-v2",
            Some("m-v1"),
            &[old.clone(), revision("m-v2", false, Some(0))],
            GRACE,
            at(100),
        );
        assert_eq!(waiting.active, "m-v1");
        assert!(waiting.waiting());
        assert_eq!(waiting.keep, ["m-v2", "m-v1"]);

        let promoted = plan(
            "m-v2",
            Some("m-v1"),
            &[old, revision("m-v2", true, Some(0))],
            GRACE,
            at(100),
        );
        assert_eq!(promoted.active, "m-v2");
        assert_eq!(promoted.keep, ["m-v2", "m-v1"], "in use: kept");
    }

    #[test]
    fn an_unused_inactive_revision_goes_after_the_grace_period() {
        let existing = [
            revision("m-v2", true, None),
            revision("m-v1", true, Some(100)),
        ];
        let within = plan("m-v2", Some("m-v2"), &existing, GRACE, at(110));
        assert_eq!(within.keep, ["m-v2", "m-v1"]);
        assert_eq!(within.next_expiry, Some(Duration::from_secs(20)));
        let after = plan("m-v2", Some("m-v2"), &existing, GRACE, at(130));
        assert_eq!(after.keep, ["m-v2"]);
        assert_eq!(after.expired, ["m-v1"]);
        assert_eq!(after.next_expiry, None);
    }

    #[test]
    fn rolling_back_to_a_running_revision_is_immediate() {
        let existing = [
            revision("m-v2", true, None),
            revision("m-v1", true, Some(100)),
        ];
        let back = plan("m-v1", Some("m-v2"), &existing, GRACE, at(110));
        assert_eq!(back.active, "m-v1");
        assert_eq!(back.keep, ["m-v1", "m-v2"]);
    }

    #[test]
    fn a_vanished_active_revision_gives_way_to_the_desired_one() {
        let plan = plan(
            "m-v2",
            Some("m-v1"),
            &[revision("m-v2", false, None)],
            GRACE,
            at(0),
        );
        assert_eq!(plan.active, "m-v2");
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        assert_eq!(parse_duration("f", "30s").unwrap(), Duration::from_secs(30));
        let error = parse_duration("spec.x", "soon").unwrap_err().to_string();
        assert!(
            error.starts_with("spec.x: \"soon\" is not a duration"),
            "{error}"
        );
    }
}
