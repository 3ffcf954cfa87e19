//! The whole mesh on the local cluster, as a user installs it: the node
//! agent runs the pods, the operator comes from its Helm chart, the mesh
//! from config/samples/demo.yaml with the `default` tag. For the demo and
//! the end-to-end tests.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::agent::images::{SAMPLE_ECHO, workspace_binary};
use crate::binaries::tool;
use crate::{ClusterOptions, LocalCluster};

/// The repository's config/ directory.
pub fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// A cluster with the node agent and no kwok Nodes, so every pod runs.
pub async fn cluster() -> anyhow::Result<LocalCluster> {
    Ok(LocalCluster::start(ClusterOptions {
        nodes: 0,
        agent: true,
    })
    .await?)
}

/// The cluster with the mesh installed, shared by the tests of one test
/// binary (started on first use, on a thread of its own). Its pods'
/// processes and network namespaces go when the test process does.
pub fn shared() -> anyhow::Result<&'static LocalCluster> {
    static SHARED: OnceLock<Result<LocalCluster, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            crate::cluster::on_a_thread_of_its_own(|| async {
                let cluster = cluster().await?;
                install(&cluster)?;
                Ok(cluster)
            })
        })
        .as_ref()
        .map_err(|message| anyhow::anyhow!("the shared mesh failed to start: {message}"))
}

/// Installs the operator with its Helm chart, then the demo mesh and the
/// `default` tag, and waits until the installation is Ready.
pub fn install(cluster: &LocalCluster) -> anyhow::Result<()> {
    install_operator(cluster)?;
    install_mesh(cluster)
}

/// `helm install` of config/helm/bowline-operator into bowline-system, one
/// replica, waiting until it is available.
pub fn install_operator(cluster: &LocalCluster) -> anyhow::Result<()> {
    let helm_home = tempfile::tempdir()?;
    let output = std::process::Command::new(tool("helm/build.sh")?)
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("HELM_CACHE_HOME", helm_home.path().join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.path().join("config"))
        .env("HELM_DATA_HOME", helm_home.path().join("data"))
        .args(["install", "bowline-operator"])
        .arg(config_dir().join("helm/bowline-operator"))
        .args(["--namespace", "bowline-system", "--create-namespace"])
        .args(["--set", "replicaCount=1", "--wait", "--timeout", "3m"])
        .stdout(Stdio::null())
        .output()
        .context("running helm")?;
    ensure!(
        output.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// config/samples/demo.yaml and tag-default.yaml, then waits until the
/// installation is Ready.
pub fn install_mesh(cluster: &LocalCluster) -> anyhow::Result<()> {
    let path = |p: &str| config_dir().join(p).display().to_string();
    kubectl(cluster, &["apply", "-f", &path("samples/demo.yaml")])?;
    kubectl(cluster, &["apply", "-f", &path("samples/tag-default.yaml")])?;
    kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "meshinstallation/default",
            "--timeout=180s",
        ],
    )?;
    Ok(())
}

/// Runs the cluster's kubectl; its output, or an error with its standard
/// error.
pub fn kubectl(cluster: &LocalCluster, args: &[&str]) -> anyhow::Result<String> {
    let output = cluster
        .kubectl()
        .args(args)
        .output()
        .context("running kubectl")?;
    if !output.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// `kubectl apply` of `objects` (a list of manifests as JSON).
pub fn apply(cluster: &LocalCluster, objects: &[Value]) -> anyhow::Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    std::fs::write(file.path(), serde_json::to_vec(&list)?)?;
    kubectl(
        cluster,
        &["apply", "-f", &file.path().display().to_string()],
    )?;
    Ok(())
}

/// A namespace, with sidecar injection when `injected`.
pub fn namespace(name: &str, injected: bool) -> Value {
    let labels = if injected {
        json!({"istio-injection": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A ServiceAccount and a Deployment of the sample echo service named
/// `name`, answering as `version`, labelled `app: <app>`, `version`.
pub fn echo(namespace: &str, name: &str, app: &str, version: &str) -> Vec<Value> {
    echo_with(namespace, name, app, version, &[])
}

/// [`echo`] with more environment (`STATUS_CODE=503` for a broken one).
pub fn echo_with(
    namespace: &str,
    name: &str,
    app: &str,
    version: &str,
    env: &[(&str, &str)],
) -> Vec<Value> {
    let labels = json!({"app": app, "version": version});
    let mut variables = vec![
        json!({"name": "VERSION", "value": version}),
        json!({"name": "SERVICE_NAME", "value": app}),
    ];
    variables.extend(env.iter().map(|(k, v)| json!({"name": k, "value": v})));
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": name, "namespace": namespace}}),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": name,
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{
                            "name": "echo",
                            "image": SAMPLE_ECHO,
                            "args": ["serve"],
                            "env": variables,
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                               "periodSeconds": 1},
                        }],
                    },
                },
            },
        }),
    ]
}

/// A Service `name` on port 80 for the pods labelled `app: <name>`.
pub fn service(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    })
}

/// Waits until every Deployment of `namespace` is Available.
pub fn wait_available(cluster: &LocalCluster, namespace: &str) -> anyhow::Result<()> {
    kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "-n",
            namespace,
            "--timeout=180s",
        ],
    )?;
    Ok(())
}

/// The name of the first pod of `namespace` matching `selector`.
pub fn pod(cluster: &LocalCluster, namespace: &str, selector: &str) -> anyhow::Result<String> {
    let name = kubectl(
        cluster,
        &[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            selector,
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    )?;
    ensure!(
        !name.trim().is_empty(),
        "no running pod {selector} in {namespace}"
    );
    Ok(name.trim().to_string())
}

/// What `sample-echo call <url>` prints when run from inside pod
/// `namespace/pod` (in its network namespace, so through its sidecar when
/// it has one): requests by answering version, status codes, errors.
pub fn call_from(
    cluster: &LocalCluster,
    namespace: &str,
    pod: &str,
    url: &str,
    extra: &[&str],
) -> anyhow::Result<Value> {
    sample_call_from(cluster, namespace, pod, "sample-echo", url, extra)
}

/// What `<sample> call <url>` prints when run from inside pod
/// `namespace/pod`, for `sample-echo` or `sample-grpc`.
pub fn sample_call_from(
    cluster: &LocalCluster,
    namespace: &str,
    pod: &str,
    sample: &str,
    url: &str,
    extra: &[&str],
) -> anyhow::Result<Value> {
    let netns = pod_netns(cluster, namespace, pod)?;
    let binary = workspace_binary("bowline-tests", sample)?;
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(binary)
        .args(["call", url])
        .args(extra)
        .output()?;
    ensure!(
        output.status.success(),
        "{sample} call {url} from {namespace}/{pod}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    serde_json::from_str(text.trim()).with_context(|| text.clone())
}

/// Calls as [`sample_call_from`] until `until` holds for the result (for
/// at most a minute): configuration and endpoints reach the proxies a
/// moment after the API server has them, as in any mesh.
pub async fn call_until(
    cluster: &LocalCluster,
    (namespace, pod): (&str, &str),
    sample: &str,
    url: &str,
    extra: &[&str],
    until: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let result = sample_call_from(cluster, namespace, pod, sample, url, extra)?;
        if until(&result) {
            return Ok(result);
        }
        if std::time::Instant::now() > deadline {
            bail!("calling {url} from {namespace}/{pod} never gave what was expected: {result}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `curl` from inside pod `namespace/pod` until it answers `code` (for at
/// most a minute); the body.
pub async fn curl_until(
    cluster: &LocalCluster,
    (namespace, pod): (&str, &str),
    args: &[&str],
    code: u16,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (got, body) = curl_from(cluster, namespace, pod, args)?;
        if got == code {
            return Ok(body);
        }
        if std::time::Instant::now() > deadline {
            bail!("curl {args:?} from {namespace}/{pod}: {got} {body}, not {code}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `curl` from inside pod `namespace/pod`: the status code (0 when no
/// answer came) and the body.
pub fn curl_from(
    cluster: &LocalCluster,
    namespace: &str,
    pod: &str,
    args: &[&str],
) -> anyhow::Result<(u16, String)> {
    let netns = pod_netns(cluster, namespace, pod)?;
    let output = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "curl",
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

fn pod_netns(cluster: &LocalCluster, namespace: &str, pod: &str) -> anyhow::Result<String> {
    cluster
        .agent()
        .context("the cluster has no node agent")?
        .netns(namespace, pod)
        .with_context(|| format!("no network namespace for pod {namespace}/{pod}"))
}

/// A pod's container log, as the agent kept it.
pub fn log(cluster: &LocalCluster, namespace: &str, pod: &str, container: &str) -> String {
    cluster
        .agent()
        .map(|agent| agent.log(namespace, pod, container))
        .unwrap_or_default()
}

/// A pod `name` in `namespace` (which exists) running `sample-echo call`
/// with `args` (the URL first), until it is done or stopped
/// ([`stop_caller`]); [`caller_result`] reads what it saw.
pub fn start_caller(
    cluster: &LocalCluster,
    namespace: &str,
    name: &str,
    args: &[&str],
) -> anyhow::Result<()> {
    let mut command = vec!["call"];
    command.extend(args);
    apply(
        cluster,
        &[json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 5,
                "containers": [{"name": "call", "image": SAMPLE_ECHO, "args": command}],
            },
        })],
    )
}

/// The ingress gateway's Service, as a pod calls it.
pub const INGRESS_GATEWAY: &str = "http://istio-ingressgateway.istio-system/";

/// A steady client ([`start_caller`]): a request for `host` to the
/// ingress gateway every 20 ms, until stopped or `duration` is over.
pub fn start_gateway_caller(
    cluster: &LocalCluster,
    namespace: &str,
    name: &str,
    host: &str,
    duration: &str,
) -> anyhow::Result<()> {
    let duration = format!("--duration={duration}");
    start_caller(
        cluster,
        namespace,
        name,
        &[
            INGRESS_GATEWAY,
            "--host",
            host,
            "--requests",
            "1000000",
            "--interval",
            "20ms",
            &duration,
        ],
    )
}

/// Deletes caller `namespace/name`: stopped by SIGTERM, it prints what it
/// saw.
pub fn stop_caller(cluster: &LocalCluster, namespace: &str, name: &str) -> anyhow::Result<()> {
    kubectl(
        cluster,
        &["delete", "pod", name, "-n", namespace, "--wait=false"],
    )?;
    Ok(())
}

/// What caller `namespace/name` printed once done or stopped (waiting up
/// to `wait` for it).
pub async fn caller_result(
    cluster: &LocalCluster,
    (namespace, name): (&str, &str),
    wait: std::time::Duration,
) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let text = log(cluster, namespace, name, "call");
        if let Some(line) = text.lines().rev().find(|l| l.starts_with('{')) {
            return serde_json::from_str(line).with_context(|| format!("caller {name}: {line}"));
        }
        if std::time::Instant::now() > deadline {
            bail!("caller {namespace}/{name} printed no result: {text}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Moves installation `default` to `version` (a canary with the demo's
/// RevisionBased strategy).
pub fn upgrade_to(cluster: &LocalCluster, version: &str) -> anyhow::Result<()> {
    let patch = json!({"spec": {"version": version}}).to_string();
    kubectl(
        cluster,
        &[
            "patch",
            "meshinstallation",
            "default",
            "--type=merge",
            "-p",
            &patch,
        ],
    )?;
    Ok(())
}

/// Whether Prometheus text `metrics` has a series of `name` with every
/// label of `labels`.
pub fn has_series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    series(metrics, name, labels).next().is_some()
}

/// The sum of the values of the series [`has_series`] finds.
pub fn series_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(metrics, name, labels)
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The lines of `metrics` that are series of `name` with every label of
/// `labels`.
fn series<'a>(
    metrics: &'a str,
    name: &str,
    labels: &[(&str, &str)],
) -> impl Iterator<Item = &'a str> {
    let prefix = format!("{name}{{");
    let labels: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}=\"{value}\""))
        .collect();
    metrics.lines().filter(move |line| {
        line.starts_with(&prefix) && labels.iter().all(|label| line.contains(label.as_str()))
    })
}

/// Waits (up to four minutes) until the only MeshRevision left is
/// `revision`: a canary upgrade moved every workload to it and deleted the
/// old one.
pub async fn wait_for_only_revision(cluster: &LocalCluster, revision: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let revisions = kubectl(
            cluster,
            &[
                "get",
                "meshrevision",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
        )?;
        if revisions.trim() == revision {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the upgrade did not finish in 4 minutes: revisions {revisions}; {}",
                kubectl(cluster, &["get", "meshinstallation", "-o", "yaml"])?
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// The result of PromQL `query` from the mesh's Prometheus, asked through
/// the API server's Service proxy (as `kubectl proxy` would).
pub fn prometheus_query(cluster: &LocalCluster, query: &str) -> anyhow::Result<Value> {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", query)
        .finish();
    Ok(prometheus_api(cluster, &format!("query?{query}"))?["result"].take())
}

/// The `data` of the mesh's Prometheus answering `path` under its
/// `/api/v1/` (`targets`, `query?…`), through the API server's service
/// proxy.
pub fn prometheus_api(cluster: &LocalCluster, path: &str) -> anyhow::Result<Value> {
    let path =
        format!("/api/v1/namespaces/istio-system/services/prometheus:9090/proxy/api/v1/{path}");
    let mut answer: Value = serde_json::from_str(&kubectl(cluster, &["get", "--raw", &path])?)?;
    ensure!(answer["status"] == "success", "{path}: {answer}");
    Ok(answer["data"].take())
}

/// The Prometheus text a pod's sidecar serves on 15020, read through the
/// API server's pod proxy as a user would.
pub fn sidecar_metrics(
    cluster: &LocalCluster,
    namespace: &str,
    pod: &str,
) -> anyhow::Result<String> {
    kubectl(
        cluster,
        &[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{namespace}/pods/{pod}:15020/proxy/stats/prometheus"),
        ],
    )
}

/// Why calls to `url` from `namespace/pod` fail, as its sidecar sees them:
/// its outbound request counts; the endpoints it knows; the log lines of
/// one more call made with debug logging on; the namespace's pods and their
/// addresses; the warnings of their sidecars. For a test's error.
pub fn outbound_diagnosis(cluster: &LocalCluster, namespace: &str, pod: &str, url: &str) -> String {
    let mut out = String::new();
    let counts = sidecar_metrics(cluster, namespace, pod)
        .map(|m| {
            m.lines()
                .filter(|l| l.starts_with("istio_requests_total{reporter=\"source\""))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| e.to_string());
    out += &format!("{namespace}/{pod}'s outbound requests:\n{counts}\n");

    let endpoints = curl_from(
        cluster,
        namespace,
        pod,
        &["http://127.0.0.1:15000/config_dump?include_eds"],
    )
    .and_then(|(_, body)| Ok(serde_json::from_str::<Value>(&body)?))
    .map(|dump| known_endpoints(&dump))
    .unwrap_or_else(|e| format!("no config dump: {e:#}"));
    out += &format!("its endpoints:\n{endpoints}\n");

    let debug = "http://127.0.0.1:15000/logging?level=debug";
    let before = log(cluster, namespace, pod, "istio-proxy").len();
    let _ = curl_from(cluster, namespace, pod, &["-X", "POST", debug]);
    let call = call_from(cluster, namespace, pod, url, &["--requests", "10"])
        .map(|r| r.to_string())
        .unwrap_or_else(|e| format!("{e:#}"));
    let info = "http://127.0.0.1:15000/logging?level=info";
    let _ = curl_from(cluster, namespace, pod, &["-X", "POST", info]);
    let logged = log(cluster, namespace, pod, "istio-proxy");
    let failures: Vec<&str> = logged
        .get(before..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("failed") || l.contains("\" 5"))
        .take(10)
        .collect();
    out += &format!(
        "one more call: {call}\nits sidecar's failures:\n{}\n",
        failures.join("\n")
    );

    let pods = kubectl(cluster, &["get", "pods", "-n", namespace, "-o", "wide"])
        .unwrap_or_else(|e| format!("{e:#}"));
    out += &format!("pods:\n{pods}\n");
    let names = kubectl(
        cluster,
        &[
            "get",
            "pods",
            "-n",
            namespace,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    )
    .unwrap_or_default();
    for name in names.split_whitespace() {
        let sidecar = log(cluster, namespace, name, "istio-proxy");
        let warnings: Vec<&str> = sidecar
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(10)
            .collect();
        out += &format!("{name}'s sidecar warnings:\n{}\n", warnings.join("\n"));
    }
    out
}

/// Per cluster of an Envoy config dump (with EDS), the endpoint addresses.
fn known_endpoints(dump: &Value) -> String {
    let mut lines = Vec::new();
    for config in dump["configs"].as_array().into_iter().flatten() {
        for endpoint in config["dynamic_endpoint_configs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let assignment = &endpoint["endpoint_config"];
            let addresses: Vec<String> = assignment["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|locality| locality["lb_endpoints"].as_array().into_iter().flatten())
                .map(|lb| {
                    let socket = &lb["endpoint"]["address"]["socket_address"];
                    format!(
                        "{}:{}",
                        socket["address"].as_str().unwrap_or("?"),
                        socket["port_value"]
                    )
                })
                .collect();
            lines.push(format!(
                "{} {}",
                assignment["cluster_name"].as_str().unwrap_or("?"),
                addresses.join(" ")
            ));
        }
    }
    lines.join("\n")
}
