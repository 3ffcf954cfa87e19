//! The Bowline control plane.
//!
//! Watches Kubernetes and the Istio-compatible configuration, serves Envoy's
//! xDS v3 to proxies over delta ADS, issues SPIFFE certificates, and serves
//! the sidecar-injection and validation webhooks.
