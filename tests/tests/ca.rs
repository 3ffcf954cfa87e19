//! The certificate authority on the local cluster: a real ServiceAccount
//! token minted for the `istio-ca` audience earns a certificate naming that
//! ServiceAccount; a token for another audience, or a forged one, earns
//! nothing.

use anyhow::{Context, ensure};
use bowline_controlplane::ca::{self, Authority, Identity};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::wait_until;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::json;

async fn token(
    accounts: &Api<ServiceAccount>,
    account: &str,
    audience: &str,
) -> anyhow::Result<String> {
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [audience], "expirationSeconds": 600},
    }))?;
    Ok(accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await?
        .status
        .context("a token")?
        .token)
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
    let forged = format!("{}x", &good[..good.len() - 1]);
    let refused = ca::authenticate(&client, &forged).await;
    ensure!(
        matches!(refused, Err(ca::Error::Unauthenticated(_))),
        "a forged token: {refused:?}"
    );
    Ok(())
}
