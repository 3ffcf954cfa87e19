//! The control plane run in-process against the local cluster, on loopback
//! ports, as the tests use it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bowline_controlplane::server::{self, Settings};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::cluster::{free_port, wait_until};
use crate::xds::Target;

/// A running control plane; aborted when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    pub revision: String,
    pub namespace: String,
    /// 15012: xDS and certificates.
    pub xds_port: u16,
    pub webhook_port: u16,
    pub monitoring_port: u16,
    task: tokio::task::JoinHandle<Result<(), server::Error>>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A control plane stopped by [`ControlPlane::stop`].
#[derive(Debug)]
pub struct Stopped {
    namespace: String,
    revision: String,
    ports: (u16, u16, u16),
}

impl Stopped {
    /// Starts it again on its ports.
    pub async fn start(self, client: &Client) -> anyhow::Result<ControlPlane> {
        ControlPlane::launch_on(client, &self.namespace, &self.revision, self.ports).await
    }
}

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

impl ControlPlane {
    /// Starts revision `revision` with its CA and mesh ConfigMap in
    /// `namespace`, and waits for `/ready`.
    pub async fn start(client: &Client, namespace: &str, revision: &str) -> anyhow::Result<Self> {
        Self::start_with_webhook_port(client, namespace, revision, free_port()?).await
    }

    /// Starts revision `revision` in `namespace` as the operator deploys
    /// it: with the ServiceAccount, ClusterRole, Role and bindings the
    /// operator renders for it, and a token of that ServiceAccount — so
    /// it can do exactly what its RBAC grants. `admin` applies the RBAC.
    pub async fn start_under_rendered_rbac(
        cluster: &crate::LocalCluster,
        admin: &Client,
        namespace: &str,
        revision: &str,
    ) -> anyhow::Result<Self> {
        use bowline_api::install::MeshInstallation;
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        use kube::api::{Patch, PatchParams, PostParams};

        let mut installation: MeshInstallation = serde_json::from_value(serde_json::json!({
            "apiVersion": "install.bowline.dev/v1alpha1",
            "kind": "MeshInstallation",
            "metadata": {"name": revision, "uid": "00000000-0000-0000-0000-000000000000"},
            "spec": {"version": "v0.1.0", "profile": "minimal", "namespace": namespace},
        }))?;
        installation
            .metadata
            .uid
            .get_or_insert_with(Default::default);
        let resolved = bowline_operator::profile::resolve(&installation.spec)?;
        let objects = bowline_operator::render::render(&installation, &resolved, revision)?;
        let mut account = None;
        for managed in objects.iter().filter(|m| {
            matches!(
                m.resource.kind.as_str(),
                "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
        }) {
            let api: Api<kube::api::DynamicObject> = match managed.namespace() {
                Some(ns) => Api::namespaced_with(admin.clone(), &ns, &managed.resource),
                None => Api::all_with(admin.clone(), &managed.resource),
            };
            let mut object = managed.object.clone();
            // Owned by nothing here: no installation object exists.
            object.metadata.owner_references = None;
            api.patch(
                &managed.name(),
                &PatchParams::apply("bowline-tests").force(),
                &Patch::Apply(&object),
            )
            .await
            .with_context(|| format!("applying {}", managed.describe()))?;
            if managed.resource.kind == "ServiceAccount" {
                account = Some(managed.name());
            }
        }
        let account = account.context("a rendered ServiceAccount")?;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
        let token = accounts
            .create_token_request(
                &account,
                &PostParams::default(),
                &serde_json::from_value::<TokenRequest>(serde_json::json!({
                    "spec": {"expirationSeconds": 3600},
                }))?,
            )
            .await?
            .status
            .context("a token")?
            .token;
        crate::operator::install_crds(admin).await?;
        let client = cluster.client_with_token(&token).await?;
        Self::launch(&client, namespace, revision, free_port()?).await
    }

    /// As [`ControlPlane::start`], with the webhooks on a port chosen
    /// before (webhook configurations registered ahead name it).
    pub async fn start_with_webhook_port(
        client: &Client,
        namespace: &str,
        revision: &str,
        webhook_port: u16,
    ) -> anyhow::Result<Self> {
        // Discovery watches the Istio kinds.
        crate::operator::install_crds(client).await?;
        Self::launch(client, namespace, revision, webhook_port).await
    }

    /// Stops it, keeping its ports for [`Stopped::start`]: a pod restarted
    /// behind the same Service, that proxies reconnect to.
    pub async fn stop(mut self) -> Stopped {
        self.task.abort();
        let _ = (&mut self.task).await;
        Stopped {
            namespace: self.namespace.clone(),
            revision: self.revision.clone(),
            ports: (self.xds_port, self.webhook_port, self.monitoring_port),
        }
    }

    async fn launch(
        client: &Client,
        namespace: &str,
        revision: &str,
        webhook_port: u16,
    ) -> anyhow::Result<Self> {
        let ports = (free_port()?, webhook_port, free_port()?);
        Self::launch_on(client, namespace, revision, ports).await
    }

    /// Launches on (xDS, webhook, monitoring) ports.
    async fn launch_on(
        client: &Client,
        namespace: &str,
        revision: &str,
        (xds_port, webhook_port, monitoring_port): (u16, u16, u16),
    ) -> anyhow::Result<Self> {
        let settings = Settings {
            revision: revision.into(),
            namespace: namespace.into(),
            service: format!("istiod-{revision}.{namespace}.svc"),
            proxy_image: "ghcr.io/bowline-mesh/proxy:0.1.0".into(),
            trust_domain: "cluster.local".into(),
            max_ttl: Duration::from_secs(24 * 3600),
            ca_address: loopback(xds_port),
            webhook_address: loopback(webhook_port),
            monitoring_address: loopback(monitoring_port),
            mesh_config_map: format!("istio-{revision}"),
            instance: format!("istiod-{revision}-test"),
        };
        let task = tokio::spawn(server::run(client.clone(), settings));
        let running = Self {
            revision: revision.into(),
            namespace: namespace.into(),
            xds_port,
            webhook_port,
            monitoring_port,
            task,
        };
        wait_until("the control plane to report ready", || async {
            Ok(running
                .get("/ready")
                .await
                .is_ok_and(|(status, _)| status == 200))
        })
        .await?;
        Ok(running)
    }

    /// The CA's root, from the Secret it keeps.
    pub async fn root_pem(&self, client: &Client) -> anyhow::Result<String> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let kept = secrets
            .get("istio-ca-secret")
            .await
            .context("the CA is kept")?;
        let root = kept
            .data
            .unwrap_or_default()
            .get("root-cert.pem")
            .cloned()
            .context("a root")?;
        Ok(String::from_utf8(root.0)?)
    }

    /// Where proxies reach it, and the name its certificate carries.
    pub async fn target(&self, client: &Client) -> anyhow::Result<Target> {
        Ok(Target {
            address: format!("127.0.0.1:{}", self.xds_port),
            root_pem: self.root_pem(client).await?,
            server_name: format!("istiod-{}.{}.svc", self.revision, self.namespace),
        })
    }

    /// A GET on the monitoring port: status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http::get(self.monitoring_port, path).await
    }
}
