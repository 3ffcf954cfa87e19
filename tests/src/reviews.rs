//! The tests' `reviews` service for a proxy on loopback: v1 on 127.0.0.2
//! and v2 on 127.0.0.3, the endpoints of a MESH_INTERNAL ServiceEntry for
//! the service's name (Kubernetes refuses loopback addresses in
//! EndpointSlices; Istio allows such entries for workloads outside
//! Kubernetes), a DestinationRule with a subset per version, a
//! VirtualService splitting between them, and a Sidecar that binds the
//! outbound port on 127.0.0.1 since nothing is captured.

use anyhow::Context;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::cluster::free_port;
use crate::proxy::upstream_on;

#[derive(Clone)]
pub struct Reviews {
    client: Client,
    pub namespace: String,
    /// The outbound port the sidecar binds on 127.0.0.1.
    pub service_port: u16,
}

impl std::fmt::Debug for Reviews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviews")
            .field("namespace", &self.namespace)
            .field("service_port", &self.service_port)
            .finish_non_exhaustive()
    }
}

impl Reviews {
    /// Starts v1 and v2 (answering `v1 <path> <host>` and `v2 …`) and
    /// applies the Istio objects, split 90/10.
    pub async fn deploy(client: &Client, namespace: &str) -> anyhow::Result<Self> {
        let v1 = upstream_on([127, 0, 0, 2], "v1").await?;
        let v2 = upstream_on([127, 0, 0, 3], "v2").await?;
        let reviews = Self {
            client: client.clone(),
            namespace: namespace.into(),
            service_port: free_port()?,
        };
        reviews.apply("ServiceEntry", json!({
            "metadata": {"name": "reviews"},
            "spec": {
                "hosts": [reviews.host()],
                "location": "MESH_INTERNAL", "resolution": "STATIC",
                "ports": [{"number": reviews.service_port, "name": "http", "protocol": "HTTP"}],
                "endpoints": [
                    {"address": "127.0.0.2", "ports": {"http": v1.port()}, "labels": {"version": "v1"}},
                    {"address": "127.0.0.3", "ports": {"http": v2.port()}, "labels": {"version": "v2"}},
                ],
            },
        })).await?;
        reviews
            .apply(
                "DestinationRule",
                json!({
                    "metadata": {"name": "reviews"},
                    "spec": {"host": "reviews", "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}},
                    ]},
                }),
            )
            .await?;
        reviews.split(90, 10).await?;
        reviews.sidecar(false).await?;
        Ok(reviews)
    }

    pub fn host(&self) -> String {
        format!("reviews.{}.svc.cluster.local", self.namespace)
    }

    /// Where a client of the sidecar sends its requests.
    pub fn address(&self) -> std::net::SocketAddr {
        (std::net::Ipv4Addr::LOCALHOST, self.service_port).into()
    }

    /// [`Self::address`] as a URL, with `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address())
    }

    /// The Sidecar: the proxy listens for reviews on 127.0.0.1, and with
    /// `registry_only` lets out only hosts of the registry.
    pub async fn sidecar(&self, registry_only: bool) -> anyhow::Result<()> {
        self.apply(
            "Sidecar",
            json!({"metadata": {"name": "default"}, "spec": self.sidecar_spec(registry_only)}),
        )
        .await
    }

    /// [`Self::sidecar`]'s spec, for a test to add to.
    pub fn sidecar_spec(&self, registry_only: bool) -> serde_json::Value {
        let mut spec = json!({"egress": [{
            "port": {"number": self.service_port, "protocol": "HTTP", "name": "http"},
            "bind": "127.0.0.1", "captureMode": "NONE", "hosts": ["./*"],
        }]});
        if registry_only {
            spec["outboundTrafficPolicy"] = json!({"mode": "REGISTRY_ONLY"});
        }
        spec
    }

    /// Routes `v1` % to v1 and `v2` % to v2, with retries and a timeout.
    pub async fn split(&self, v1: u32, v2: u32) -> anyhow::Result<()> {
        self.apply(
            "VirtualService",
            json!({
                "metadata": {"name": "reviews"},
                "spec": {"hosts": ["reviews"], "http": [{
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
                        {"destination": {"host": "reviews", "subset": "v2"}, "weight": v2},
                    ],
                    "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure"},
                    "timeout": "10s",
                }]},
            }),
        )
        .await
    }

    /// Applies an Istio `networking.istio.io/v1` object of `kind` in the
    /// namespace.
    pub async fn apply(&self, kind: &str, mut object: serde_json::Value) -> anyhow::Result<()> {
        object["apiVersion"] = json!("networking.istio.io/v1");
        object["kind"] = json!(kind);
        apply_istio(&self.client, &self.namespace, object).await
    }
}

/// Server-side applies an Istio object (its `apiVersion` and `kind` say
/// which) in `namespace`, as the tests' field manager.
pub async fn apply_istio(
    client: &Client,
    namespace: &str,
    object: serde_json::Value,
) -> anyhow::Result<()> {
    let (group, version) = object["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .context("an apiVersion group/version")?;
    let kind = object["kind"].as_str().context("a kind")?;
    let name = object["metadata"]["name"].as_str().context("a name")?;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind)),
    );
    api.patch(
        name,
        &PatchParams::apply("bowline-tests").force(),
        &Patch::Apply(&object),
    )
    .await?;
    Ok(())
}
