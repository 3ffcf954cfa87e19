//! Bowline's Kubernetes API.
//!
//! - [`install`]: `install.bowline.dev/v1alpha1`, Bowline's own API —
//!   MeshInstallation, the mesh a platform team asks for; MeshRevision, each
//!   control-plane revision it runs; MeshRevisionTag, a stable name for one.
//! - [`networking`] and [`security`]: the Istio-compatible API
//!   (`networking.istio.io`, `security.istio.io`), Istio's field names and
//!   meaning, so the Istio YAML users have applies unchanged.
//! - [`proxy`]: the proxy container and its identity volumes, for the
//!   operator's gateways and the injector's sidecars alike.
//! - [`duration`]: the one reading of durations (Go's syntax).
//! - [`crds`]: every CustomResourceDefinition Bowline serves, as the `crdgen`
//!   binary writes them to `config/crd/`.

pub mod crds;
pub mod duration;
pub mod install;
pub mod networking;
pub mod proxy;
mod schema;
pub mod security;
