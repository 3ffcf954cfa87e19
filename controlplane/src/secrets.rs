//! What proxies get over SDS (on the ADS stream, last in push order):
//!
//! - `ROOTCA`: the mesh root, which mesh TLS validates peers against;
//! - `default`: a certificate for the proxy's authenticated identity (its
//!   SPIFFE ID), issued by the CA with a key made here and kept in memory
//!   only, for proxies that do not make their own (Envoy); renewed at half
//!   its life;
//! - `kubernetes://<name>` and `kubernetes://<name>-cacert`: a TLS Secret
//!   of the proxy's own namespace (gateway and DestinationRule
//!   `credentialName`), keys `tls.crt`/`tls.key`/`ca.crt` or Istio's
//!   generic `cert`/`key`/`cacert`. A proxy sees only its own namespace's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};

use crate::ca::{self, Authority, Identity};
use crate::model::{Proxy, Snapshot, TlsSecret};
use crate::push::{Typed, encode};
use crate::translate::gateway::credential_resource;
use crate::translate::listeners::{ROOT_SECRET, WORKLOAD_SECRET};

/// Issues and keeps workload certificates for proxies served over SDS.
pub struct Secrets {
    authority: Arc<Authority>,
    issued: Mutex<HashMap<Identity, Issued>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Issued {
    secret: Secret,
    renew_at: Instant,
}

impl Secrets {
    pub fn new(authority: Arc<Authority>) -> Self {
        Self {
            authority,
            issued: Mutex::new(HashMap::new()),
        }
    }

    /// The secrets `proxy`, authenticated as `identity`, may have.
    pub fn for_proxy(
        &self,
        snapshot: &Snapshot,
        proxy: &Proxy,
        identity: &Identity,
    ) -> Result<Arc<Typed>, ca::Error> {
        let mut secrets = vec![root(self.authority.root_pem()), self.workload(identity)?];
        let prefix = format!("{}/", proxy.namespace);
        for (key, tls) in snapshot.secrets.range(prefix.clone()..) {
            let Some(name) = key.strip_prefix(&prefix) else {
                break;
            };
            secrets.extend(credential(name, tls));
        }
        Ok(encode(secrets, |s| &s.name))
    }

    /// The identity's certificate, issued again once half its life is
    /// gone.
    fn workload(&self, identity: &Identity) -> Result<Secret, ca::Error> {
        let mut issued = self.issued.lock().expect("issued certificates");
        if let Some(current) = issued.get(identity)
            && current.renew_at > Instant::now()
        {
            return Ok(current.secret.clone());
        }
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
                ca::Error::Certificate {
                    what: "a workload key".into(),
                    source,
                }
            })?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|source| ca::Error::Certificate {
                what: "a workload certificate request".into(),
                source,
            })?;
        let chain = self.authority.sign(&csr, identity, None)?;
        // The chain without the root, as a TLS peer presents it.
        let presented = chain[..chain.len().saturating_sub(1).max(1)].concat();
        let secret = Secret {
            name: WORKLOAD_SECRET.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(presented)),
                private_key: Some(inline(key.serialize_pem())),
                ..Default::default()
            })),
        };
        issued.insert(
            identity.clone(),
            Issued {
                secret: secret.clone(),
                renew_at: Instant::now() + ca::DEFAULT_TTL.min(self.authority.max_ttl()) / 2,
            },
        );
        Ok(secret)
    }
}

fn root(pem: &str) -> Secret {
    Secret {
        name: ROOT_SECRET.into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(pem.to_string())),
                ..Default::default()
            },
        )),
    }
}

/// A TLS Secret as its certificate and, when it has one, its CA.
fn credential(name: &str, tls: &TlsSecret) -> Vec<Secret> {
    let mut secrets = Vec::new();
    let resource = credential_resource(name);
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        secrets.push(Secret {
            name: resource.clone(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(cert.clone())),
                private_key: Some(inline(key.clone())),
                ..Default::default()
            })),
        });
    }
    if let Some(ca) = &tls.ca {
        secrets.push(Secret {
            name: format!("{resource}-cacert"),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(inline(ca.clone())),
                    ..Default::default()
                },
            )),
        });
    }
    secrets
}

fn inline(text: String) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(text)),
        ..Default::default()
    }
}
