//! The proxy's own endpoint beside the data path: readiness on the status
//! port (15021 `/healthz/ready`, the kubelet's probe). The admin port
//! (15000) and metrics (15020, 15090) are not served yet.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::state::State;

/// Serves the status port until the process ends.
pub async fn bind_status(address: SocketAddr, state: Arc<State>) -> Result<(), Error> {
    let socket = TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind { address, source })?;
    tokio::spawn(serve(socket, state));
    Ok(())
}

async fn serve(socket: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                std::future::ready(Ok::<_, Infallible>(respond(&state, &request)))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/healthz/ready" if state.is_ready() => (StatusCode::OK, "LIVE\n"),
        "/healthz/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no complete configuration yet\n",
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
