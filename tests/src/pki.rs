//! The local cluster's PKI: one CA that signs every serving and client
//! certificate, and a separate key pair that signs ServiceAccount tokens.
//!
//! Everything is written as PEM files into the cluster's directory, because
//! that is how the Kubernetes components take it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::Error;

/// A certificate and its private key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who a client certificate speaks for: Kubernetes takes the user from the
/// CommonName and the groups from the Organization entries.
#[derive(Clone, Copy, Debug)]
pub struct ClientIdentity<'a> {
    pub file_stem: &'a str,
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

/// The identities the cluster's components and its administrator use.
pub const ADMIN: ClientIdentity<'static> = ClientIdentity {
    file_stem: "admin",
    user: "bowline-admin",
    groups: &["system:masters"],
};
pub const CONTROLLER_MANAGER: ClientIdentity<'static> = ClientIdentity {
    file_stem: "controller-manager",
    user: "system:kube-controller-manager",
    groups: &[],
};
pub const SCHEDULER: ClientIdentity<'static> = ClientIdentity {
    file_stem: "scheduler",
    user: "system:kube-scheduler",
    groups: &[],
};

/// The name the API server's front-proxy client certificate carries, and the
/// only one `--requestheader-allowed-names` accepts.
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// Every file the cluster's components are started with.
#[derive(Clone, Debug)]
pub struct ClusterPki {
    pub ca: CertFiles,
    /// The CA of the API server's aggregation layer (requestheader auth), and
    /// the client certificate the API server presents to extension servers.
    pub front_proxy_ca: CertFiles,
    pub front_proxy_client: CertFiles,
    /// Serving certificate of kube-apiserver, kube-controller-manager and
    /// kube-scheduler (all listen on 127.0.0.1 only).
    pub serving: CertFiles,
    pub admin: CertFiles,
    pub controller_manager: CertFiles,
    pub scheduler: CertFiles,
    /// Signs (private) and verifies (public) ServiceAccount tokens.
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl ClusterPki {
    /// Generates a fresh PKI into `dir`. `first_service_ip` is the ClusterIP of
    /// the `kubernetes` Service, which in-cluster clients dial.
    pub fn generate(dir: &Path, first_service_ip: Ipv4Addr) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

        let (ca, ca_files) = new_ca(dir, "ca", "bowline-local-cluster-ca")?;
        let (front_proxy, front_proxy_ca) =
            new_ca(dir, "front-proxy-ca", "bowline-local-front-proxy-ca")?;
        let mut p = params(FRONT_PROXY_CLIENT, &[])?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let front_proxy_client = issue(dir, "front-proxy-client", p, &front_proxy)?;

        let mut serving = params("kube-apiserver", &[])?;
        serving.subject_alt_names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .into_iter()
        .map(|name| name.try_into().map(SanType::DnsName))
        .collect::<Result<_, _>>()?;
        serving.subject_alt_names.extend([
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V4(first_service_ip)),
        ]);
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = issue(dir, "serving", serving, &ca)?;

        let client = |identity: ClientIdentity<'_>| -> Result<CertFiles, Error> {
            let mut p = params(identity.user, identity.groups)?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            issue(dir, identity.file_stem, p, &ca)
        };

        let sa_key = KeyPair::generate()?;
        let service_account_key = write(dir, "service-account.key", &sa_key.serialize_pem())?;
        let service_account_pub = write(dir, "service-account.pub", &sa_key.public_key_pem())?;

        Ok(Self {
            ca: ca_files,
            front_proxy_ca,
            front_proxy_client,
            serving,
            admin: client(ADMIN)?,
            controller_manager: client(CONTROLLER_MANAGER)?,
            scheduler: client(SCHEDULER)?,
            service_account_key,
            service_account_pub,
        })
    }
}

/// A self-signed CA, written as `<stem>.crt` and `<stem>.key`.
fn new_ca(
    dir: &Path,
    stem: &str,
    common_name: &str,
) -> Result<(CertifiedIssuer<'static, KeyPair>, CertFiles), Error> {
    let mut p = params(common_name, &[])?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
    let files = write_pair(dir, stem, &ca.pem(), &ca.key().serialize_pem())?;
    Ok((ca, files))
}

/// Parameters valid from an hour ago (clock skew between processes started
/// in the same second is not an issue, but a test machine's clock may step)
/// for a year, with the given subject.
fn params(common_name: &str, organizations: &[&str]) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(365);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    for org in organizations {
        dn.push(DnType::OrganizationName, *org);
    }
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    Ok(p)
}

fn issue(
    dir: &Path,
    stem: &str,
    params: CertificateParams,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> Result<CertFiles, Error> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    write_pair(dir, stem, &cert.pem(), &key.serialize_pem())
}

fn write_pair(dir: &Path, stem: &str, cert: &str, key: &str) -> Result<CertFiles, Error> {
    Ok(CertFiles {
        cert: write(dir, &format!("{stem}.crt"), cert)?,
        key: write(dir, &format!("{stem}.key"), key)?,
    })
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    std::fs::write(&path, contents).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
