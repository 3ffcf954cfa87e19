//! A delta-ADS client standing in for a proxy: it connects over TLS with a
//! ServiceAccount token or a client certificate, subscribes, keeps the
//! resources it is sent, and ACKs (or NACKs) each response as Envoy does.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub use bowline_controlplane::push::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// How the client proves who it is.
#[derive(Clone, Debug)]
pub enum Credentials {
    Token(String),
    /// A certificate chain and key from the mesh CA, in PEM.
    Certificate {
        chain: String,
        key: String,
    },
}

/// Where the control plane is and how to trust it.
#[derive(Clone, Debug)]
pub struct Target {
    pub address: String,
    pub root_pem: String,
    /// The name its serving certificate carries.
    pub server_name: String,
}

impl Target {
    pub async fn channel(&self, credentials: &Credentials) -> anyhow::Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.root_pem))
            .domain_name(&self.server_name);
        if let Credentials::Certificate { chain, key } = credentials {
            tls = tls.identity(Identity::from_pem(chain, key));
        }
        let endpoint = Channel::from_shared(format!("https://{}", self.address))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5));
        let mut last = None;
        for _ in 0..50 {
            match endpoint.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(last
            .map(anyhow::Error::from)
            .unwrap_or_else(|| anyhow::anyhow!("no connection")))
    }
}

/// A proxy's view of its delta ADS stream.
#[derive(Debug)]
pub struct XdsClient {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
    /// By type URL, then name: what the client holds.
    pub resources: BTreeMap<String, BTreeMap<String, Resource>>,
    /// Answer every response with a NACK for this type, when set.
    pub reject: Option<String>,
}

/// Istio's node id for a sidecar of pod `pod` in `namespace`.
pub fn sidecar_node_id(ip: &str, pod: &str, namespace: &str) -> String {
    format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local")
}

impl XdsClient {
    /// Opens the stream on `channel` with `credentials`; `labels` go in the
    /// node metadata, as Istio's proxies send them.
    pub async fn connect(
        channel: Channel,
        credentials: &Credentials,
        node_id: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let node = Node {
            id: node_id.to_string(),
            cluster: "test".into(),
            metadata: Some(Struct {
                fields: [(
                    "LABELS".to_string(),
                    Value {
                        kind: Some(value::Kind::StructValue(Struct {
                            fields: labels
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.to_string(),
                                        Value {
                                            kind: Some(value::Kind::StringValue(v.to_string())),
                                        },
                                    )
                                })
                                .collect(),
                        })),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        };
        let (requests, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        );
        if let Credentials::Token(token) = credentials {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        // The first request goes out with the node before the call returns.
        requests
            .send(DeltaDiscoveryRequest {
                node: Some(node),
                type_url: CLUSTER.into(),
                ..Default::default()
            })
            .await?;
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
            resources: BTreeMap::new(),
            reject: None,
        })
    }

    /// Subscribes to `names` of `type_url` (none: all, for wildcard types).
    pub async fn subscribe(&mut self, type_url: &str, names: &[String]) -> anyhow::Result<()> {
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: type_url.into(),
                resource_names_subscribe: names.to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// The next response, applied and answered (ACK, or NACK when the type
    /// is in `reject`).
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<DeltaDiscoveryResponse> {
        let response = tokio::time::timeout(timeout, self.responses.message())
            .await
            .context("no response in time")??
            .context("the stream ended")?;
        let held = self.resources.entry(response.type_url.clone()).or_default();
        for r in &response.resources {
            held.insert(r.name.clone(), r.clone());
        }
        for name in &response.removed_resources {
            held.remove(name);
        }
        let error_detail =
            (self.reject.as_deref() == Some(response.type_url.as_str())).then(|| RpcStatus {
                code: 3,
                message: "rejected by the test".into(),
                ..Default::default()
            });
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail,
                ..Default::default()
            })
            .await?;
        Ok(response)
    }

    /// Reads responses until `done` holds of what the client holds.
    pub async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for {what}; holding {:?}", self.names());
            }
            self.next(left)
                .await
                .with_context(|| format!("waiting for {what}"))?;
        }
        Ok(())
    }

    /// Names held, by type.
    pub fn names(&self) -> BTreeMap<String, Vec<String>> {
        self.resources
            .iter()
            .map(|(t, r)| {
                (
                    t.rsplit('.').next().unwrap_or(t).to_string(),
                    r.keys().cloned().collect(),
                )
            })
            .collect()
    }

    /// A held resource, decoded.
    pub fn get<T: prost::Message + Default>(&self, type_url: &str, name: &str) -> Option<T> {
        let any = self.resources.get(type_url)?.get(name)?.resource.as_ref()?;
        T::decode(any.value.as_slice()).ok()
    }
}
