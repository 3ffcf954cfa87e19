//! The application's Kubernetes probes, answered by the sidecar. Injection
//! rewrites an app container's HTTP and TCP probes to
//! `:15020/app-health/<container>/{readyz,livez,startupz}` and tells the
//! proxy the original checks in `ISTIO_KUBE_APP_PROBERS` (Istio's variable
//! and JSON), so that the kubelet's probes neither meet mutual TLS or
//! authorization policies on the app's port nor count as its traffic: the
//! proxy runs the check itself, against the pod's address, and answers
//! with its outcome.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;

/// The probes by path, and where the app listens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppProbers {
    probes: BTreeMap<String, AppProbe>,
    host: Option<IpAddr>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct AppProbe {
    http_get: Option<HttpGet>,
    tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct HttpGet {
    #[serde(default)]
    path: Option<String>,
    port: u16,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<Header>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
struct Header {
    name: String,
    value: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
struct TcpSocket {
    port: u16,
}

impl AppProbers {
    /// Istio's `ISTIO_KUBE_APP_PROBERS` JSON; `host` is the pod's address
    /// (loopback when not known). The error says which probe is wrong.
    pub fn parse(json: &str, host: Option<IpAddr>) -> Result<Self, String> {
        let probes: BTreeMap<String, AppProbe> =
            serde_json::from_str(json).map_err(|e| format!("not probes as JSON: {e}"))?;
        for (path, probe) in &probes {
            if !path.starts_with("/app-health/") {
                return Err(format!("{path}: a probe's path starts with /app-health/"));
            }
            if probe.http_get.is_none() && probe.tcp_socket.is_none() {
                return Err(format!("{path}: neither httpGet nor tcpSocket"));
            }
        }
        Ok(Self { probes, host })
    }

    /// Runs the probe at `path`: `None` when there is none, else the app's
    /// status code (an HTTP check) or 200 (a TCP check that connected), or
    /// 500 when the app did not answer in time.
    pub async fn probe(&self, path: &str) -> Option<StatusCode> {
        let probe = self.probes.get(path)?;
        let host = self
            .host
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1));
        let check = async {
            if let Some(get) = probe.http_get.as_ref().filter(|g| {
                g.scheme
                    .as_deref()
                    .is_none_or(|s| s.eq_ignore_ascii_case("http"))
            }) {
                let address = SocketAddr::new(host, get.port);
                let stream = connect(address).await.ok()?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(connection);
                let mut request = http::Request::get(get.path.as_deref().unwrap_or("/"))
                    .header(http::header::HOST, address.to_string())
                    .header(http::header::USER_AGENT, "kube-probe");
                for header in &get.http_headers {
                    request = request.header(&header.name, &header.value);
                }
                let request = request
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .ok()?;
                let response = sender.send_request(request).await.ok()?;
                Some(response.status())
            } else {
                // A TCP check, or an HTTPS one, which checks as much as a
                // kubelet does not (it skips the certificate): a connection.
                let port = match (&probe.tcp_socket, &probe.http_get) {
                    (Some(tcp), _) => tcp.port,
                    (None, Some(get)) => get.port,
                    (None, None) => return None,
                };
                connect(SocketAddr::new(host, port))
                    .await
                    .ok()
                    .map(|_| StatusCode::OK)
            }
        };
        Some(
            tokio::time::timeout(timeout, check)
                .await
                .ok()
                .flatten()
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        )
    }
}

/// A connection to the app at `address`. From the pod's own address the
/// proxy's traffic would be captured back into its inbound listener (the
/// proxy calling its app through its pod IP); from 127.0.0.6, the source
/// capture lets through for the proxy's inbound connections, it is not.
async fn connect(address: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    match address {
        SocketAddr::V4(v4) if !v4.ip().is_loopback() => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            let source: std::net::Ipv4Addr = crate::capture::INBOUND_PASSTHROUGH_SOURCE
                .parse()
                .map_err(std::io::Error::other)?;
            socket.bind(SocketAddr::from((source, 0)))?;
            socket.connect(address).await
        }
        _ => tokio::net::TcpStream::connect(address).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_reach_the_app_and_report_its_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(|request: http::Request<_>| async move {
                    let status = if request.uri().path() == "/healthz" {
                        200
                    } else {
                        503
                    };
                    let mut response =
                        http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        let json = format!(
            r#"{{"/app-health/web/readyz": {{"httpGet": {{"path": "/healthz", "port": {port}, "scheme": "HTTP"}}, "timeoutSeconds": 1}},
                "/app-health/web/livez": {{"httpGet": {{"path": "/broken", "port": {port}}}}},
                "/app-health/db/readyz": {{"tcpSocket": {{"port": {port}}}}},
                "/app-health/gone/readyz": {{"tcpSocket": {{"port": 1}}}}}}"#
        );
        let probers = AppProbers::parse(&json, None).unwrap();
        assert_eq!(
            probers.probe("/app-health/web/readyz").await,
            Some(StatusCode::OK)
        );
        assert_eq!(
            probers.probe("/app-health/web/livez").await,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            probers.probe("/app-health/db/readyz").await,
            Some(StatusCode::OK)
        );
        assert_eq!(
            probers.probe("/app-health/gone/readyz").await,
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(probers.probe("/app-health/other/readyz").await, None);
    }

    #[test]
    fn a_wrong_probe_is_named() {
        let error =
            AppProbers::parse(r#"{"/app-health/web/readyz": {"exec": {}}}"#, None).unwrap_err();
        assert!(error.contains("/app-health/web/readyz"), "{error}");
        let error =
            AppProbers::parse(r#"{"/healthz": {"tcpSocket": {"port": 80}}}"#, None).unwrap_err();
        assert!(error.contains("/app-health/"), "{error}");
    }
}
