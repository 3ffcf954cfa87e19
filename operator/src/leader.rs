//! Leader election through a coordination.k8s.io Lease, so that of several
//! replicas only one reconciles (and writes) at a time.

use std::future::Future;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

/// The Lease the replicas compete for.
pub const LEASE_NAME: &str = "bowline-operator-leader";

/// Why leading stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("the Lease was lost; exiting so that another replica takes over")]
    Lost,
}

/// Waits until this replica, `identity`, holds the Lease in `namespace`,
/// then runs `work` for as long as it holds it. Losing the Lease ends `work`
/// and returns [`LeaderError::Lost`]: a replica that may not be the leader
/// any more must stop writing at once.
pub async fn run_as_leader<F>(
    client: Client,
    namespace: &str,
    identity: &str,
    work: F,
) -> Result<(), LeaderError>
where
    F: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .build()
        .await?;
    let (mut leading, _renewing) = manager.watch().await;
    tracing::info!(
        identity,
        lease = LEASE_NAME,
        namespace,
        "waiting to become the leader"
    );
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            return Err(LeaderError::Lost);
        }
    }
    tracing::info!(identity, "leading");
    tokio::select! {
        _ = work => Ok(()),
        _ = async {
            while *leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    break;
                }
            }
        } => Err(LeaderError::Lost),
    }
}
