//! The Bowline control plane.
//!
//! Watches Kubernetes and the Istio-compatible configuration, serves Envoy's
//! xDS v3 to proxies over delta ADS, issues SPIFFE certificates, and serves
//! the sidecar-injection and validation webhooks.
//!
//! - [`ca`]: the certificate authority, issuing SPIFFE certificates to
//!   callers authenticated by their ServiceAccount token; [`ca_service`]
//!   serves it as Istio's `IstioCertificateService` over gRPC; [`ca_store`]
//!   keeps its keys in a Secret and publishes its root in every namespace.
//! - [`model`] and [`translate`]: the mesh as plain types, and the pure
//!   translation of it and the Istio config into Envoy resources (clusters
//!   and endpoints so far).
//! - [`server`]: the process: all of the above served together.
//! - [`inject`]: the sidecar-injection patch for a pod.
//! - [`validate`]: Istio's validation rules for the Istio-compatible kinds,
//!   each error naming its field; used by the `/validate` webhook and to
//!   skip config that got in anyway.
//! - [`webhook`]: `/inject` and `/validate` over HTTPS.

pub mod ca;
pub mod ca_service;
pub mod ca_store;
pub mod discovery;
pub mod inject;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod push;
pub mod secrets;
pub mod server;
pub mod translate;
pub mod validate;
pub mod webhook;
pub mod xds;
