//! TLS on both sides of the proxy, with rustls: the contexts of Envoy's
//! TLS transport sockets (`UpstreamTlsContext`, `DownstreamTlsContext`)
//! converted once, the secrets they name (the workload's SVID and the mesh
//! root, or certificates from a bootstrap file or SDS), and the rustls
//! configurations built from both — again whenever a secret changes, so a
//! rotated certificate takes the next connection while open ones go on.
//!
//! Peers are checked as Envoy checks them: the chain against the trusted
//! roots, then the subject alternative names against the context's
//! matchers (SPIFFE URIs for mesh traffic, DNS names for external TLS).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    self as envoy, CertificateValidationContext, CommonTlsContext, common_tls_context, secret,
    subject_alt_name_matcher,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::envoy::{type_name, unpack};
use crate::model::route::{ValueTest, string_test};
use crate::state::State;

pub const UPSTREAM_TLS_CONTEXT: &str =
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const DOWNSTREAM_TLS_CONTEXT: &str =
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// The secret Istio names the workload's own certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// The secret Istio names the mesh's trusted root.
pub const ROOT_SECRET: &str = "ROOTCA";
/// The ALPN value the control plane puts in mesh contexts; the proxy
/// offers Istio's protocol-specific values in its place.
const MESH_ALPN: &[u8] = b"istio";

/// The crypto everything here uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// A certificate with its key, or roots to trust.
#[derive(Debug)]
pub enum Secret {
    Certificate(Certified),
    /// The store to verify with, and the certificates it was made of.
    Roots(Arc<RootCertStore>, Vec<CertificateDer<'static>>),
}

/// A certificate chain and its private key (kept in memory only).
#[derive(Debug)]
pub struct Certified {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The SPIFFE ID it proves, if any.
    pub identity: Option<Arc<str>>,
}

/// Who is at each end of a TLS connection, by SPIFFE ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub local: Option<Arc<str>>,
    pub peer: Option<Arc<str>>,
    /// The peer presented a certificate the roots vouch for.
    pub mutual: bool,
}

impl Session {
    /// A handshake's ends: `local` the SPIFFE ID this side presented, the
    /// peer's from the first of the certificates it presented (if any).
    pub fn new(local: Option<Arc<str>>, peer_certificates: Option<&[CertificateDer<'_>]>) -> Self {
        Self {
            local,
            peer: peer_certificates
                .and_then(|certs| certs.first())
                .and_then(spiffe_id)
                .map(Arc::from),
            mutual: peer_certificates.is_some(),
        }
    }
}

impl Secret {
    /// A certificate chain and key, both PEM.
    pub fn certificate(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the certificate chain is not PEM: {e}"))?;
        if chain.is_empty() {
            return Err("the certificate chain has no certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("the private key is not PEM: {e}"))?;
        provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| format!("the private key cannot sign: {e}"))?;
        let identity = spiffe_id(&chain[0]).map(Arc::from);
        Ok(Self::Certificate(Certified {
            chain,
            key,
            identity,
        }))
    }

    /// The SPIFFE ID a certificate proves; none for roots.
    pub fn identity(&self) -> Option<Arc<str>> {
        match self {
            Self::Certificate(c) => c.identity.clone(),
            Self::Roots(..) => None,
        }
    }

    /// What the admin endpoint's `/certs` shows of it, in Envoy's shape:
    /// `cert_chain` for a certificate, `ca_cert` for roots; `name` is the
    /// secret's.
    pub fn details(&self, name: &str) -> serde_json::Value {
        let described = |certificates: &[CertificateDer<'_>]| {
            certificates
                .iter()
                .filter_map(|c| certificate_details(c, name))
                .collect::<Vec<_>>()
        };
        match self {
            Self::Certificate(c) => serde_json::json!({"cert_chain": described(&c.chain)}),
            Self::Roots(_, certificates) => serde_json::json!({"ca_cert": described(certificates)}),
        }
    }

    /// Roots to trust, PEM (one or more certificates).
    pub fn roots(pem: &[u8]) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        let mut certificates = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("the trusted CA is not PEM: {e}"))?;
            roots
                .add(cert.clone())
                .map_err(|e| format!("the trusted CA is not a usable root: {e}"))?;
            certificates.push(cert);
        }
        if roots.is_empty() {
            return Err("no trusted CA certificate".into());
        }
        Ok(Self::Roots(Arc::new(roots), certificates))
    }

    /// An Envoy `Secret` resource (from SDS or a bootstrap file); an error
    /// names the field.
    pub fn from_envoy(secret: &envoy::Secret) -> Result<Self, (String, String)> {
        match &secret.r#type {
            Some(secret::Type::TlsCertificate(tls)) => {
                let chain = read(tls.certificate_chain.as_ref())
                    .map_err(|e| ("tls_certificate.certificate_chain".into(), e))?;
                let key = read(tls.private_key.as_ref())
                    .map_err(|e| ("tls_certificate.private_key".into(), e))?;
                Self::certificate(&chain, &key).map_err(|e| ("tls_certificate".into(), e))
            }
            Some(secret::Type::ValidationContext(validation)) => {
                let ca = read(validation.trusted_ca.as_ref())
                    .map_err(|e| ("validation_context.trusted_ca".into(), e))?;
                Self::roots(&ca).map_err(|e| ("validation_context.trusted_ca".into(), e))
            }
            _ => Err((
                "type".into(),
                "only tls_certificate and validation_context are supported".into(),
            )),
        }
    }
}

/// A data source's bytes: a file, inline, or an environment variable.
fn read(source: Option<&DataSource>) -> Result<Vec<u8>, String> {
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(path)) => {
            std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))
        }
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::EnvironmentVariable(name)) => std::env::var(name)
            .map(String::into_bytes)
            .map_err(|_| format!("the environment variable {name} is not set")),
        None => Err("empty".into()),
    }
}

/// Where the secrets named by contexts are found: the configuration's
/// (SDS or the bootstrap file's static secrets) first, then the
/// workload's own identity, which the proxy keeps current itself.
#[derive(Debug)]
pub struct Secrets {
    state: Arc<State>,
    workload: ArcSwapOption<Workload>,
    /// The workload's certificate comes from a CA (not the configuration).
    from_ca: bool,
}

/// The workload's SVID and the root it chains to.
#[derive(Debug)]
pub struct Workload {
    pub certificate: Arc<Secret>,
    pub roots: Arc<Secret>,
}

impl Secrets {
    /// `from_ca`: the identity task will set the workload's certificate.
    pub fn new(state: Arc<State>, from_ca: bool) -> Self {
        Self {
            state,
            workload: ArcSwapOption::empty(),
            from_ca,
        }
    }

    /// The certificate is to come from the CA and has not yet: TLS
    /// listeners and clusters cannot work, so the proxy is not ready (as
    /// Envoy keeps listeners warming until their SDS secrets come).
    pub fn awaiting_identity(&self) -> bool {
        self.from_ca && self.workload.load().is_none()
    }

    /// Serves `workload` as `default` and `ROOTCA` from now on.
    pub fn set_workload(&self, workload: Workload) {
        self.workload.store(Some(Arc::new(workload)));
    }

    /// Every secret known now, by name: the configuration's, then the
    /// workload's (unless the configuration names its own).
    pub fn all(&self) -> Vec<(String, Arc<Secret>)> {
        let snapshot = self.state.snapshot();
        let mut all: Vec<(String, Arc<Secret>)> = snapshot
            .secrets
            .iter()
            .map(|(name, secret)| (name.clone(), Arc::clone(secret)))
            .collect();
        if let Some(workload) = self.workload.load().as_ref() {
            for (name, secret) in [
                (WORKLOAD_SECRET, &workload.certificate),
                (ROOT_SECRET, &workload.roots),
            ] {
                if !snapshot.secrets.contains_key(name) {
                    all.push((name.to_string(), Arc::clone(secret)));
                }
            }
        }
        all
    }

    pub fn get(&self, name: &str) -> Option<Arc<Secret>> {
        if let Some(secret) = self.state.snapshot().secrets.get(name) {
            return Some(Arc::clone(secret));
        }
        let workload = self.workload.load();
        let workload = workload.as_ref()?;
        match name {
            WORKLOAD_SECRET => Some(Arc::clone(&workload.certificate)),
            ROOT_SECRET => Some(Arc::clone(&workload.roots)),
            _ => None,
        }
    }
}

/// A secret named over SDS, or given inline.
#[derive(Debug)]
enum Source {
    Sds(String),
    Inline(Arc<Secret>),
}

impl Source {
    fn resolve(&self, secrets: &Secrets) -> Result<Arc<Secret>, String> {
        match self {
            Source::Inline(secret) => Ok(Arc::clone(secret)),
            Source::Sds(name) => secrets
                .get(name)
                .ok_or_else(|| format!("the secret {name:?} is not known yet")),
        }
    }
}

/// A subject alternative name the peer's certificate must carry (one of
/// a context's matchers).
#[derive(Debug)]
pub struct SanMatch {
    kind: SanKind,
    test: ValueTest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SanKind {
    Dns,
    Uri,
    Email,
    Ip,
}

/// A context's certificate and roots, as they are now.
type Resolved = (Option<Arc<Secret>>, Option<Arc<Secret>>);

/// What a context has in common on both sides.
#[derive(Debug)]
struct Common {
    certificate: Option<Source>,
    /// None: the peer's certificate is not checked.
    roots: Option<Source>,
    sans: Arc<[SanMatch]>,
    alpn: Vec<Vec<u8>>,
}

impl Common {
    /// The secrets it names over SDS.
    fn sds_names(&self) -> impl Iterator<Item = &str> {
        [&self.certificate, &self.roots]
            .into_iter()
            .filter_map(|source| match source {
                Some(Source::Sds(name)) => Some(name.as_str()),
                _ => None,
            })
    }

    /// The certificate and the roots it names, as they are now.
    fn resolve(&self, secrets: &Secrets) -> Result<Resolved, String> {
        let resolve =
            |source: &Option<Source>| source.as_ref().map(|s| s.resolve(secrets)).transpose();
        Ok((resolve(&self.certificate)?, resolve(&self.roots)?))
    }

    fn from_envoy(common: Option<&CommonTlsContext>) -> Result<Self, (String, String)> {
        let Some(common) = common else {
            return Ok(Self {
                certificate: None,
                roots: None,
                sans: Arc::new([]),
                alpn: Vec::new(),
            });
        };
        let field = |f: &str| format!("common_tls_context.{f}");
        let certificate = match (
            common.tls_certificates.first(),
            common.tls_certificate_sds_secret_configs.first(),
        ) {
            (Some(tls), _) => {
                let chain = read(tls.certificate_chain.as_ref())
                    .map_err(|e| (field("tls_certificates[0].certificate_chain"), e))?;
                let key = read(tls.private_key.as_ref())
                    .map_err(|e| (field("tls_certificates[0].private_key"), e))?;
                let secret = Secret::certificate(&chain, &key)
                    .map_err(|e| (field("tls_certificates[0]"), e))?;
                Some(Source::Inline(Arc::new(secret)))
            }
            (None, Some(sds)) => Some(Source::Sds(sds.name.clone())),
            (None, None) => None,
        };
        let inline = |validation: &CertificateValidationContext, at: &str| {
            let roots = match &validation.trusted_ca {
                Some(ca) => {
                    let pem =
                        read(Some(ca)).map_err(|e| (field(&format!("{at}.trusted_ca")), e))?;
                    let roots =
                        Secret::roots(&pem).map_err(|e| (field(&format!("{at}.trusted_ca")), e))?;
                    Some(Source::Inline(Arc::new(roots)))
                }
                None => None,
            };
            let sans = san_matches(validation).map_err(|(i, e)| {
                (
                    field(&format!("{at}.match_typed_subject_alt_names[{i}]")),
                    e,
                )
            })?;
            Ok::<_, (String, String)>((roots, sans))
        };
        let (roots, sans) = match &common.validation_context_type {
            None => (None, Vec::new()),
            Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
                inline(v, "validation_context")?
            }
            Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                sds,
            )) => (Some(Source::Sds(sds.name.clone())), Vec::new()),
            Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
                let (inline_roots, sans) = match &c.default_validation_context {
                    Some(v) => inline(v, "combined_validation_context.default_validation_context")?,
                    None => (None, Vec::new()),
                };
                let roots = c
                    .validation_context_sds_secret_config
                    .as_ref()
                    .map(|sds| Source::Sds(sds.name.clone()))
                    .or(inline_roots);
                (roots, sans)
            }
            Some(_) => {
                return Err((
                    field("validation_context_type"),
                    "a certificate provider instance is not supported".into(),
                ));
            }
        };
        Ok(Self {
            certificate,
            roots,
            sans: sans.into(),
            alpn: common
                .alpn_protocols
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
        })
    }
}

// `match_subject_alt_names` is deprecated, and still read by Envoy.
#[allow(deprecated)]
fn san_matches(
    validation: &CertificateValidationContext,
) -> Result<Vec<SanMatch>, (usize, String)> {
    let mut matches = Vec::new();
    for (i, m) in validation.match_typed_subject_alt_names.iter().enumerate() {
        let kind = match subject_alt_name_matcher::SanType::try_from(m.san_type) {
            Ok(subject_alt_name_matcher::SanType::Dns) => SanKind::Dns,
            Ok(subject_alt_name_matcher::SanType::Uri) => SanKind::Uri,
            Ok(subject_alt_name_matcher::SanType::Email) => SanKind::Email,
            Ok(subject_alt_name_matcher::SanType::IpAddress) => SanKind::Ip,
            _ => return Err((i, "san_type must be DNS, URI, EMAIL or IP_ADDRESS".into())),
        };
        let matcher = m
            .matcher
            .as_ref()
            .ok_or((i, "a matcher is needed".into()))?;
        matches.push(SanMatch {
            kind,
            test: string_test(matcher).map_err(|e| (i, e))?,
        });
    }
    // The untyped form matches a name of any kind.
    let offset = matches.len();
    for (i, matcher) in validation.match_subject_alt_names.iter().enumerate() {
        for kind in [SanKind::Dns, SanKind::Uri, SanKind::Email, SanKind::Ip] {
            matches.push(SanMatch {
                kind,
                test: string_test(matcher).map_err(|e| (offset + i, e))?,
            });
        }
    }
    Ok(matches)
}

/// What a connection carries, for the ALPN offered upstream: Istio's
/// mesh values say which it is, so the server's filter chain can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Carried {
    Http1,
    Http2,
    Tcp,
}

/// How the proxy speaks TLS to a cluster's endpoints.
#[derive(Debug)]
pub struct UpstreamTls {
    common: Common,
    sni: String,
    /// Sessions are resumed (Envoy's `max_session_keys`, 0 turns it off).
    resumption: bool,
    /// The configurations last built, by what they carry, with the secrets
    /// they were built from.
    built: Mutex<HashMap<Carried, Built<ClientConfig>>>,
}

#[derive(Debug)]
struct Built<T> {
    certificate: Option<Arc<Secret>>,
    roots: Option<Arc<Secret>>,
    config: Arc<T>,
}

impl<T> Built<T> {
    fn current(&self, certificate: &Option<Arc<Secret>>, roots: &Option<Arc<Secret>>) -> bool {
        let same = |a: &Option<Arc<Secret>>, b: &Option<Arc<Secret>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same(&self.certificate, certificate) && same(&self.roots, roots)
    }
}

/// Reads a transport socket's TLS context: `Ok(None)` for a plaintext
/// one (`envoy.transport_sockets.raw_buffer`).
fn tls_context<T: prost::Message + prost::Name + Default>(
    socket: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    expected: &str,
) -> Result<Option<T>, (String, String)> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    match &socket.config_type {
        Some(ConfigType::TypedConfig(any)) => {
            let name = type_name(any);
            if name == "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" {
                return Ok(None);
            }
            if name != expected {
                return Err((
                    "typed_config".into(),
                    format!("the transport socket {name} is not supported (only {expected})"),
                ));
            }
            unpack(any)
                .map(Some)
                .map_err(|e| ("typed_config".into(), e))
        }
        None if socket.name == "envoy.transport_sockets.raw_buffer" => Ok(None),
        None => Err(("typed_config".into(), "a typed_config is needed".into())),
    }
}

impl UpstreamTls {
    /// The secrets it names over SDS.
    pub fn sds_names(&self) -> impl Iterator<Item = &str> {
        self.common.sds_names()
    }

    /// From a cluster's transport socket; `Ok(None)` for plaintext.
    pub fn from_envoy(
        socket: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    ) -> Result<Option<Self>, (String, String)> {
        let Some(context) = tls_context::<envoy::UpstreamTlsContext>(socket, UPSTREAM_TLS_CONTEXT)?
        else {
            return Ok(None);
        };
        let common = Common::from_envoy(context.common_tls_context.as_ref())
            .map_err(|(f, e)| (format!("typed_config.{f}"), e))?;
        Ok(Some(Self {
            common,
            sni: context.sni,
            resumption: context.max_session_keys.is_none_or(|keys| keys.value > 0),
            built: Mutex::new(HashMap::new()),
        }))
    }

    /// The name sent as SNI (the endpoint's address when none is set).
    pub fn server_name(&self, address: std::net::IpAddr) -> ServerName<'static> {
        ServerName::try_from(self.sni.clone()).unwrap_or(ServerName::IpAddress(address.into()))
    }

    /// The client configuration for a connection carrying `carried`, with
    /// the secrets of the moment, and the SPIFFE ID its certificate proves.
    pub fn client_config(
        &self,
        secrets: &Secrets,
        carried: Carried,
    ) -> Result<(Arc<ClientConfig>, Option<Arc<str>>), String> {
        let (certificate, roots) = self.common.resolve(secrets)?;
        let identity = certificate.as_deref().and_then(Secret::identity);
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = built.get(&carried)
            && b.current(&certificate, &roots)
        {
            return Ok((Arc::clone(&b.config), identity));
        }
        let verifier = Arc::new(PeerVerifier {
            roots: match roots.as_deref() {
                Some(Secret::Roots(roots, _)) => Some(Arc::clone(roots)),
                Some(Secret::Certificate(_)) => {
                    return Err("the validation secret holds a certificate, not roots".into());
                }
                None => None,
            },
            sans: Arc::clone(&self.common.sans),
            algorithms: provider().signature_verification_algorithms,
        });
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match certificate.as_deref() {
            Some(Secret::Certificate(c)) => builder
                .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
                .map_err(|e| format!("the client certificate: {e}"))?,
            Some(Secret::Roots(..)) => {
                return Err("the certificate secret holds roots, not a certificate".into());
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn(carried);
        if !self.resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let config = Arc::new(config);
        built.insert(
            carried,
            Built {
                certificate,
                roots,
                config: Arc::clone(&config),
            },
        );
        Ok((config, identity))
    }

    /// The ALPN offered: Istio's values for mesh contexts (which say
    /// `istio`), else those configured, else the HTTP version's own.
    fn alpn(&self, carried: Carried) -> Vec<Vec<u8>> {
        let configured = &self.common.alpn;
        if configured.iter().any(|p| p == MESH_ALPN) {
            return match carried {
                Carried::Http1 => vec![b"istio-http/1.1".to_vec()],
                Carried::Http2 => vec![b"istio-h2".to_vec()],
                Carried::Tcp => vec![b"istio-peer-exchange".to_vec(), MESH_ALPN.to_vec()],
            };
        }
        // An HTTP/1.1 connection cannot switch to the h2 a server picks.
        if !configured.is_empty() {
            return configured
                .iter()
                .filter(|p| carried != Carried::Http1 || p.as_slice() != b"h2")
                .cloned()
                .collect();
        }
        match carried {
            Carried::Http1 => vec![b"http/1.1".to_vec()],
            Carried::Http2 => vec![b"h2".to_vec()],
            Carried::Tcp => Vec::new(),
        }
    }
}

/// A server configuration with the context's ALPN, and one without.
type ServerConfigs = (Arc<ServerConfig>, Arc<ServerConfig>);

/// How the proxy terminates TLS on a filter chain.
#[derive(Debug)]
pub struct DownstreamTls {
    common: Common,
    require_client_certificate: bool,
    /// With the configured ALPN, and without it for clients that offer
    /// none of it (Envoy then selects no protocol; rustls would refuse).
    built: Mutex<Option<Built<ServerConfigs>>>,
}

impl DownstreamTls {
    /// The secrets it names over SDS.
    pub fn sds_names(&self) -> impl Iterator<Item = &str> {
        self.common.sds_names()
    }

    /// From a filter chain's transport socket; `Ok(None)` for plaintext.
    pub fn from_envoy(
        socket: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    ) -> Result<Option<Self>, (String, String)> {
        let Some(context) =
            tls_context::<envoy::DownstreamTlsContext>(socket, DOWNSTREAM_TLS_CONTEXT)?
        else {
            return Ok(None);
        };
        let common = Common::from_envoy(context.common_tls_context.as_ref())
            .map_err(|(f, e)| (format!("typed_config.{f}"), e))?;
        if common.certificate.is_none() {
            return Err((
                "typed_config.common_tls_context".into(),
                "a server certificate is needed (tls_certificates or tls_certificate_sds_secret_configs)".into(),
            ));
        }
        Ok(Some(Self {
            common,
            require_client_certificate: context.require_client_certificate.is_some_and(|r| r.value),
            built: Mutex::new(None),
        }))
    }

    /// The server configuration for a client offering `offered` ALPN
    /// values, with the secrets of the moment, and the SPIFFE ID its
    /// certificate proves.
    pub fn server_config(
        &self,
        secrets: &Secrets,
        offered: &[Vec<u8>],
    ) -> Result<(Arc<ServerConfig>, Option<Arc<str>>), String> {
        let pick = |(with, without): &(Arc<ServerConfig>, Arc<ServerConfig>),
                    certificate: &Option<Arc<Secret>>| {
            let agrees = offered.is_empty()
                || self.common.alpn.is_empty()
                || offered.iter().any(|p| self.common.alpn.contains(p));
            let identity = certificate.as_deref().and_then(Secret::identity);
            (Arc::clone(if agrees { with } else { without }), identity)
        };
        let (certificate, roots) = self.common.resolve(secrets)?;
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = built.as_ref()
            && b.current(&certificate, &roots)
        {
            return Ok(pick(&b.config, &certificate));
        }
        let Some(Secret::Certificate(certified)) = certificate.as_deref() else {
            return Err("the certificate secret holds no certificate".into());
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match roots.as_deref() {
            Some(Secret::Roots(roots, _)) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider());
                let verifier = if self.require_client_certificate {
                    verifier.build()
                } else {
                    verifier.allow_unauthenticated().build()
                };
                builder.with_client_cert_verifier(verifier.map_err(|e| e.to_string())?)
            }
            Some(Secret::Certificate(_)) => {
                return Err("the validation secret holds a certificate, not roots".into());
            }
            None => builder.with_no_client_auth(),
        };
        let mut with = builder
            .with_single_cert(certified.chain.clone(), certified.key.clone_key())
            .map_err(|e| format!("the server certificate: {e}"))?;
        let without = Arc::new(with.clone());
        with.alpn_protocols = self.common.alpn.clone();
        let configs = (Arc::new(with), without);
        let config = pick(&configs, &certificate);
        *built = Some(Built {
            certificate,
            roots,
            config: Arc::new(configs),
        });
        Ok(config)
    }
}

/// Checks a server's certificate as Envoy does: signed by the trusted
/// roots (when there are any), and carrying one of the names matched
/// (when there are matchers). The SNI sent does not have to match.
#[derive(Debug)]
struct PeerVerifier {
    roots: Option<Arc<RootCertStore>>,
    sans: Arc<[SanMatch]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        if !self.sans.is_empty() {
            let names = subject_alt_names(end_entity);
            let matched = self.sans.iter().any(|m| {
                names
                    .iter()
                    .any(|(kind, name)| *kind == m.kind && m.test.matches(Some(name)))
            });
            if !matched {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A certificate's subject alternative names, by kind.
fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<(SanKind, String)> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(extension)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((SanKind::Dns, dns.to_string())),
            GeneralName::URI(uri) => Some((SanKind::Uri, uri.to_string())),
            GeneralName::RFC822Name(email) => Some((SanKind::Email, email.to_string())),
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                    16 => <[u8; 16]>::try_from(*bytes)
                        .ok()
                        .map(std::net::IpAddr::from),
                    _ => None,
                };
                ip.map(|ip| (SanKind::Ip, ip.to_string()))
            }
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID a certificate carries (its first `spiffe://` URI), as
/// principals name a peer.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    subject_alt_names(cert)
        .into_iter()
        .find(|(kind, name)| *kind == SanKind::Uri && name.starts_with("spiffe://"))
        .map(|(_, name)| name)
}

/// One certificate as Envoy's admin `/certs` describes it (serial in
/// hex, names, validity in RFC 3339, whole days left); `path` says where
/// it came from — here the secret's name.
fn certificate_details(cert: &CertificateDer<'_>, path: &str) -> Option<serde_json::Value> {
    use time::format_description::well_known::Rfc3339;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let validity = parsed.validity();
    let (from, to) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    let left = to - time::OffsetDateTime::now_utc();
    let names: Vec<serde_json::Value> = subject_alt_names(cert)
        .into_iter()
        .map(|(kind, name)| {
            let key = match kind {
                SanKind::Dns => "dns",
                SanKind::Uri => "uri",
                SanKind::Email => "email",
                SanKind::Ip => "ip_address",
            };
            serde_json::json!({ key: name })
        })
        .collect();
    Some(serde_json::json!({
        "path": path,
        "serial_number": parsed.raw_serial_as_string().replace(':', ""),
        "subject_alt_names": names,
        "days_until_expiration": left.whole_days().max(0).to_string(),
        "valid_from": from.format(&Rfc3339).ok()?,
        "expiration_time": to.format(&Rfc3339).ok()?,
    }))
}

/// When a certificate stops being valid, in seconds since the epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// What a TLS ClientHello says, for choosing a filter chain (Envoy's
/// `tls_inspector`): the server name asked for and the ALPN offered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub server_name: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

/// What the first bytes of a connection say about TLS.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspection {
    Tls(Hello),
    NotTls,
    NeedMore,
}

/// Reads a ClientHello from bytes peeked at (and left in place).
pub fn inspect(bytes: &[u8]) -> Inspection {
    // A handshake record (22) of TLS 1.x.
    match bytes {
        [] | [22] | [22, 3] => return Inspection::NeedMore,
        [22, 3, ..] => {}
        _ => return Inspection::NotTls,
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    while !reader.is_empty() {
        if acceptor.read_tls(&mut reader).is_err() {
            return Inspection::NotTls;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Inspection::Tls(Hello {
                server_name: hello.server_name().map(str::to_ascii_lowercase),
                alpn: hello
                    .alpn()
                    .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default(),
            })
        }
        Ok(None) => Inspection::NeedMore,
        Err(_) => Inspection::NotTls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(server_name: &str, alpn: &[&str]) -> Vec<u8> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let mut client = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(server_name.to_string()).unwrap(),
        )
        .unwrap();
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn a_client_hello_gives_its_server_name_and_alpn() {
        let bytes = hello("Reviews.Shop.svc", &["istio-h2", "h2"]);
        assert_eq!(
            inspect(&bytes),
            Inspection::Tls(Hello {
                server_name: Some("reviews.shop.svc".into()),
                alpn: vec![b"istio-h2".to_vec(), b"h2".to_vec()],
            })
        );
        assert_eq!(inspect(&bytes[..bytes.len() / 2]), Inspection::NeedMore);
        assert_eq!(inspect(&bytes[..1]), Inspection::NeedMore);
    }

    #[test]
    fn other_bytes_are_not_tls() {
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n"), Inspection::NotTls);
        assert_eq!(inspect(b"\x16\x01\x00"), Inspection::NotTls);
        assert_eq!(
            inspect(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"),
            Inspection::NotTls
        );
    }

    /// A CA and a certificate it signed for `host`, as PEM (chain, key, CA).
    fn issued(host: &str) -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (leaf.pem(), key.serialize_pem(), ca.pem())
    }

    /// The kinds of two handshakes in a row from one client context to
    /// one server context, as configured.
    async fn two_handshakes(upstream: serde_json::Value) -> Vec<Option<rustls::HandshakeKind>> {
        let (chain, key, ca) = issued("server.example");
        let socket = |context: serde_json::Value| -> envoy_types::pb::envoy::config::core::v3::TransportSocket {
            crate::envoy::from_json(serde_json::json!({
                "name": "envoy.transport_sockets.tls", "typed_config": context}))
            .unwrap()
        };
        let downstream = DownstreamTls::from_envoy(&socket(serde_json::json!({
            "@type": format!("type.googleapis.com/{DOWNSTREAM_TLS_CONTEXT}"),
            "common_tls_context": {"tls_certificates": [{
                "certificate_chain": {"inline_string": chain},
                "private_key": {"inline_string": key}}]},
        })))
        .unwrap()
        .unwrap();
        let mut context = serde_json::json!({
            "@type": format!("type.googleapis.com/{UPSTREAM_TLS_CONTEXT}"),
            "sni": "server.example",
            "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": ca}}},
        });
        if let (Some(context), serde_json::Value::Object(more)) =
            (context.as_object_mut(), upstream)
        {
            context.extend(more);
        }
        let upstream = UpstreamTls::from_envoy(&socket(context)).unwrap().unwrap();
        let secrets = Secrets::new(Arc::default(), false);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (server_config, _) = downstream.server_config(&secrets, &[]).unwrap();
            let (client_config, _) = upstream.client_config(&secrets, Carried::Tcp).unwrap();
            let (near, far) = tokio::io::duplex(64 << 10);
            let server = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut stream = tokio_rustls::TlsAcceptor::from(server_config)
                    .accept(far)
                    .await
                    .unwrap();
                stream.write_all(b"x").await.unwrap();
                stream.flush().await.unwrap();
                stream
            });
            let mut client = tokio_rustls::TlsConnector::from(client_config)
                .connect(upstream.server_name([127, 0, 0, 1].into()), near)
                .await
                .unwrap();
            // Reading the first byte takes in the session tickets sent
            // before it.
            let mut byte = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut byte)
                .await
                .unwrap();
            kinds.push(client.get_ref().1.handshake_kind());
            drop(server.await.unwrap());
        }
        kinds
    }

    #[tokio::test]
    async fn sessions_resume_unless_max_session_keys_is_zero() {
        use rustls::HandshakeKind::{Full, Resumed};
        assert_eq!(
            two_handshakes(serde_json::json!({})).await,
            [Some(Full), Some(Resumed)]
        );
        assert_eq!(
            two_handshakes(serde_json::json!({"max_session_keys": 0})).await,
            [Some(Full), Some(Full)]
        );
    }
}
