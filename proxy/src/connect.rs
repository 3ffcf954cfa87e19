//! Connections to a cluster's endpoints, for HTTP and TCP alike: TCP from
//! the cluster's bound address (if any) within its connect timeout, then
//! TLS when the cluster's transport socket asks for it for the endpoint
//! ([`Cluster::tls_for`]: every endpoint, or with auto-mTLS those with a
//! mesh proxy beside them).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::model::Cluster;
use crate::model::cluster::{Keepalive, Target};
use crate::tls::{Carried, Secrets, Session, UpstreamTls};

/// An open connection to an endpoint.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// With who is at each end, as the handshake proved.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, Session),
}

impl Stream {
    /// Who is at each end, when the connection is TLS.
    pub fn session(&self) -> Option<&Session> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(_, session) => Some(session),
        }
    }
}

/// Connects to `target` for `cluster`, over `tls` when given.
pub async fn connect(
    cluster: &Cluster,
    secrets: &Secrets,
    target: &Target,
    tls: Option<&UpstreamTls>,
    carried: Carried,
) -> io::Result<Stream> {
    let timeout = cluster.connect_timeout;
    let tcp = tokio::time::timeout(timeout, tcp(cluster, target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))??;
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let (config, local) = tls
        .client_config(secrets, carried)
        .map_err(|e| io::Error::other(format!("TLS to {target}: {e}")))?;
    let address = tcp.peer_addr()?.ip();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(tls.server_name(address), tcp);
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
    let session = Session::new(local, stream.get_ref().1.peer_certificates());
    Ok(Stream::Tls(Box::new(stream), session))
}

async fn tcp(cluster: &Cluster, target: &Target) -> io::Result<TcpStream> {
    let addresses: Vec<SocketAddr> = match target {
        Target::Ip(address) => vec![*address],
        Target::Dns(host, port) => tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{target} has no address"));
    for address in addresses {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = cluster.bind.filter(|ip| ip.is_ipv4() == address.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(keepalive) = &cluster.keepalive {
            keep_alive(&socket, keepalive)?;
        }
        match socket.connect(address).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(error) => last = error,
        }
    }
    Err(last)
}

/// Turns TCP keepalive on for `socket`, with the timings given.
fn keep_alive(socket: &TcpSocket, keepalive: &Keepalive) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(socket, sockopt::KeepAlive, &true)?;
    if let Some(time) = keepalive.time {
        setsockopt(socket, sockopt::TcpKeepIdle, &time)?;
    }
    if let Some(interval) = keepalive.interval {
        setsockopt(socket, sockopt::TcpKeepInterval, &interval)?;
    }
    if let Some(probes) = keepalive.probes {
        setsockopt(socket, sockopt::TcpKeepCount, &probes)?;
    }
    Ok(())
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::from_json;
    use nix::sys::socket::{getsockopt, sockopt};

    #[tokio::test]
    async fn a_cluster_s_keepalive_is_set_on_its_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let cluster = |options: serde_json::Value| {
            let mut cluster = serde_json::json!({"name": "c", "type": "STATIC"});
            if !options.is_null() {
                cluster["upstream_connection_options"] = options;
            }
            Cluster::from_envoy(&from_json(cluster).unwrap()).unwrap()
        };
        let kept = cluster(serde_json::json!({"tcp_keepalive": {
            "keepalive_time": 60, "keepalive_interval": 10, "keepalive_probes": 3}}));
        let stream = tcp(&kept, &Target::Ip(address)).await.unwrap();
        assert!(getsockopt(&stream, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepIdle).unwrap(), 60);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepInterval).unwrap(), 10);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepCount).unwrap(), 3);
        let plain = tcp(&cluster(serde_json::Value::Null), &Target::Ip(address))
            .await
            .unwrap();
        assert!(!getsockopt(&plain, sockopt::KeepAlive).unwrap());
    }
}
