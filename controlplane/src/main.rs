//! `bowline-controlplane`: configured by the environment the operator
//! renders (REVISION, POD_NAMESPACE, ISTIOD_SERVICE, PROXY_IMAGE), with
//! flags for the addresses.

use std::net::SocketAddr;
use std::time::Duration;

use bowline_controlplane::server::{self, Settings};
use clap::Parser;

// Pushes allocate and free large buffers per proxy; jemalloc does that
// with about half the CPU time of the system allocator
// (`make bench-controlplane`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(version, about = "The Bowline control plane")]
struct Args {
    /// The revision served (`istio.io/rev`).
    #[arg(long, env = "REVISION", default_value = "default")]
    revision: String,
    /// The namespace the control plane runs in.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// Its Service's DNS name, which its serving certificate carries.
    #[arg(
        long,
        env = "ISTIOD_SERVICE",
        default_value = "istiod.istio-system.svc"
    )]
    service: String,
    /// The proxy image injection adds.
    #[arg(
        long,
        env = "PROXY_IMAGE",
        default_value = "ghcr.io/bowline-mesh/proxy:0.1.0"
    )]
    proxy_image: String,
    /// The mesh config the operator renders (Istio's `mesh` key of the
    /// `istio` ConfigMap); its trustDomain names the identities issued.
    #[arg(long, env = "MESH_CONFIG_FILE")]
    mesh_config_file: Option<std::path::PathBuf>,
    /// The trust domain, when the mesh config does not say.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The longest certificate lifetime issued, in hours.
    #[arg(long, default_value_t = 24 * 90)]
    max_certificate_hours: u64,
    #[arg(long, default_value = "0.0.0.0:15012")]
    ca_address: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15017")]
    webhook_address: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring_address: SocketAddr,
    /// The mesh ConfigMap watched for changes (`istio`, or
    /// `istio-<revision>` for other revisions).
    #[arg(long, env = "MESH_CONFIG_MAP")]
    mesh_config_map: Option<String>,
    /// This pod's name, which the Events it records carry.
    #[arg(long, env = "POD_NAME", default_value = "istiod")]
    pod_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mesh = match &args.mesh_config_file {
        Some(path) => bowline_controlplane::server::read_mesh_config(path)?,
        None => Default::default(),
    };
    let trust_domain = mesh.trust_domain.unwrap_or(args.trust_domain);
    let mesh_config_map = args.mesh_config_map.unwrap_or_else(|| {
        if args.revision == "default" {
            "istio".into()
        } else {
            format!("istio-{}", args.revision)
        }
    });
    let client = kube::Client::try_default().await?;
    server::run(
        client,
        Settings {
            revision: args.revision,
            namespace: args.namespace,
            service: args.service,
            proxy_image: args.proxy_image,
            trust_domain,
            max_ttl: Duration::from_secs(args.max_certificate_hours * 3600),
            ca_address: args.ca_address,
            webhook_address: args.webhook_address,
            monitoring_address: args.monitoring_address,
            mesh_config_map,
            instance: args.pod_name,
        },
    )
    .await?;
    Ok(())
}
