//! The certificate authority: a self-signed root made on first start (and
//! kept in a Secret by the caller) or a CA plugged in from Istio's `cacerts`
//! Secret, issuing SPIFFE X.509 SVIDs for authenticated callers.
//!
//! The identity in a certificate comes from who the caller proved to be
//! (their ServiceAccount token, see [`authenticate`]), never from the CSR:
//! only the CSR's public key is used, and only once its signature proves the
//! caller holds the private key.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// The audience a proxy's token must be minted for, as Istio's.
pub const AUDIENCE: &str = bowline_api::proxy::TOKEN_AUDIENCE;
/// A workload certificate's lifetime when the request does not ask.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a self-signed root is valid.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before now, for clocks that run behind.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the certificate signing request is not valid: {0}")]
    Csr(rcgen::Error),
    #[error("{what}: {source}")]
    Certificate { what: String, source: rcgen::Error },
    #[error("the caller is not authenticated: {0}")]
    Unauthenticated(String),
    #[error("talking to the API server: {0}")]
    Review(#[from] kube::Error),
    #[error("{0}")]
    Store(String),
}

/// A workload's identity: its ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// From a ServiceAccount's user name, `system:serviceaccount:<ns>:<sa>`.
    pub fn from_username(username: &str) -> Option<Self> {
        let rest = username.strip_prefix("system:serviceaccount:")?;
        let (namespace, service_account) = rest.split_once(':')?;
        (!namespace.is_empty() && !service_account.is_empty()).then(|| Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Checks a ServiceAccount token with the API server (a TokenReview for
/// the `istio-ca` audience) and returns whose it is.
pub async fn authenticate(client: &Client, token: &str) -> Result<Identity, Error> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![AUDIENCE.into()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Error::Unauthenticated(
            status
                .error
                .unwrap_or_else(|| "the token was not accepted".into()),
        ));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == AUDIENCE)
    {
        return Err(Error::Unauthenticated(format!(
            "the token is not for the {AUDIENCE} audience"
        )));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    Identity::from_username(&username)
        .ok_or_else(|| Error::Unauthenticated(format!("{username} is not a ServiceAccount")))
}

/// The CA's files, with Istio's `cacerts` Secret keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFiles {
    /// `ca-cert.pem`: the certificate that signs.
    pub ca_cert: String,
    /// `ca-key.pem`: its key.
    pub ca_key: String,
    /// `root-cert.pem`: the root proxies trust.
    pub root_cert: String,
    /// `cert-chain.pem`: from the signing certificate up to (not including)
    /// the root; the signing certificate alone when it is the root.
    pub cert_chain: String,
}

/// Issues workload certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    files: CaFiles,
    trust_domain: String,
    max_ttl: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed root (ECDSA P-256, ten years), as Istio makes on
    /// first start; the caller keeps [`Self::files`] in a Secret.
    pub fn self_signed(trust_domain: &str, max_ttl: Duration) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            Error::Certificate {
                what: "generating the root key".into(),
                source,
            }
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_TTL;
        let cert = params
            .self_signed(&key)
            .map_err(|source| Error::Certificate {
                what: "signing the root".into(),
                source,
            })?;
        let files = CaFiles {
            ca_cert: cert.pem(),
            ca_key: key.serialize_pem(),
            root_cert: cert.pem(),
            cert_chain: cert.pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            files,
            trust_domain: trust_domain.into(),
            max_ttl,
        })
    }

    /// A CA from its files: a plugged-in intermediate (Istio's `cacerts`
    /// Secret) or a root kept from an earlier start.
    pub fn from_files(
        files: CaFiles,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, Error> {
        let key = KeyPair::from_pem(&files.ca_key).map_err(|source| Error::Certificate {
            what: "reading ca-key.pem".into(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&files.ca_cert, key).map_err(|source| Error::Certificate {
                what: "reading ca-cert.pem".into(),
                source,
            })?;
        Ok(Self {
            issuer,
            files,
            trust_domain: trust_domain.into(),
            max_ttl,
        })
    }

    pub fn files(&self) -> &CaFiles {
        &self.files
    }

    /// The root certificate proxies trust (the `istio-ca-root-cert`
    /// ConfigMap's `root-cert.pem`).
    /// The longest lifetime it issues.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    pub fn root_pem(&self) -> &str {
        &self.files.root_cert
    }

    /// A serving certificate for the control plane's own endpoints (the
    /// webhooks, xDS over TLS): a new key, and a certificate for `dns_names`
    /// and `ips`, valid for `ttl`. Returns the chain (PEM) and the key (PEM).
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, String), Error> {
        let what = |source| Error::Certificate {
            what: format!("a serving certificate for {dns_names:?} {ips:?}"),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(what)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(what)?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl.min(self.max_ttl.max(DEFAULT_TTL));
        let cert = params.signed_by(&key, &self.issuer).map_err(what)?;
        let mut chain = cert.pem();
        if self.files.cert_chain != self.files.root_cert {
            chain.push_str(&self.files.cert_chain);
        }
        Ok((chain, key.serialize_pem()))
    }

    /// Signs the key of `csr_pem` for `identity`, valid for `ttl` (the
    /// default when unset, at most the maximum). Returns the chain as
    /// Istio's CreateCertificate does: the workload certificate, the
    /// intermediates, the root.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::Csr)?;
        let ttl = ttl.unwrap_or(DEFAULT_TTL).min(self.max_ttl);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.spiffe_id(&self.trust_domain);
        params.subject_alt_names =
            vec![SanType::URI(uri.clone().try_into().map_err(|source| {
                Error::Certificate {
                    what: format!("the SPIFFE ID {uri}"),
                    source,
                }
            })?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| Error::Certificate {
                what: format!("signing a certificate for {uri}"),
                source,
            })?;
        let mut chain = vec![cert.pem()];
        if self.files.cert_chain != self.files.root_cert {
            chain.push(self.files.cert_chain.clone());
        }
        chain.push(self.files.root_cert.clone());
        Ok(chain)
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    use super::*;

    fn csr(sans: Vec<String>) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(sans).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.pem().unwrap())
    }

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    fn identity() -> Identity {
        Identity::from_username("system:serviceaccount:shop:billing").unwrap()
    }

    #[test]
    fn the_identity_comes_from_the_caller_not_the_csr() {
        let ca = Authority::self_signed("cluster.local", Duration::from_secs(48 * 3600)).unwrap();
        // The CSR asks for someone else's identity; it is ignored.
        let (_, request) = csr(vec!["spiffe://cluster.local/ns/bank/sa/admin".into()]);
        let chain = ca.sign(&request, &identity(), None).unwrap();
        assert_eq!(chain.len(), 2, "the workload certificate and the root");
        let leaf_der = der(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(uri) => uri.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, ["spiffe://cluster.local/ns/shop/sa/billing"]);
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, (DEFAULT_TTL + BACKDATE).as_secs() as i64);

        // Signed by the root.
        let root_der = der(ca.root_pem());
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert!(root.is_ca());
    }

    #[test]
    fn the_lifetime_is_capped() {
        let ca = Authority::self_signed("cluster.local", Duration::from_secs(3600)).unwrap();
        let (_, request) = csr(vec![]);
        let chain = ca
            .sign(
                &request,
                &identity(),
                Some(Duration::from_secs(30 * 24 * 3600)),
            )
            .unwrap();
        let leaf_der = der(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + BACKDATE.as_secs() as i64);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let ca = Authority::self_signed("cluster.local", DEFAULT_TTL).unwrap();
        let (_, request) = csr(vec![]);
        // Flip a byte inside the base64 body.
        let mut tampered: Vec<char> = request.chars().collect();
        let at = tampered.len() / 2;
        tampered[at] = if tampered[at] == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        assert!(matches!(
            ca.sign(&tampered, &identity(), None),
            Err(Error::Csr(_))
        ));
    }

    #[test]
    fn a_plugged_in_intermediate_signs_with_its_chain() {
        // A root, and an intermediate it signed, as in a cacerts Secret.
        let root = Authority::self_signed("cluster.local", DEFAULT_TTL).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let intermediate = params.signed_by(&key, &root.issuer).unwrap();
        let files = CaFiles {
            ca_cert: intermediate.pem(),
            ca_key: key.serialize_pem(),
            root_cert: root.root_pem().to_string(),
            cert_chain: intermediate.pem(),
        };
        let ca = Authority::from_files(files, "cluster.local", DEFAULT_TTL).unwrap();
        let (_, request) = csr(vec![]);
        let chain = ca.sign(&request, &identity(), None).unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        let leaf_der = der(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let intermediate_der = der(&chain[1]);
        let (_, intermediate) = X509Certificate::from_der(&intermediate_der).unwrap();
        leaf.verify_signature(Some(intermediate.public_key()))
            .unwrap();
    }

    #[test]
    fn only_service_accounts_are_identities() {
        assert_eq!(
            Identity::from_username("system:serviceaccount:shop:billing")
                .unwrap()
                .spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/shop/sa/billing"
        );
        assert_eq!(Identity::from_username("system:admin"), None);
        assert_eq!(Identity::from_username("system:serviceaccount:shop:"), None);
    }
}
