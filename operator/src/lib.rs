//! The Bowline operator.
//!
//! Reconciles MeshInstallation, MeshRevision and MeshRevisionTag: renders every
//! managed object from the spec, applies it with server-side apply under one
//! field manager, and writes status.
