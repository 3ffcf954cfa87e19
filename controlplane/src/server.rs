//! The control plane as a process: discovery feeding the xDS server, the CA
//! (keys from [`ca_store`]) and its gRPC certificate service on the same
//! TLS port, the webhooks with a serving certificate from the CA, the root
//! published in every namespace, the webhook configurations of this
//! revision given their caBundle, and on the monitoring port `/ready` (once
//! all of that serves), `/metrics`, `/debug/syncz` and
//! `/debug/config_dump?proxy=<id>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca;
use crate::ca_service::CertificateService;
use crate::ca_store;
use crate::discovery;
use crate::inject::Injection;
use crate::metrics::Metrics;
use crate::ops;
use crate::push::Push;
use crate::secrets::Secrets;
use crate::webhook::{self, Webhooks};
use crate::xds::{Authenticator, Discovery};

/// What the operator's rendering hands the control plane (its env).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `REVISION`: the `istio.io/rev` this control plane serves.
    pub revision: String,
    /// `POD_NAMESPACE`: where its Secrets live.
    pub namespace: String,
    /// `ISTIOD_SERVICE`: `istiod[-rev].<ns>.svc`, the name its serving
    /// certificate carries.
    pub service: String,
    /// `PROXY_IMAGE`: what injection puts in pods.
    pub proxy_image: String,
    pub trust_domain: String,
    /// Certificates are issued for at most this long.
    pub max_ttl: Duration,
    /// 15012: certificates over gRPC and TLS.
    pub ca_address: SocketAddr,
    /// 15017: the webhooks.
    pub webhook_address: SocketAddr,
    /// 15014: `/ready`, `/metrics`, `/debug/*`.
    pub monitoring_address: SocketAddr,
    /// The mesh ConfigMap (`istio[-<rev>]`) in `namespace`.
    pub mesh_config_map: String,
    /// This pod's name, for the Events it records.
    pub instance: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ca(#[from] ca::Error),
    #[error("listening on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Webhook(#[from] webhook::Error),
    #[error("the certificate service: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Runs until a server fails.
pub async fn run(client: Client, settings: Settings) -> Result<(), Error> {
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::default());
    let monitoring = bind(settings.monitoring_address).await?;

    // Discovery first: proxies are served once the first push is out.
    let (pushes_tx, mut pushes) = watch::channel(Arc::new(Push {
        number: 0,
        config: 0,
        snapshot: Default::default(),
        since: std::time::Instant::now(),
    }));
    let discovery = tokio::spawn(discovery::run(
        client.clone(),
        discovery::Settings {
            revision: settings.revision.clone(),
            namespace: settings.namespace.clone(),
            mesh_config_map: settings.mesh_config_map.clone(),
            trust_domain: settings.trust_domain.clone(),
            instance: settings.instance.clone(),
        },
        pushes_tx,
        metrics.clone(),
    ));

    let authority = Arc::new(
        ca_store::load_or_create(
            &client,
            &settings.namespace,
            &settings.trust_domain,
            settings.max_ttl,
        )
        .await?,
    );
    let xds = Discovery::new(
        pushes.clone(),
        Authenticator {
            client: Some(client.clone()),
            trust_domain: settings.trust_domain.clone(),
        },
        metrics.clone(),
    )
    .with_secrets(Arc::new(Secrets::new(authority.clone())));
    let monitor = ops::router(ready.clone(), metrics.clone(), xds.clone());
    let monitoring = tokio::spawn(async move { axum::serve(monitoring, monitor).await });

    let mut names = vec![settings.service.clone()];
    if let Some(short) = settings.service.strip_suffix(".svc") {
        names.push(short.to_string());
        names.push(format!("{}.svc.cluster.local", short));
    }
    let ips = [settings.webhook_address.ip(), settings.ca_address.ip()]
        .into_iter()
        .filter(|ip| ip.is_loopback())
        .collect::<Vec<_>>();
    let (chain, key) = authority.serving_certificate(&names, &ips, ca::DEFAULT_TTL)?;

    let webhooks = webhook::router(Webhooks {
        injection: Injection {
            revision: settings.revision.clone(),
            discovery_address: format!("{}:15012", settings.service),
            proxy_image: settings.proxy_image.clone(),
        },
    });
    let webhook_listener = bind(settings.webhook_address).await?;
    let (webhook_chain, webhook_key) = (chain.clone(), key.clone());
    let webhooks = tokio::spawn(async move {
        webhook::serve_tls(webhook_listener, &webhook_chain, &webhook_key, webhooks).await
    });

    let certificates =
        CertificateService::new(authority.clone(), client.clone()).with_metrics(metrics.clone());
    // Proxies present a mesh certificate or a ServiceAccount token.
    let _ = pushes.wait_for(|p| p.number > 0).await;
    let ca_server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(chain, key))
                .client_ca_root(tonic::transport::Certificate::from_pem(
                    authority.root_pem(),
                ))
                .client_auth_optional(true),
        )?
        .add_service(certificates)
        .add_service(xds.server())
        .serve(settings.ca_address);
    let ca_server = tokio::spawn(ca_server);

    let root = authority.root_pem().to_string();
    let publisher = tokio::spawn(ca_store::publish_root_everywhere(
        client.clone(),
        root.clone(),
    ));
    let bundles = tokio::spawn(keep_ca_bundles(
        client.clone(),
        settings.revision.clone(),
        root,
    ));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(revision = %settings.revision, "control plane serving");

    tokio::select! {
        result = webhooks => result.unwrap_or(Ok(()))?,
        result = ca_server => result.unwrap_or(Ok(()))?,
        _ = monitoring => {}
        _ = discovery => {}
        _ = publisher => {}
        _ = bundles => {}
    }
    Ok(())
}

/// Reads the mesh config file: YAML with Istio's MeshConfig field names. A
/// missing file is an empty config (the operator always renders one).
pub fn read_mesh_config(
    path: &std::path::Path,
) -> Result<bowline_api::install::MeshConfig, MeshConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(MeshConfigError::Read(path.display().to_string(), e)),
    };
    if text.trim().is_empty() {
        return Ok(Default::default());
    }
    serde_saphyr::from_str(&text)
        .map_err(|e| MeshConfigError::Parse(path.display().to_string(), e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("reading the mesh config {0}: {1}")]
    Read(String, std::io::Error),
    #[error("the mesh config {0} is not valid: {1}")]
    Parse(String, String),
}

async fn bind(address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|source| Error::Listen { address, source })
}

/// Gives every webhook configuration of `revision` (labelled
/// `istio.io/rev=<revision>`: its injector, its tags' injectors, its
/// validator) the root as caBundle, and turns validation to Fail once this
/// control plane serves it (the operator creates it with Ignore so that
/// config can be applied before).
async fn keep_ca_bundles(client: Client, revision: String, root: String) {
    let selector = format!("istio.io/rev={revision}");
    let bundle = ByteString(root.into_bytes());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mutating_changes = watcher(
        mutating.clone(),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff()
    .applied_objects()
    .map(|r| r.map(|w| (true, w.name_any())));
    let validating_changes = watcher(
        validating.clone(),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff()
    .applied_objects()
    .map(|r| r.map(|w| (false, w.name_any())));
    let mut changes = futures::stream::select(mutating_changes.boxed(), validating_changes.boxed());
    while let Some(change) = changes.next().await {
        let (is_mutating, name) = match change {
            Ok(change) => change,
            Err(e) => {
                tracing::warn!(error = %e, "watching webhook configurations");
                continue;
            }
        };
        let result = if is_mutating {
            patch_bundles(&mutating, &name, &bundle, false).await
        } else {
            patch_bundles(&validating, &name, &bundle, true).await
        };
        if let Err(e) = result {
            tracing::warn!(%name, error = %e, "setting a webhook's caBundle");
        }
    }
}

/// Sets caBundle (and, for validation, failurePolicy Fail) on each webhook
/// of the configuration that lacks it; writes nothing when all have it.
async fn patch_bundles<K>(
    api: &Api<K>,
    name: &str,
    bundle: &ByteString,
    fail_closed: bool,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let Some(current) = api.get_opt(name).await? else {
        return Ok(());
    };
    let value = serde_json::to_value(&current).unwrap_or_default();
    let webhooks = value["webhooks"].as_array().cloned().unwrap_or_default();
    let encoded = serde_json::to_value(bundle).unwrap_or_default();
    let mut operations = Vec::new();
    for (i, webhook) in webhooks.iter().enumerate() {
        if webhook["clientConfig"]["caBundle"] != encoded {
            operations.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
        }
        if fail_closed && webhook["failurePolicy"] != "Fail" {
            operations.push(json!({"op": "add", "path": format!("/webhooks/{i}/failurePolicy"), "value": "Fail"}));
        }
    }
    if operations.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch =
        serde_json::from_value(json!(operations)).map_err(kube::Error::SerdeError)?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_config_names_the_trust_domain() {
        let dir = std::env::temp_dir().join(format!("bowline-mesh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mesh");
        std::fs::write(
            &file,
            "trustDomain: example.org\naccessLogFile: /dev/stdout\n",
        )
        .unwrap();
        let mesh = read_mesh_config(&file).unwrap();
        assert_eq!(mesh.trust_domain.as_deref(), Some("example.org"));
        assert_eq!(
            read_mesh_config(&dir.join("absent")).unwrap(),
            Default::default()
        );
        std::fs::write(&file, "trustDomain: [not, a, string]\n").unwrap();
        let error = read_mesh_config(&file).unwrap_err().to_string();
        assert!(error.contains("is not valid"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
