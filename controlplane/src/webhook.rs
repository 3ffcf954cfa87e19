//! The webhooks the API server calls, over HTTPS with a certificate from
//! the control plane's CA: `/inject` (sidecar injection, a JSON Patch) and
//! `/validate` (Istio's validation rules, refusing with the field named).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{inject, validate};

/// What the webhooks need.
#[derive(Clone, Debug)]
pub struct Webhooks {
    /// What this revision injects.
    pub injection: inject::Injection,
}

/// The routes: `/inject` and `/validate` (and Istio's longer injection
/// paths, `/inject/...`, which carry the cluster and network).
pub fn router(webhooks: Webhooks) -> Router {
    Router::new()
        .route("/inject", post(inject_pod))
        .route("/inject/{*rest}", post(inject_pod))
        .route("/validate", post(validate_config))
        .with_state(Arc::new(webhooks))
}

type Review = Json<AdmissionReview<DynamicObject>>;

/// Reads a review into its request, the response to build on, and the
/// object as JSON; or the finished response when there is nothing to look
/// at (an unreadable review, a request without an object).
fn open(
    review: AdmissionReview<DynamicObject>,
) -> Result<
    (
        AdmissionRequest<DynamicObject>,
        AdmissionResponse,
        serde_json::Value,
    ),
    Box<Review>,
> {
    let request: AdmissionRequest<DynamicObject> =
        review
            .try_into()
            .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| {
                Json(AdmissionResponse::invalid(e.to_string()).into_review())
            })?;
    let response = AdmissionResponse::from(&request);
    let Some(object) = &request.object else {
        return Err(Box::new(Json(response.into_review())));
    };
    match serde_json::to_value(object) {
        Ok(value) => Ok((request, response, value)),
        Err(e) => Err(Box::new(Json(response.deny(e.to_string()).into_review()))),
    }
}

async fn inject_pod(State(webhooks): State<Arc<Webhooks>>, Json(review): Review) -> Review {
    let (_, response, object) = match open(review) {
        Ok(opened) => opened,
        Err(done) => return *done,
    };
    let pod: Pod = match serde_json::from_value(object) {
        Ok(pod) => pod,
        Err(e) => {
            return Json(
                response
                    .deny(format!("the pod does not read as a Pod: {e}"))
                    .into_review(),
            );
        }
    };
    let response = match inject::patch(&pod, &webhooks.injection) {
        Ok(Some(patch)) => match response.clone().with_patch(patch) {
            Ok(patched) => patched,
            Err(e) => response.deny(format!("injection failed: {e}")),
        },
        Ok(None) => response,
        Err(e) => response.deny(format!("injection failed: {e}")),
    };
    Json(response.into_review())
}

async fn validate_config(Json(review): Review) -> Review {
    let (request, response, object) = match open(review) {
        Ok(opened) => opened,
        Err(done) => return *done,
    };
    let response = match validate::object(&request.kind.kind, &object) {
        Ok(()) => response,
        Err(errors) => {
            let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
            response.deny(format!(
                "{} {} is not valid: {}",
                request.kind.kind,
                request.name,
                messages.join("; ")
            ))
        }
    };
    Json(response.into_review())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the serving certificate: {0}")]
    Certificate(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `router` over HTTPS on `listener` with the PEM `chain` and `key`
/// until the task is dropped.
pub async fn serve_tls(
    listener: TcpListener,
    chain: &str,
    key: &str,
    router: Router,
) -> Result<(), Error> {
    let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (stream, peer): (_, SocketAddr) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection");
            }
        });
    }
}
