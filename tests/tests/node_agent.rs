//! The node agent on the local cluster: a Deployment's pods run as
//! processes in network namespaces, become Ready by their probes, are
//! reached through their Service's ClusterIP by name from another pod (a
//! Job, which Succeeds), are restarted when their liveness probe fails, and
//! stop when scaled away.

use anyhow::Context;
use bowline_tests::agent::images::SAMPLE_ECHO;
use bowline_tests::cluster::wait_until;
use bowline_tests::{ClusterOptions, LocalCluster};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn echo(version: &str, replicas: i32) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("echo-{version}")},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "echo", "version": version}},
            "template": {
                "metadata": {"labels": {"app": "echo", "version": version}},
                "spec": {"containers": [{
                    "name": "echo",
                    "image": SAMPLE_ECHO,
                    "args": ["serve"],
                    "env": [{"name": "VERSION", "value": version}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                }]},
            },
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_serve_their_service_and_stop() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 0,
        agent: true,
    })
    .await?;
    let client = cluster.client().await?;
    let ns = cluster.test_namespace(&client, "agent").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &echo("v1", 2)?)
        .await?;
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "echo"},
                "spec": {"selector": {"app": "echo"},
                         "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            }))?,
        )
        .await?;

    wait_until("echo-v1 to be available with 2 replicas", || async {
        let d = deployments.get("echo-v1").await?;
        Ok(d.status.and_then(|s| s.available_replicas) == Some(2))
    })
    .await?;
    let running = pods.list(&ListParams::default().labels("app=echo")).await?;
    let agent = cluster.agent().context("the agent")?;
    let mut ips = Vec::new();
    let mut namespaces = Vec::new();
    for pod in &running.items {
        namespaces.push(
            agent
                .netns(&ns, pod.metadata.name.as_deref().unwrap_or_default())
                .context("the pod's network namespace")?,
        );
        let status = pod.status.as_ref().context("a status")?;
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.host_ip.as_deref(), Some("10.248.0.1"));
        ips.push(status.pod_ip.clone().context("a pod IP")?);
        let container = &status.container_statuses.as_ref().context("statuses")?[0];
        assert!(container.ready, "{container:?}");
        assert!(
            container
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_some()
        );
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 2, "each pod has an address of its own: {ips:?}");

    // From another pod, by the Service's short name: DNS (hosts) and
    // kube-proxy's DNAT over both endpoints.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    jobs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "call"},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "call", "image": SAMPLE_ECHO,
                                "args": ["call", "http://echo/", "--requests", "40"]}],
            }}},
        }))?,
    )
    .await?;
    wait_until("the call Job to succeed", || async {
        let job = jobs.get("call").await?;
        Ok(job.status.and_then(|s| s.succeeded) == Some(1))
    })
    .await?;
    let call = pods
        .list(&ListParams::default().labels("job-name=call"))
        .await?
        .items
        .pop()
        .context("the Job's pod")?;
    let log = agent.log(
        &ns,
        call.metadata.name.as_deref().unwrap_or_default(),
        "call",
    );
    let result: Value = serde_json::from_str(log.lines().last().context("a result line")?)
        .with_context(|| log.clone())?;
    assert_eq!(result["versions"]["v1"], 40, "{result}");
    assert_eq!(result["errors"], json!({}), "{result}");

    // A container whose liveness probe fails is restarted, and says so.
    let mut sick = echo("sick", 1)?;
    let container = &mut sick
        .spec
        .as_mut()
        .context("spec")?
        .template
        .spec
        .as_mut()
        .context("pod spec")?
        .containers[0];
    container.liveness_probe = Some(serde_json::from_value(json!({
        "httpGet": {"path": "/status/500", "port": "http"},
        "periodSeconds": 1,
        "failureThreshold": 2,
    }))?);
    deployments.create(&PostParams::default(), &sick).await?;
    wait_until("the sick container to be restarted", || async {
        let listed = pods
            .list(&ListParams::default().labels("version=sick"))
            .await?;
        Ok(listed.items.iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| {
                    c[0].restart_count >= 1
                        && c[0]
                            .last_state
                            .as_ref()
                            .and_then(|l| l.terminated.as_ref())
                            .is_some()
                })
        }))
    })
    .await?;
    deployments.delete("echo-sick", &Default::default()).await?;

    // Scaled to nothing: the pods' processes stop and the pods go.
    deployments
        .patch(
            "echo-v1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await?;
    wait_until("echo-v1's pods to be gone", || async {
        Ok(pods
            .list(&ListParams::default().labels("app=echo"))
            .await?
            .items
            .is_empty())
    })
    .await?;
    // Their network namespaces went with their processes.
    let left = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()?
            .stdout,
    )?;
    for netns in &namespaces {
        assert!(
            !left
                .lines()
                .any(|l| l.split_whitespace().next() == Some(netns)),
            "{netns} is gone: {left}"
        );
    }
    Ok(())
}
