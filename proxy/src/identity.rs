//! The workload's identity: an ECDSA P-256 key made in memory (never
//! written anywhere), a CSR for it, and the SVID the CA signs for the
//! pod's ServiceAccount token — asked for with Istio's
//! `IstioCertificateService/CreateCertificate`, so any Istio-compatible CA
//! serves. The certificate is renewed at half its life (with jitter, so
//! proxies started together do not ask together), retried with backoff
//! when the CA is away while the valid certificate keeps serving, and a
//! new one takes new connections only: open ones keep the TLS they have.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::Ca;
use crate::tls::{Secret, Secrets, Workload};

/// The method's path, as Istio's CA serves it.
const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Renewal retries start here and double up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Never renew more often than this, whatever the lifetime.
const MIN_RENEWAL: Duration = Duration::from_secs(1);

/// Istio's request (`security/v1alpha1/ca.proto`), the fields sent.
#[derive(Clone, PartialEq, prost::Message)]
struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    csr: String,
    #[prost(int64, tag = "3")]
    validity_duration: i64,
}

/// Istio's response: the leaf, intermediates, the root.
#[derive(Clone, PartialEq, prost::Message)]
struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    cert_chain: Vec<String>,
}

/// A certificate issued, and when to renew it.
#[derive(Debug)]
pub struct Issued {
    pub workload: Workload,
    pub renew_in: Duration,
}

/// Asks the CA for a certificate once.
pub async fn request(ca: &Ca) -> anyhow::Result<Issued> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    if let Some(id) = &ca.spiffe_id {
        params.subject_alt_names = vec![SanType::URI(id.clone().try_into()?)];
    }
    let csr = params.serialize_request(&key)?.pem()?;

    let channel = crate::xds::channel(&ca.endpoint).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let mut call = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ca.ttl.map_or(0, |t| t.as_secs() as i64),
    });
    call.metadata_mut()
        .insert("authorization", crate::xds::bearer(&ca.endpoint)?);
    let response = grpc
        .unary(
            call,
            http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default(),
        )
        .await
        .map_err(|status| {
            anyhow::anyhow!("the CA refused: {}: {}", status.code(), status.message())
        })?
        .into_inner();
    issued(&response.cert_chain, &key.serialize_pem())
}

/// The workload secret from a CA's chain (leaf first, root last) and the
/// key; renewal due at half the leaf's remaining life, less up to a tenth
/// of it at random.
fn issued(chain: &[String], key_pem: &str) -> anyhow::Result<Issued> {
    let (root, rest) = chain
        .split_last()
        .ok_or_else(|| anyhow::anyhow!("the CA answered with no certificate"))?;
    anyhow::ensure!(!rest.is_empty(), "the CA answered with only a root");
    let leaf_pem = rest.join("\n");
    let leaf = CertificateDer::from_pem_slice(rest[0].as_bytes())
        .map_err(|e| anyhow::anyhow!("the issued certificate is not PEM: {e}"))?;
    let not_after = crate::tls::not_after(&leaf)
        .ok_or_else(|| anyhow::anyhow!("the issued certificate cannot be read"))?;
    let certificate = Secret::certificate(leaf_pem.as_bytes(), key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the issued certificate: {e}"))?;
    let roots = Secret::roots(root.as_bytes()).map_err(|e| anyhow::anyhow!("the root: {e}"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let left = Duration::from_secs(not_after.saturating_sub(now).max(0) as u64);
    let half = left / 2;
    let jitter = half.mul_f64(rand::random::<f64>() * 0.1);
    Ok(Issued {
        workload: Workload {
            certificate: Arc::new(certificate),
            roots: Arc::new(roots),
        },
        renew_in: (half - jitter).max(MIN_RENEWAL),
    })
}

/// Keeps the workload's certificate current until the process ends: the
/// first as soon as the CA gives it, then each renewal at half-life.
pub async fn keep(ca: Ca, secrets: Arc<Secrets>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match request(&ca).await {
            Ok(issued) => {
                let identity = issued.workload.certificate.identity();
                tracing::info!(
                    identity = identity.as_deref().unwrap_or("-"),
                    renew_in = ?issued.renew_in,
                    "workload certificate issued"
                );
                secrets.set_workload(issued.workload);
                backoff = FIRST_BACKOFF;
                tokio::time::sleep(issued.renew_in).await;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "no workload certificate from the CA; the current one (if any) keeps serving");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_near_half_the_remaining_life() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(root_params, &key);
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/billing"
                .try_into()
                .unwrap(),
        )];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::seconds(100);
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        let got = issued(&[leaf.pem(), root.pem()], &leaf_key.serialize_pem()).unwrap();
        assert!(
            got.renew_in <= Duration::from_secs(50) && got.renew_in >= Duration::from_secs(43),
            "{:?}",
            got.renew_in
        );
        let Secret::Certificate(certified) = got.workload.certificate.as_ref() else {
            panic!("a certificate")
        };
        assert_eq!(
            certified.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/billing")
        );
        assert!(issued(&[root.pem()], "").is_err());
    }
}
