//! Where the CA's keys live, and where its root is published.
//!
//! - A plugged-in CA: Istio's `cacerts` Secret in the control plane's
//!   namespace (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//!   `cert-chain.pem`), used as it is.
//! - Otherwise a self-signed root kept in `istio-ca-secret` (same keys),
//!   made on the first start; a replica that loses the race to create it
//!   reads the winner's.
//! - The root goes to the `istio-ca-root-cert` ConfigMap (`root-cert.pem`)
//!   in every namespace, where proxies mount it, and is put back if anyone
//!   changes it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::ca::{Authority, CaFiles, Error};

/// Istio's Secret for a plugged-in CA.
pub const PLUGGED_SECRET: &str = "cacerts";
/// Istio's Secret for the self-signed root.
pub const SELF_SIGNED_SECRET: &str = "istio-ca-secret";
/// The ConfigMap proxies read the root from, and its key.
pub const ROOT_CONFIG_MAP: &str = bowline_api::proxy::ROOT_CERT_CONFIG_MAP;
pub const ROOT_KEY: &str = "root-cert.pem";
/// The field manager of what the control plane writes.
pub const FIELD_MANAGER: &str = "bowline-controlplane";

/// The CA files a Secret holds, if it holds them.
fn files_of(secret: &Secret) -> Option<CaFiles> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.trim().is_empty())
    };
    let ca_cert = text("ca-cert.pem")?;
    Some(CaFiles {
        ca_key: text("ca-key.pem")?,
        root_cert: text("root-cert.pem").unwrap_or_else(|| ca_cert.clone()),
        cert_chain: text("cert-chain.pem").unwrap_or_else(|| ca_cert.clone()),
        ca_cert,
    })
}

fn secret_of(name: &str, files: &CaFiles) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(BTreeMap::from([
            ("ca-cert.pem".to_string(), bytes(&files.ca_cert)),
            ("ca-key.pem".to_string(), bytes(&files.ca_key)),
            ("root-cert.pem".to_string(), bytes(&files.root_cert)),
            ("cert-chain.pem".to_string(), bytes(&files.cert_chain)),
        ])),
        ..Default::default()
    }
}

/// The CA of the control plane in `namespace`: plugged in, kept, or made
/// and kept now.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    trust_domain: &str,
    max_ttl: Duration,
) -> Result<Authority, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    // A plugged-in CA first, then the one kept from an earlier start.
    for name in [PLUGGED_SECRET, SELF_SIGNED_SECRET] {
        if let Some(files) = secrets.get_opt(name).await?.as_ref().and_then(files_of) {
            return Authority::from_files(files, trust_domain, max_ttl);
        }
    }
    let authority = Authority::self_signed(trust_domain, max_ttl)?;
    match secrets
        .create(
            &PostParams::default(),
            &secret_of(SELF_SIGNED_SECRET, authority.files()),
        )
        .await
    {
        Ok(_) => Ok(authority),
        // Another replica made it first: use theirs, so all sign alike.
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            let secret = secrets.get(SELF_SIGNED_SECRET).await?;
            let files = files_of(&secret).ok_or_else(|| {
                Error::Store(format!(
                    "Secret {namespace}/{SELF_SIGNED_SECRET} exists but holds no CA"
                ))
            })?;
            Authority::from_files(files, trust_domain, max_ttl)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes the root into `namespace`'s `istio-ca-root-cert` ConfigMap.
pub async fn publish_root(client: &Client, namespace: &str, root: &str) -> Result<(), Error> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CONFIG_MAP.into()),
            labels: Some(BTreeMap::from([(
                "istio.io/config".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(ROOT_KEY.to_string(), root.to_string())])),
        ..Default::default()
    };
    config_maps
        .patch(
            ROOT_CONFIG_MAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await?;
    Ok(())
}

/// Keeps the root published in every namespace: on every namespace that
/// appears, and whenever someone changes or deletes a root ConfigMap. Runs
/// until the watches end.
pub async fn publish_root_everywhere(client: Client, root: String) {
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects()
    .map_ok(|ns| ns.name_any());
    let config_maps = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIG_MAP}")),
    )
    .default_backoff()
    .touched_objects()
    .try_filter_map(|cm| {
        let namespace = cm.namespace();
        let current = cm.data.as_ref().and_then(|d| d.get(ROOT_KEY)).cloned();
        async move { Ok(namespace.map(|ns| (ns, current))) }
    });
    let root_for_check = root.clone();
    let config_maps = config_maps.try_filter_map(move |(namespace, current)| {
        let stale = current.as_deref() != Some(root_for_check.as_str());
        async move { Ok(stale.then_some(namespace)) }
    });
    let mut triggers = futures::stream::select(namespaces.boxed(), config_maps.boxed());
    while let Some(event) = triggers.next().await {
        let namespace = match event {
            Ok(namespace) => namespace,
            Err(e) => {
                tracing::warn!(error = %e, "watching namespaces and root ConfigMaps");
                continue;
            }
        };
        if let Err(e) = publish_root(&client, &namespace, &root).await {
            // A namespace being deleted refuses new objects: nothing to do.
            tracing::debug!(%namespace, error = %e, "publishing the root certificate");
        }
    }
}
