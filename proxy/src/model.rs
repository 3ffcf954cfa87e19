//! The proxy's configuration: every resource converted once from Envoy's
//! types into what the data path reads, held in an immutable [`Snapshot`]
//! that is replaced whole, so a request finishes on the configuration it
//! started with.

pub mod cluster;
pub mod hash;
pub mod listener;
pub mod rbac;
pub mod resilience;
pub mod route;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;

pub use cluster::{Cluster, Endpoints};
pub use listener::Listener;
pub use route::RouteTable;

use crate::error::{Error, Result};

/// A protobuf duration as a std one (negative parts read as zero).
pub fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> std::time::Duration {
    std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A map read on every request: hashed with foldhash, many times faster
/// than SipHash on short keys, and still seeded per process.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Resources by name.
pub type ByName<V> = FastMap<String, V>;

/// Everything the proxy serves with, at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub listeners: BTreeMap<String, Arc<Listener>>,
    pub routes: ByName<Arc<RouteTable>>,
    pub clusters: ByName<Arc<Cluster>>,
    /// EDS assignments by service name.
    pub endpoints: ByName<Arc<Endpoints>>,
    /// Certificates and roots by name, from SDS or the bootstrap file.
    pub secrets: ByName<Arc<crate::tls::Secret>>,
    /// Every resource as it came, for the admin endpoint's dump.
    pub raw: Arc<[Raw]>,
}

/// A resource as the control plane or the bootstrap file gave it.
#[derive(Clone, Debug)]
pub struct Raw {
    /// `type.googleapis.com/envoy.config.cluster.v3.Cluster`, …
    pub type_url: &'static str,
    pub name: String,
    /// Empty for a bootstrap file's static resources.
    pub version: String,
    pub bytes: bytes::Bytes,
}

impl Snapshot {
    /// The static resources of an Envoy bootstrap file (YAML or JSON).
    /// Every resource must convert: a file that half loads is refused.
    pub fn from_bootstrap_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bootstrap_error = |message: String| Error::Bootstrap {
            path: path.display().to_string(),
            message,
        };
        // YAML is a superset of JSON.
        let value: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| bootstrap_error(e.to_string()))?;
        let bootstrap: Bootstrap = crate::envoy::from_json(value).map_err(bootstrap_error)?;
        Self::from_bootstrap(&bootstrap)
    }

    pub fn from_bootstrap(bootstrap: &Bootstrap) -> Result<Self> {
        let mut snapshot = Self::default();
        let Some(resources) = &bootstrap.static_resources else {
            return Ok(snapshot);
        };
        let raw = |type_url, name: &str, bytes: Vec<u8>| Raw {
            type_url,
            name: name.to_string(),
            version: String::new(),
            bytes: bytes.into(),
        };
        use prost::Message as _;
        snapshot.raw = resources
            .listeners
            .iter()
            .map(|l| raw(crate::xds::LISTENER, &l.name, l.encode_to_vec()))
            .chain(
                resources
                    .clusters
                    .iter()
                    .map(|c| raw(crate::xds::CLUSTER, &c.name, c.encode_to_vec())),
            )
            .collect();
        for listener in &resources.listeners {
            let listener = Listener::from_envoy(listener)?;
            snapshot
                .listeners
                .insert(listener.name.clone(), Arc::new(listener));
        }
        for cluster in &resources.clusters {
            let cluster = Cluster::from_envoy(cluster)?;
            snapshot
                .clusters
                .insert(cluster.name.clone(), Arc::new(cluster));
        }
        for secret in &resources.secrets {
            let converted =
                crate::tls::Secret::from_envoy(secret).map_err(|(field, message)| {
                    Error::resource("Secret", &secret.name, field, message)
                })?;
            snapshot
                .secrets
                .insert(secret.name.clone(), Arc::new(converted));
        }
        Ok(snapshot)
    }

    /// A cluster's endpoints: its own list, or its EDS assignment.
    pub fn endpoints_of(&self, cluster: &Cluster) -> Option<Arc<Endpoints>> {
        match &cluster.discovery {
            cluster::Discovery::Listed(endpoints) => Some(Arc::clone(endpoints)),
            cluster::Discovery::Eds(service) => self.endpoints.get(service).cloned(),
            cluster::Discovery::OriginalDst => None,
        }
    }
}
