//! Bowline's Kubernetes API.
//!
//! - [`install`]: `install.bowline.dev/v1alpha1`, Bowline's own API —
//!   MeshInstallation, the mesh a platform team asks for; MeshRevision, each
//!   control-plane revision it runs; MeshRevisionTag, a stable name for one.
//! - [`networking`] and [`security`]: the Istio-compatible API
//!   (`networking.istio.io`, `security.istio.io`), Istio's field names and
//!   meaning, so the Istio YAML users have applies unchanged.
//! - [`crds`]: every CustomResourceDefinition Bowline serves, as the `crdgen`
//!   binary writes them to `config/crd/`.

pub mod crds;
pub mod install;
pub mod networking;
mod schema;
pub mod security;
