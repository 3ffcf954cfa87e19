//! Bowline's Kubernetes API.
//!
//! Every custom resource type Bowline serves lives here, with its validation:
//! the install API (`install.bowline.dev`: MeshInstallation, MeshRevision,
//! MeshRevisionTag) and the Istio-compatible traffic and security API
//! (`networking.istio.io`, `security.istio.io`). The `crdgen` binary writes
//! their CustomResourceDefinitions to `config/crd/`.
