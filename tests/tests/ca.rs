//! The certificate authority on the local cluster: a real ServiceAccount
//! token minted for the `istio-ca` audience earns a certificate naming that
//! ServiceAccount; a token for another audience, or a forged one, earns
//! nothing.

use anyhow::{Context, ensure};
use bowline_controlplane::ca::{self, Authority, Identity};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::service_account_token;
use bowline_tests::cluster::wait_until;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::json;

async fn token(
    accounts: &Api<ServiceAccount>,
    account: &str,
    audience: &str,
) -> anyhow::Result<String> {
    let namespace = accounts.namespace().context("a namespaced API")?;
    Ok(service_account_token(
        &accounts.clone().into_client(),
        namespace,
        account,
        Some(audience),
    )
    .await?)
}

#[tokio::test]
async fn a_real_token_earns_a_certificate_and_others_do_not() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.test_namespace(&client, "ca").await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "billing"}}))?,
        )
        .await?;
    wait_until("the ServiceAccount", || async {
        Ok(accounts.get_opt("billing").await?.is_some())
    })
    .await?;

    let good = token(&accounts, "billing", ca::AUDIENCE).await?;
    let identity = ca::authenticate(&client, &good).await?;
    ensure!(
        identity
            == Identity {
                namespace: namespace.clone(),
                service_account: "billing".into(),
            },
        "{identity:?}"
    );
    let authority = Authority::self_signed("cluster.local", ca::DEFAULT_TTL)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let chain = authority.sign(&csr, &identity, None)?;
    ensure!(chain.len() == 2);

    let other_audience = token(&accounts, "billing", "https://kubernetes.default.svc").await?;
    let refused = ca::authenticate(&client, &other_audience).await;
    ensure!(
        matches!(refused, Err(ca::Error::Unauthenticated(_))),
        "a token for another audience: {refused:?}"
    );
    // One character changed in the middle of the signature (the last one
    // may carry only padding bits).
    let signature_start = good.rfind('.').context("a JWT")? + 1;
    let at = signature_start + (good.len() - signature_start) / 2;
    let swapped = if &good[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &good[..at], &good[at + 1..]);
    let refused = ca::authenticate(&client, &forged).await;
    ensure!(
        matches!(refused, Err(ca::Error::Unauthenticated(_))),
        "a forged token: {refused:?}"
    );
    Ok(())
}

/// Istio's CreateCertificate over gRPC and TLS, as a proxy calls it.
#[tokio::test]
async fn create_certificate_over_grpc_names_the_token_s_service_account() -> anyhow::Result<()> {
    use bowline_controlplane::ca_service::{
        CREATE_CERTIFICATE, CertificateService, IstioCertificateRequest, IstioCertificateResponse,
    };
    use tonic::transport::{Channel, ClientTlsConfig, Server, ServerTlsConfig};
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.test_namespace(&client, "ca-grpc").await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "payments"}}))?,
        )
        .await?;

    let authority = std::sync::Arc::new(Authority::self_signed("cluster.local", ca::DEFAULT_TTL)?);
    let (chain, key) = authority.serving_certificate(
        &["istiod.istio-system.svc".into()],
        &[],
        std::time::Duration::from_secs(3600),
    )?;
    let port = bowline_tests::cluster::free_port()?;
    let service = CertificateService::new(authority.clone(), client.clone());
    let server = tokio::spawn(
        Server::builder()
            .tls_config(
                ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(chain, key)),
            )?
            .add_service(service)
            .serve(([127, 0, 0, 1], port).into()),
    );

    let result = async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                authority.root_pem(),
            ))
            .domain_name("istiod.istio-system.svc");
        let endpoint =
            Channel::from_shared(format!("https://127.0.0.1:{port}"))?.tls_config(tls)?;
        let mut channel = None;
        for _ in 0..50 {
            match endpoint.connect().await {
                Ok(connected) => {
                    channel = Some(connected);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        let mut grpc = tonic::client::Grpc::new(channel.context("the CA serves")?);
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::new(vec![
            "spiffe://cluster.local/ns/bank/sa/admin".to_string(),
        ])?
        .serialize_request(&key)?
        .pem()?;
        let call = |token: Option<String>| {
            let mut request = tonic::Request::new(IstioCertificateRequest {
                csr: csr.clone(),
                validity_duration: 3600,
                metadata: None,
            });
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            request
        };

        grpc.ready().await?;
        let token = token(&accounts, "payments", ca::AUDIENCE).await?;
        let response: tonic::Response<IstioCertificateResponse> = grpc
            .unary(
                call(Some(token)),
                http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        let chain = response.into_inner().cert_chain;
        ensure!(chain.len() == 2, "{chain:?}");
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes())?;
        let (_, leaf) = X509Certificate::from_der(&pem.contents)?;
        let sans: Vec<String> = leaf
            .subject_alternative_name()?
            .context("a SAN")?
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect();
        ensure!(
            sans == [format!("spiffe://cluster.local/ns/{namespace}/sa/payments")],
            "the caller's identity, not the CSR's: {sans:?}"
        );
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        ensure!(lifetime <= 3600 + 60, "the asked validity: {lifetime}");

        grpc.ready().await?;
        let refused = grpc
            .unary::<_, IstioCertificateResponse, _>(
                call(None),
                http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .err()
            .context("no token, no certificate")?;
        ensure!(
            refused.code() == tonic::Code::Unauthenticated,
            "{refused:?}"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    server.abort();
    result
}

/// The CA's keys survive a restart in a Secret, a plugged-in `cacerts`
/// wins, and the root reaches every namespace and is put back.
#[tokio::test]
async fn the_ca_is_kept_plugged_and_its_root_published() -> anyhow::Result<()> {
    use bowline_controlplane::ca_store;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
    use kube::api::{Patch, PatchParams};

    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "ca-store").await?;
    let ttl = ca::DEFAULT_TTL;

    let first = ca_store::load_or_create(&client, &mesh, "cluster.local", ttl).await?;
    let again = ca_store::load_or_create(&client, &mesh, "cluster.local", ttl).await?;
    ensure!(
        first.root_pem() == again.root_pem(),
        "the kept root is reused"
    );

    // A plugged-in CA takes over.
    let plugged = Authority::self_signed("cluster.local", ttl)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &mesh);
    let files = plugged.files();
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": ca_store::PLUGGED_SECRET},
                "stringData": {
                    "ca-cert.pem": files.ca_cert,
                    "ca-key.pem": files.ca_key,
                    "root-cert.pem": files.root_cert,
                    "cert-chain.pem": files.cert_chain,
                },
            }))?,
        )
        .await?;
    let now = ca_store::load_or_create(&client, &mesh, "cluster.local", ttl).await?;
    ensure!(now.root_pem() == plugged.root_pem(), "cacerts wins");

    // The root in every namespace, a new one included, and put back.
    let root = now.root_pem().to_string();
    let publisher = tokio::spawn(ca_store::publish_root_everywhere(
        client.clone(),
        root.clone(),
    ));
    let result = async {
        let apps = format!("{mesh}-apps");
        bowline_tests::cluster::create_namespace(&client, &apps, json!({})).await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &apps);
        let published = || async {
            Ok(config_maps
                .get_opt(ca_store::ROOT_CONFIG_MAP)
                .await?
                .and_then(|cm| cm.data)
                .and_then(|d| d.get(ca_store::ROOT_KEY).cloned())
                == Some(root.clone()))
        };
        wait_until("the root in the new namespace", published).await?;
        config_maps
            .patch(
                ca_store::ROOT_CONFIG_MAP,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"root-cert.pem": "tampered"}})),
            )
            .await?;
        wait_until("the root put back", published).await?;
        let _ = namespaces.delete(&apps, &Default::default()).await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    publisher.abort();
    result
}
