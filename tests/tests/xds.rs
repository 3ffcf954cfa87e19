//! The control plane's xDS server on the local cluster: a proxy stand-in
//! authenticates with a real ServiceAccount token, gets the clusters,
//! endpoints, listeners and routes its VirtualService and DestinationRule
//! make, and gets a VirtualService change and the identity of a new pod of
//! another ServiceAccount (an endpoint change the clusters must follow);
//! invalid config that got past the webhook is skipped alone and reported;
//! a proxy claiming another namespace than its identity is refused; a NACK
//! is recorded. The control plane runs under the RBAC the operator renders
//! for it.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bowline_controlplane::ca::AUDIENCE;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::service_account_token;
use bowline_tests::cluster::{create_namespace, wait_until};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::reviews::apply_istio;
use bowline_tests::xds::{
    CLUSTER, Credentials, ENDPOINT, LISTENER, ROUTE, XdsClient, sidecar_node_id,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use k8s_openapi::api::core::v1::{Event, Pod, Service, ServiceAccount};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use prost::Message;
use serde_json::json;

async fn token(client: &Client, namespace: &str, account: &str) -> anyhow::Result<String> {
    Ok(service_account_token(client, namespace, account, Some(AUDIENCE)).await?)
}

fn split(host: &str, v1: u32, v2: u32) -> serde_json::Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": host, "subset": "v1"}, "weight": v1},
            {"destination": {"host": host, "subset": "v2"}, "weight": v2},
        ]}]},
    })
}

/// The weights of the route for `host` in route configuration `9080`.
fn weights(client: &XdsClient, host: &str) -> Option<Vec<(String, u32)>> {
    let config: RouteConfiguration = client.get(ROUTE, "9080")?;
    let vhost = config
        .virtual_hosts
        .iter()
        .find(|v| v.name == format!("{host}:9080"))?;
    match vhost.routes.first()?.action.as_ref()? {
        route::Action::Route(action) => match action.cluster_specifier.as_ref()? {
            route_action::ClusterSpecifier::WeightedClusters(w) => Some(
                w.clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                    .collect(),
            ),
            route_action::ClusterSpecifier::Cluster(c) => Some(vec![(c.clone(), 100)]),
            _ => None,
        },
        _ => None,
    }
}

/// The identities cluster `name` accepts from endpoints with a sidecar:
/// the SANs of its mesh TLS transport socket.
fn peer_identities(client: &XdsClient, name: &str) -> Vec<String> {
    let Some(cluster) = client.get::<Cluster>(CLUSTER, name) else {
        return Vec::new();
    };
    cluster
        .transport_socket_matches
        .iter()
        .filter_map(
            |m| match m.transport_socket.as_ref()?.config_type.as_ref()? {
                transport_socket::ConfigType::TypedConfig(any) => {
                    UpstreamTlsContext::decode(any.value.as_slice()).ok()
                }
            },
        )
        .filter_map(
            |tls| match tls.common_tls_context?.validation_context_type? {
                common_tls_context::ValidationContextType::CombinedValidationContext(combined) => {
                    combined.default_validation_context
                }
                _ => None,
            },
        )
        .flat_map(|validation| validation.match_typed_subject_alt_names)
        .filter_map(|san| match san.matcher?.match_pattern? {
            string_matcher::MatchPattern::Exact(id) => Some(id),
            _ => None,
        })
        .collect()
}

/// Waits for a Warning event with `reason` on the `kind` called `name`
/// whose message says each of `saying`.
async fn warned(
    events: &Api<Event>,
    (reason, kind, name): (&str, &str, &str),
    saying: &[&str],
) -> anyhow::Result<()> {
    wait_until(&format!("a {reason} event on {kind} {name}"), || async {
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.involved_object.kind.as_deref() == Some(kind)
                    && e.involved_object.name.as_deref() == Some(name)
                    && e.message
                        .as_deref()
                        .is_some_and(|m| saying.iter().all(|s| m.contains(s)))
            }))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_proxy_follows_the_mesh_config() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "xds").await?;
    let apps = format!("{mesh}-apps");
    create_namespace(&client, &apps, json!({})).await?;
    // Under the RBAC the operator renders for it, as it runs for real.
    let control_plane =
        ControlPlane::start_under_rendered_rbac(cluster, &client, &mesh, "xds").await?;
    let host = format!("reviews.{apps}.svc.cluster.local");

    // reviews v1 and v2 behind a Service; the EndpointSlice controller
    // lists the pods kwok reports ready.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps);
    for version in ["v1", "v2"] {
        pods.create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": format!("reviews-{version}"), "labels": {"app": "reviews", "version": version},
                         "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": {"containers": [{"name": "reviews", "image": "registry.example/reviews:1"}]},
        }))?).await?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), &apps);
    services.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "reviews"},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]},
    }))?).await?;
    apply_istio(
        &client,
        &apps,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews"},
            "spec": {"host": "reviews", "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ]},
        }),
    )
    .await?;
    apply_istio(&client, &apps, split("reviews", 90, 10)).await?;

    let target = control_plane.target(&client).await?;
    let credentials = Credentials::Token(token(&client, &apps, "productpage").await?);
    let node = sidecar_node_id("10.244.200.1", "productpage-1", &apps);
    let mut proxy = XdsClient::connect(
        target.channel(&credentials).await?,
        &credentials,
        &node,
        &[("app", "productpage")],
    )
    .await?;

    let v1 = format!("outbound|9080|v1|{host}");
    let v2 = format!("outbound|9080|v2|{host}");
    proxy
        .until("the subsets' clusters", Duration::from_secs(10), |p| {
            p.resources
                .get(CLUSTER)
                .is_some_and(|c| c.contains_key(&v1) && c.contains_key(&v2))
        })
        .await?;
    proxy.subscribe(LISTENER, &[]).await?;
    proxy
        .until(
            "the outbound and inbound listeners",
            Duration::from_secs(10),
            |p| {
                p.resources.get(LISTENER).is_some_and(|l| {
                    l.contains_key("0.0.0.0_9080")
                        && l.contains_key("virtualInbound")
                        && l.contains_key("virtualOutbound")
                })
            },
        )
        .await?;
    proxy.subscribe(ROUTE, &["9080".into()]).await?;
    proxy.subscribe(ENDPOINT, &[v1.clone(), v2.clone()]).await?;
    proxy
        .until(
            "the 90/10 route and each subset's endpoint",
            Duration::from_secs(10),
            |p| {
                let one_each = [&v1, &v2].iter().all(|c| {
                    p.get::<ClusterLoadAssignment>(ENDPOINT, c)
                        .is_some_and(|a| {
                            a.endpoints
                                .iter()
                                .map(|l| l.lb_endpoints.len())
                                .sum::<usize>()
                                == 1
                        })
                });
                weights(p, &host) == Some(vec![(v1.clone(), 90), (v2.clone(), 10)]) && one_each
            },
        )
        .await?;

    // A change reaches the proxy: the time from the API server's answer to
    // the new route, as the issue asks, with 100 ms of debounce in it.
    let changed = Instant::now();
    apply_istio(&client, &apps, split("reviews", 75, 25)).await?;
    proxy
        .until("the 75/25 route", Duration::from_secs(10), |p| {
            weights(p, &host) == Some(vec![(v1.clone(), 75), (v2.clone(), 25)])
        })
        .await?;
    let took = changed.elapsed();
    println!("a VirtualService change reached the proxy in {took:?}");
    ensure!(took < Duration::from_secs(1), "the change took {took:?}");

    // Config that got past validation is skipped alone: a second
    // VirtualService with bad weights is reported, and the route stays.
    apply_istio(
        &client,
        &apps,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "ratings"},
            "spec": {"hosts": ["ratings"], "http": [{"route": [
                {"destination": {"host": "ratings"}, "weight": 60},
                {"destination": {"host": "ratings"}, "weight": 50},
            ]}]},
        }),
    )
    .await?;
    let events: Api<Event> = Api::namespaced(client.clone(), &apps);
    warned(
        &events,
        ("InvalidConfig", "VirtualService", "ratings"),
        &["spec.http[0].route", "110"],
    )
    .await?;
    // A DestinationRule setting a field that is read but not acted on is
    // applied, and whoever wrote it is told which field.
    apply_istio(
        &client,
        &apps,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "ratings"},
            "spec": {"host": "ratings", "trafficPolicy": {
                "loadBalancer": {"simple": "RANDOM", "warmupDurationSecs": "30s"}}},
        }),
    )
    .await?;
    warned(
        &events,
        ("UnsupportedFields", "DestinationRule", "ratings"),
        &["spec.trafficPolicy.loadBalancer.warmupDurationSecs"],
    )
    .await?;
    let (_, metrics) = control_plane.get("/metrics").await?;
    ensure!(
        metrics.contains("pilot_total_rejected_configs_total{kind=\"VirtualService\"} 1"),
        "{metrics}"
    );
    ensure!(
        metrics.contains("pilot_xds 1"),
        "one proxy connected: {metrics}"
    );
    ensure!(
        metrics.contains("pilot_xds_pushes_total{type=\"rds\"}"),
        "{metrics}"
    );
    apply_istio(&client, &apps, split("reviews", 50, 50)).await?;
    proxy
        .until(
            "the 50/50 route, beside the bad config",
            Duration::from_secs(10),
            |p| weights(p, &host) == Some(vec![(v1.clone(), 50), (v2.clone(), 50)]),
        )
        .await?;

    // A pod of another ServiceAccount joins reviews: only endpoints
    // changed, but the clusters must now accept its identity too, or the
    // proxy refuses the new pod's certificate.
    let all = format!("outbound|9080||{host}");
    let identity = |account: &str| format!("spiffe://cluster.local/ns/{apps}/sa/{account}");
    ensure!(
        peer_identities(&proxy, &all) == [identity("default")],
        "{all} accepts: {:?}",
        peer_identities(&proxy, &all)
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &apps);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "reviews-v3"},
            }))?,
        )
        .await?;
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "reviews-v3", "labels": {"app": "reviews", "version": "v3"},
                         "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": {"serviceAccountName": "reviews-v3",
                     "containers": [{"name": "reviews", "image": "registry.example/reviews:1"}]},
        }))?,
    )
    .await?;
    proxy
        .until(
            "the new pod's identity in the service's clusters",
            Duration::from_secs(10),
            |p| {
                [&all, &v1, &v2]
                    .iter()
                    .all(|c| peer_identities(p, c) == [identity("default"), identity("reviews-v3")])
            },
        )
        .await?;

    // /debug/syncz: the proxy and the pushes it ACKed.
    let (status, syncz) = control_plane.get("/debug/syncz").await?;
    ensure!(status == 200, "{syncz}");
    let syncz: serde_json::Value = serde_json::from_str(&syncz)?;
    let entry = syncz
        .as_array()
        .and_then(|a| a.iter().find(|p| p["proxy"] == node.as_str()))
        .context("the proxy in syncz")?;
    for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        ensure!(
            entry["acked"][type_url].is_u64(),
            "{type_url} ACKed: {entry}"
        );
    }
    ensure!(
        entry["identity"] == format!("spiffe://cluster.local/ns/{apps}/sa/productpage"),
        "{entry}"
    );
    let (status, dump) = control_plane
        .get(&format!("/debug/config_dump?proxy={node}"))
        .await?;
    ensure!(
        status == 200 && dump.contains(&v1),
        "config dump: {status} {dump}"
    );

    // A NACK: the proxy keeps what it had, the server records it.
    proxy.reject = Some(ROUTE.into());
    apply_istio(&client, &apps, split("reviews", 20, 80)).await?;
    proxy
        .until("the pushed route (to NACK)", Duration::from_secs(10), |p| {
            weights(p, &host) == Some(vec![(v1.clone(), 20), (v2.clone(), 80)])
        })
        .await?;
    wait_until("the NACK in syncz and metrics", || async {
        let syncz = control_plane
            .get("/debug/syncz")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        let metrics = control_plane
            .get("/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        Ok(syncz.contains("rejected by the test")
            && metrics.contains("pilot_total_xds_rejects_total{type=\"rds\"} 1"))
    })
    .await?;

    // Identity comes from the token, not the node id.
    let other = Credentials::Token(token(&client, &mesh, "intruder").await?);
    let mut claimed = XdsClient::connect(
        target.channel(&other).await?,
        &other,
        &sidecar_node_id("10.244.200.2", "productpage-2", &apps),
        &[],
    )
    .await?;
    let refused = claimed
        .next(Duration::from_secs(10))
        .await
        .expect_err("a proxy claiming another namespace");
    ensure!(
        format!("{refused:#}").contains("says namespace"),
        "{refused:#}"
    );
    let forged = Credentials::Token("not-a-token".into());
    let refused = XdsClient::connect(target.channel(&forged).await?, &forged, &node, &[]).await;
    let status = refused
        .expect_err("a forged token")
        .downcast::<tonic::Status>()
        .context("a gRPC status")?;
    ensure!(
        status.code() == tonic::Code::Unauthenticated,
        "a forged token: {status:?}"
    );
    Ok(())
}
