//! The Bowline operator.
//!
//! - [`profile`]: profiles, and resolving a spec into what gets installed.
//! - [`release`]: the releases the operator can install.
//! - [`render`]: the pure function from a resolved spec to Kubernetes objects.
//! - [`apply`]: server-side apply, drift detection, pruning, the namespace.
//! - [`status`]: conditions and component readiness, computed purely.
//! - [`controller`]: the reconciler that puts these together.
//! - [`metrics`]: the operator's own metrics.
//! - [`error`]: the one error type, and whether an error is worth retrying.

pub mod apply;
pub mod controller;
pub mod error;
pub mod metrics;
pub mod profile;
pub mod release;
pub mod render;
pub mod status;
