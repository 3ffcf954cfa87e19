//! Istio's certificate service over gRPC:
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, so that the
//! proxies (and Istio's own agents) ask Bowline's CA the way they ask
//! istiod's. The caller proves who it is with its ServiceAccount token in
//! the `authorization: Bearer …` metadata; the certificate names that
//! identity, whatever the CSR asks for.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::Client;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::ca::{self, Authority};

/// Istio's request (`istio/api security/v1alpha1/ca.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// The PEM-encoded CSR; only its public key is used.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// The validity asked for, in seconds; 0 for the default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// What the node says about itself; not trusted for identity.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// The chain: the workload certificate, intermediates, the root.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The `authorization: Bearer <token>` a caller sent.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whose ServiceAccount token it is, as a gRPC status when not accepted:
/// Unauthenticated for a bad token, Unavailable when the API server could
/// not be asked.
pub async fn token_identity(client: &Client, token: &str) -> Result<ca::Identity, Status> {
    ca::authenticate(client, token).await.map_err(|e| match e {
        ca::Error::Unauthenticated(message) => Status::unauthenticated(message),
        other => Status::unavailable(other.to_string()),
    })
}

/// The full gRPC path of the one method.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The service, for a tonic server.
#[derive(Clone)]
pub struct CertificateService {
    authority: Arc<Authority>,
    client: Client,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for CertificateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateService").finish_non_exhaustive()
    }
}

impl CertificateService {
    /// `client` reviews callers' tokens (it needs `create` on
    /// `tokenreviews`).
    pub fn new(authority: Arc<Authority>, client: Client) -> Self {
        Self {
            authority,
            client,
            metrics: None,
        }
    }

    /// Counts the certificates issued.
    pub fn with_metrics(self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    async fn create(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = bearer_token(request.metadata()).ok_or_else(|| {
            Status::unauthenticated(
                "no ServiceAccount token: send it as `authorization: Bearer <token>`",
            )
        })?;
        let identity = token_identity(&self.client, token).await?;
        let request = request.into_inner();
        let ttl = u64::try_from(request.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let cert_chain =
            self.authority
                .sign(&request.csr, &identity, ttl)
                .map_err(|e| match e {
                    ca::Error::Csr(_) => Status::invalid_argument(e.to_string()),
                    other => Status::internal(other.to_string()),
                })?;
        if let Some(metrics) = &self.metrics {
            metrics.certificates.inc();
        }
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

impl NamedService for CertificateService {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

/// The one method, as tonic's server plumbing calls it.
struct CreateCertificate(CertificateService);

impl UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<'static, Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.create(request).await })
    }
}

impl tower::Service<http::Request<Body>> for CertificateService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE {
            let path = request.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let method = CreateCertificate(self.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}
