//! Bowline's end-to-end tests and the local Kubernetes cluster they run on.
//!
//! - [`cluster`]: a real cluster (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler, kwok) started as local processes, shared per test binary.
//! - [`agent`]: a node agent running the pods of one Node as processes in
//!   network namespaces, with Services, for the mesh end to end.
//! - [`binaries`]: where those components' binaries come from (built from the
//!   Go modules pinned in `tests/k8s` and `tests/kwok`).
//! - [`pki`]: the cluster's CA, serving and client certificates, and the
//!   ServiceAccount signing key.
//! - [`process`]: child processes that cannot outlive their parent.
//! - [`operator`]: the Bowline operator run in-process against the cluster.
//! - [`controlplane`]: the control plane run in-process on loopback ports.
//! - [`envoy`]: Envoy as a sidecar configured over ADS by the control plane.
//! - [`http`]: a plain GET for monitoring and admin ports.
//! - [`mesh`]: the whole mesh installed on a cluster with the node agent,
//!   as a user installs it, and ways to call into its pods.
//! - [`manifests`]: the repository's YAML, and the Helm chart rendered.
//! - [`olm`]: the operator's OLM bundle, made from the chart, RBAC and CRDs.
//! - [`otlp`]: an OTLP/gRPC trace collector keeping the spans it is sent.
//! - [`prometheus`]: Debian's Prometheus scraping loopback targets.
//! - [`proxy`]: bowline-proxy run in-process, upstreams on loopback, curl.
//! - [`reviews`]: a service on loopback behind ServiceEntry, subsets and a
//!   split, for a sidecar without capture.
//! - [`samples`]: what the sample apps (src/bin) share.
//! - [`usage`]: a process's resident memory and CPU time, for benchmarks.
//! - [`xds`]: a delta-ADS client standing in for a proxy.

pub mod agent;
pub mod binaries;
pub mod cluster;
pub mod controlplane;
pub mod envoy;
pub mod http;
pub mod manifests;
pub mod mesh;
pub mod netns;
pub mod olm;
pub mod operator;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod reviews;
pub mod samples;
pub mod usage;
pub mod xds;

use std::path::{Path, PathBuf};

pub use cluster::{ClusterOptions, LocalCluster};

/// What can go wrong while starting or using the local cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("local cluster binaries: {0}")]
    Binaries(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("starting {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{name} exited during start-up ({status}); its log ends:\n{log_tail}")]
    Exited {
        name: String,
        status: String,
        log_tail: String,
    },

    #[error("{component} did not become ready in time; its log ends:\n{log_tail}")]
    NotReady { component: String, log_tail: String },

    #[error("building a request: {0}")]
    Request(String),

    #[error("timed out waiting for {0}")]
    Timeout(String),

    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),

    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),

    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("encoding an object: {0}")]
    Json(#[from] serde_json::Error),

    #[error("the shared local cluster failed to start: {0}")]
    Shared(String),
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
