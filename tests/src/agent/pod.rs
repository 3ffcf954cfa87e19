//! One pod's life on the agent's node, as a kubelet leads it: a network
//! namespace with the pod's address, its volumes as files, its init
//! containers one after the other, then its containers as processes
//! (restarted with a back-off when they exit), readiness from their probes,
//! and all of it reported in the pod's status. When the pod is deleted its
//! processes get SIGTERM, then SIGKILL after the grace period, and the
//! namespace goes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, KeyToPath, Pod, Probe, Secret,
    ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::images::{self, Program};
use super::network::{NODE_IP, PodNetwork, connect_in};
use crate::cluster::KUBERNETES_SERVICE_IP;

/// What every pod of the agent shares.
pub struct Node {
    pub name: String,
    pub client: Client,
    pub network: Arc<PodNetwork>,
    /// Per pod `pods/<namespace>_<name>_<uid>/` (volumes and logs), and
    /// `bin/` (where programs are mounted, world-readable).
    pub dir: PathBuf,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The condition a pod carries when some of its containers have no local
/// program and are reported running without running.
pub const SIMULATED: &str = "bowline.dev/Simulated";

/// Runs the pod `updates` carries until it is deleted.
pub async fn run(node: Arc<Node>, mut updates: watch::Receiver<Option<Pod>>, process_group: i32) {
    let first = updates.borrow().clone();
    let Some(pod) = first else {
        return;
    };
    let key = key(&pod);
    let mut life = match Life::new(node.clone(), &pod, process_group) {
        Ok(life) => life,
        Err(e) => {
            tracing::warn!(pod = %key, "cannot start: {e:#}");
            return;
        }
    };
    if let Err(e) = life.live(&mut updates).await {
        tracing::warn!(pod = %key, "{e:#}");
    }
    let last = updates.borrow().clone();
    life.stop(grace_period(&last)).await;
    node.network.remove_pod(&life.netns);
    let _ = std::fs::remove_file(life.dir.join("netns"));
    // The kubelet's last word: the pod is gone from the node.
    if let Some(pod) = last {
        let pods: Api<Pod> = Api::namespaced(
            node.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        let _ = pods
            .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
            .await;
    }
    tracing::info!(pod = %key, "stopped");
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn deleting(pod: &Option<Pod>) -> bool {
    pod.as_ref()
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
}

fn grace_period(pod: &Option<Pod>) -> Duration {
    let seconds = pod
        .as_ref()
        .and_then(|p| p.metadata.deletion_grace_period_seconds)
        .or_else(|| {
            pod.as_ref()
                .and_then(|p| p.spec.as_ref()?.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    // Tests do not wait half a minute for a process that ignores SIGTERM.
    Duration::from_secs(seconds.clamp(0, 10) as u64)
}

/// A container: its spec, its program and its process.
#[derive(Debug)]
struct Run {
    spec: Container,
    image: String,
    program: Option<Program>,
    child: Option<tokio::process::Child>,
    started_at: Option<Timestamp>,
    restarts: i32,
    /// The last exit: code, started, finished.
    last_exit: Option<(i32, Timestamp, Timestamp)>,
    /// Why it is not running, when it is not.
    waiting: Option<(String, String)>,
    /// An init container that finished.
    completed: bool,
    restart_at: Option<Instant>,
    /// Readiness.
    probe: ProbeState,
    liveness: ProbeState,
    /// Startup; `ready` once it passed.
    startup: ProbeState,
}

#[derive(Debug, Default)]
struct ProbeState {
    ready: bool,
    next: Option<Instant>,
    successes: i32,
    failures: i32,
}

struct Life {
    node: Arc<Node>,
    pod: Pod,
    netns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    started: Timestamp,
    init: Vec<Run>,
    containers: Vec<Run>,
    /// Volume name → its directory (or file) on this machine.
    volumes: BTreeMap<String, PathBuf>,
    volumes_ready: bool,
    reported: Option<Value>,
    process_group: i32,
}

impl Life {
    fn new(node: Arc<Node>, pod: &Pod, process_group: i32) -> anyhow::Result<Self> {
        let (netns, ip) = node
            .network
            .add_pod(pod.metadata.namespace.as_deref().unwrap_or_default())?;
        let dir = node.dir.join("pods").join(format!(
            "{}_{}_{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
            pod.metadata.uid.as_deref().unwrap_or_default()
        ));
        std::fs::create_dir_all(dir.join("volumes"))?;
        // For [`super::NodeAgent::netns`]: `ip netns exec` into the pod.
        std::fs::write(dir.join("netns"), &netns)?;
        let spec = pod.spec.clone().unwrap_or_default();
        let runs = |containers: Vec<Container>| -> Vec<Run> {
            containers
                .into_iter()
                .map(|spec| Run {
                    image: spec.image.clone().unwrap_or_default(),
                    spec,
                    program: None,
                    child: None,
                    started_at: None,
                    restarts: 0,
                    last_exit: None,
                    waiting: Some(("ContainerCreating".into(), String::new())),
                    completed: false,
                    restart_at: None,
                    probe: ProbeState::default(),
                    liveness: ProbeState::default(),
                    startup: ProbeState::default(),
                })
                .collect()
        };
        Ok(Self {
            node,
            pod: pod.clone(),
            netns,
            ip,
            dir,
            started: Timestamp::now(),
            init: runs(spec.init_containers.unwrap_or_default()),
            containers: runs(spec.containers),
            volumes: BTreeMap::new(),
            volumes_ready: false,
            reported: None,
            process_group,
        })
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(
            self.node.client.clone(),
            self.pod.metadata.namespace.as_deref().unwrap_or_default(),
        )
    }

    async fn live(&mut self, updates: &mut watch::Receiver<Option<Pod>>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let latest = updates.borrow().clone();
            if deleting(&latest) {
                return Ok(());
            }
            if let Some(pod) = latest {
                self.pod = pod;
            }
            self.step().await;
            let status = self.status();
            if self.reported.as_ref() != Some(&status) {
                let name = self.pod.metadata.name.clone().unwrap_or_default();
                match self
                    .pods()
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Strategic(json!({ "status": status })),
                    )
                    .await
                {
                    Ok(_) => self.reported = Some(status),
                    Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
                    Err(e) => tracing::warn!(pod = %key(&self.pod), "reporting status: {e}"),
                }
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = updates.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One round: volumes, then init containers in order, then the
    /// containers and their probes.
    async fn step(&mut self) {
        if !self.volumes_ready {
            match self.prepare_volumes().await {
                Ok(()) => self.volumes_ready = true,
                Err(e) => {
                    let message = format!("{e:#}");
                    for run in self.init.iter_mut().chain(self.containers.iter_mut()) {
                        run.waiting = Some(("ContainerCreating".into(), message.clone()));
                    }
                    return;
                }
            }
        }
        for i in 0..self.init.len() {
            if self.init[i].completed {
                continue;
            }
            self.reap(Which::Init, i);
            if self.init[i].completed {
                continue;
            }
            if self.init[i].child.is_none() {
                self.start(Which::Init, i);
            }
            return;
        }
        for i in 0..self.containers.len() {
            self.reap(Which::App, i);
            if self.containers[i].child.is_none() && self.containers[i].started_at.is_none() {
                self.start(Which::App, i);
            }
        }
        for i in 0..self.containers.len() {
            self.probe(i).await;
        }
    }

    fn run_mut(&mut self, which: Which, i: usize) -> &mut Run {
        match which {
            Which::Init => &mut self.init[i],
            Which::App => &mut self.containers[i],
        }
    }

    /// Notes a process that exited; an app container is started again
    /// after a back-off (10 s doubling to 5 min in a kubelet; 1 s doubling
    /// to 30 s here), an init container that failed too.
    fn reap(&mut self, which: Which, i: usize) {
        let run = self.run_mut(which, i);
        if let Some(at) = run.restart_at
            && Instant::now() >= at
        {
            run.restart_at = None;
            run.started_at = None;
        }
        let Some(child) = run.child.as_mut() else {
            return;
        };
        let Ok(Some(status)) = child.try_wait() else {
            return;
        };
        let code = status.code().unwrap_or(128 + 9);
        run.child = None;
        let started = run.started_at.unwrap_or_else(Timestamp::now);
        run.last_exit = Some((code, started, Timestamp::now()));
        run.probe = ProbeState::default();
        run.liveness = ProbeState::default();
        run.startup = ProbeState::default();
        let policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let run = self.run_mut(which, i);
        let done = match which {
            Which::Init => code == 0,
            Which::App => policy == "Never" || (policy == "OnFailure" && code == 0),
        };
        if done {
            run.completed = true;
            run.waiting = None;
            return;
        }
        let backoff =
            Duration::from_secs(1 << run.restarts.clamp(0, 5) as u32).min(Duration::from_secs(30));
        run.restarts += 1;
        run.restart_at = Some(Instant::now() + backoff);
        run.waiting = Some((
            "CrashLoopBackOff".into(),
            format!(
                "back-off {}s restarting failed container {} (exit code {code})",
                backoff.as_secs(),
                run.spec.name
            ),
        ));
        tracing::warn!(pod = %key(&self.pod), container = %self.run_mut(which, i).spec.name, code, "container exited");
    }

    fn start(&mut self, which: Which, i: usize) {
        if self.run_mut(which, i).restart_at.is_some() {
            return;
        }
        match self.launch(which, i) {
            Ok(()) => {}
            Err(e) => {
                let run = self.run_mut(which, i);
                run.waiting = Some(("CreateContainerError".into(), format!("{e:#}")));
                run.restart_at = Some(Instant::now() + Duration::from_secs(2));
            }
        }
    }

    fn launch(&mut self, which: Which, i: usize) -> anyhow::Result<()> {
        let pod = self.pod.clone();
        let (spec, image) = {
            let run = self.run_mut(which, i);
            (run.spec.clone(), run.image.clone())
        };
        let Some(program) = images::program(&image)? else {
            // Nothing here runs this image: say so, and report it running.
            let run = self.run_mut(which, i);
            run.started_at = Some(Timestamp::now());
            run.waiting = None;
            if which == Which::Init {
                run.completed = true;
            }
            return Ok(());
        };
        let env = self.environment(&spec)?;
        let binary = self.node.dir.join("bin").join(
            program
                .path
                .file_name()
                .context("the program's file name")?,
        );
        if !binary.exists() {
            std::fs::write(&binary, b"")?;
            std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let mut argv: Vec<String> = match &spec.command {
            Some(command) if !command.is_empty() => {
                let first = Path::new(&command[0]).file_name();
                if first != program.path.file_name() {
                    bail!(
                        "container {}: command {:?} is not the program of image {image} ({})",
                        spec.name,
                        command[0],
                        program.path.display()
                    );
                }
                command[1..].to_vec()
            }
            _ => Vec::new(),
        };
        argv.extend(spec.args.clone().unwrap_or_default());
        let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();

        let security = spec.security_context.as_ref();
        let pod_security = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let uid = security
            .and_then(|s| s.run_as_user)
            .or_else(|| pod_security.and_then(|s| s.run_as_user))
            .unwrap_or(program.user as i64);
        let gid = security
            .and_then(|s| s.run_as_group)
            .or_else(|| pod_security.and_then(|s| s.run_as_group))
            .unwrap_or(uid);

        // In the pod's network namespace and a mount namespace of the
        // container's own: its volumes and its program bound where the
        // image has them, then the program as its user.
        const SCRIPT: &str = r#"set -e
workdir=$1
shift
while [ "$1" != "--" ]; do
  mount --bind "$2" "$3"
  if [ "$1" = ro ]; then mount -o remount,bind,ro "$3"; fi
  shift 3
done
shift
cd "$workdir"
exec "$@"
"#;
        let mut command = tokio::process::Command::new("ip");
        command.args([
            "netns",
            "exec",
            &self.netns,
            "sh",
            "-c",
            SCRIPT,
            "container",
        ]);
        // Where the program starts: the container's working directory, or
        // the root (the image's WORKDIR is not known here).
        command.arg(spec.working_dir.as_deref().unwrap_or("/"));
        command.args([
            "ro",
            &program.path.display().to_string(),
            &binary.display().to_string(),
        ]);
        for mount in spec.volume_mounts.iter().flatten() {
            let source = self
                .volumes
                .get(&mount.name)
                .with_context(|| format!("container {}: no volume {}", spec.name, mount.name))?;
            let source = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => source.join(sub),
                _ => source.clone(),
            };
            mount_point(&source, Path::new(&mount.mount_path))?;
            command.arg(if mount.read_only == Some(true) {
                "ro"
            } else {
                "rw"
            });
            command.arg(&source).arg(&mount.mount_path);
        }
        command.arg("--");
        if uid != 0 {
            command.args([
                "setpriv",
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
                "--",
            ]);
        }
        command.arg(&binary).args(&argv);
        let log = self.dir.join(format!("{}.log", spec.name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| log.display().to_string())?;
        command
            // Never this process's own directory: the script moves to the
            // container's once its volumes are mounted.
            .current_dir("/")
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(self.process_group)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting container {}", spec.name))?;
        tracing::info!(pod = %key(&pod), container = %spec.name, program = %program.path.display(), "started");
        let run = self.run_mut(which, i);
        run.program = Some(program);
        run.child = Some(child);
        run.started_at = Some(Timestamp::now());
        run.waiting = None;
        Ok(())
    }

    /// The container's environment as a kubelet builds it: the Service
    /// variables clients find the API server with, then the container's
    /// `envFrom` and `env` in order.
    fn environment(&self, spec: &Container) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            (
                "HOSTNAME".into(),
                self.pod.metadata.name.clone().unwrap_or_default(),
            ),
            (
                "KUBERNETES_SERVICE_HOST".into(),
                KUBERNETES_SERVICE_IP.to_string(),
            ),
            ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), "443".into()),
        ];
        let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        };
        if spec.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            bail!(
                "container {}: envFrom is not supported by the local node agent",
                spec.name
            );
        }
        for var in spec.env.iter().flatten() {
            let value = self.env_value(var, &env)?;
            set(&mut env, var.name.clone(), value);
        }
        Ok(env)
    }

    fn env_value(&self, var: &EnvVar, env: &[(String, String)]) -> anyhow::Result<String> {
        if let Some(value) = &var.value {
            return Ok(expand(value, env));
        }
        let Some(from) = &var.value_from else {
            return Ok(String::new());
        };
        if let Some(field) = &from.field_ref {
            return self.field(&field.field_path);
        }
        if let Some(resource) = &from.resource_field_ref {
            // The node's capacity, as a kubelet says when no limit is set.
            return Ok(match resource.resource.as_str() {
                "limits.cpu" | "requests.cpu" => "2".into(),
                _ => (8u64 << 30).to_string(),
            });
        }
        bail!(
            "env {}: only value, fieldRef and resourceFieldRef are supported by the local node agent",
            var.name
        )
    }

    /// A downward-API field.
    fn field(&self, path: &str) -> anyhow::Result<String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        let map_entry = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
            let key = path
                .strip_prefix(prefix)
                .and_then(|k| k.strip_suffix("']"))
                .unwrap_or_default();
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default()
        };
        Ok(match path {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.nodeName" => self.node.name.clone(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.podIP" | "status.podIPs" => self.ip.to_string(),
            "status.hostIP" | "status.hostIPs" => NODE_IP.to_string(),
            "metadata.labels" => format_map(&meta.labels),
            "metadata.annotations" => format_map(&meta.annotations),
            p if p.starts_with("metadata.labels['") => map_entry(&meta.labels, "metadata.labels['"),
            p if p.starts_with("metadata.annotations['") => {
                map_entry(&meta.annotations, "metadata.annotations['")
            }
            other => bail!("field {other} is not one the local node agent knows"),
        })
    }

    /// Writes every volume's files under the pod's directory. A ConfigMap
    /// or Secret not there yet fails the round (the pod waits in
    /// ContainerCreating, as with a kubelet), unless it is optional.
    async fn prepare_volumes(&mut self) -> anyhow::Result<()> {
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for volume in volumes {
            let dir = self.dir.join("volumes").join(&volume.name);
            std::fs::create_dir_all(&dir)?;
            self.fill(&volume, &dir)
                .await
                .with_context(|| format!("volume {}", volume.name))?;
            self.volumes.insert(volume.name.clone(), dir);
        }
        Ok(())
    }

    /// Downward-API files: each a field of the pod.
    fn write_fields(&self, items: &[DownwardAPIVolumeFile], dir: &Path) -> anyhow::Result<()> {
        for item in items {
            if let Some(field) = &item.field_ref {
                write_file(
                    &dir.join(&item.path),
                    self.field(&field.field_path)?.as_bytes(),
                )?;
            }
        }
        Ok(())
    }

    async fn fill(&self, volume: &Volume, dir: &Path) -> anyhow::Result<()> {
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let client = &self.node.client;
        if volume.empty_dir.is_some() {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            return Ok(());
        }
        if let Some(source) = &volume.config_map {
            let keys = Keys::of(&source.name, source.optional, &source.items);
            return write_keys(client, &namespace, Kind::ConfigMap, keys, dir).await;
        }
        if let Some(source) = &volume.secret {
            let name = source.secret_name.clone().unwrap_or_default();
            let keys = Keys::of(&name, source.optional, &source.items);
            return write_keys(client, &namespace, Kind::Secret, keys, dir).await;
        }
        if let Some(downward) = &volume.downward_api {
            return self.write_fields(downward.items.as_deref().unwrap_or_default(), dir);
        }
        if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let token_text = self
                        .token(token.audience.clone(), token.expiration_seconds)
                        .await?;
                    write_file(&dir.join(&token.path), token_text.as_bytes())?;
                }
                if let Some(cm) = &source.config_map {
                    let keys = Keys::of(&cm.name, cm.optional, &cm.items);
                    write_keys(client, &namespace, Kind::ConfigMap, keys, dir).await?;
                }
                if let Some(secret) = &source.secret {
                    let keys = Keys::of(&secret.name, secret.optional, &secret.items);
                    write_keys(client, &namespace, Kind::Secret, keys, dir).await?;
                }
                if let Some(downward) = &source.downward_api {
                    self.write_fields(downward.items.as_deref().unwrap_or_default(), dir)?;
                }
            }
            return Ok(());
        }
        bail!(
            "only emptyDir, configMap, secret, downwardAPI and projected volumes are supported by the local node agent"
        )
    }

    /// A token for the pod's ServiceAccount, bound to the pod, as the
    /// kubelet requests for projected volumes.
    async fn token(
        &self,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> anyhow::Result<String> {
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let account = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let accounts: Api<ServiceAccount> = Api::namespaced(self.node.client.clone(), &namespace);
        let request = serde_json::from_value(json!({
            "spec": {
                "audiences": audience.into_iter().filter(|a| !a.is_empty()).collect::<Vec<_>>(),
                "expirationSeconds": expiration.unwrap_or(3607).max(600),
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": self.pod.metadata.name,
                    "uid": self.pod.metadata.uid,
                },
            },
        }))?;
        accounts
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("a token for ServiceAccount {namespace}/{account}"))?
            .status
            .map(|s| s.token)
            .context("the TokenRequest's status")
    }

    /// The container's probes, from the node as a kubelet runs them: the
    /// startup probe first (nothing else until it passes; failing, the
    /// container is restarted), then liveness (failing, restarted) and
    /// readiness (ready once running when there is none).
    async fn probe(&mut self, i: usize) {
        let ip = self.ip;
        let node_ns = self.node.network.node().to_string();
        let run = &mut self.containers[i];
        let running = run.child.is_some() || (run.program.is_none() && run.started_at.is_some());
        if !running {
            run.probe.ready = false;
            return;
        }
        if run.program.is_none() {
            // Nothing runs: nothing to probe.
            run.probe.ready = true;
            return;
        }
        let spec = run.spec.clone();
        let restart = |run: &mut Run, which: &str| {
            tracing::info!(container = %run.spec.name, probe = which, "probe failed: restarting");
            if let Some(child) = run.child.as_mut() {
                let _ = child.start_kill();
            }
        };
        if let Some(startup) = &spec.startup_probe
            && !run.startup.ready
        {
            run.probe.ready = false;
            if let Some(ok) = due(startup, &mut run.startup, &spec, &node_ns, ip).await {
                if ok && run.startup.successes >= 1 {
                    run.startup.ready = true;
                } else if !ok && run.startup.failures >= startup.failure_threshold.unwrap_or(3) {
                    restart(run, "startup");
                }
            }
            return;
        }
        if let Some(liveness) = &spec.liveness_probe
            && due(liveness, &mut run.liveness, &spec, &node_ns, ip).await == Some(false)
            && run.liveness.failures >= liveness.failure_threshold.unwrap_or(3)
        {
            restart(run, "liveness");
            return;
        }
        let Some(readiness) = &spec.readiness_probe else {
            run.probe.ready = true;
            return;
        };
        match due(readiness, &mut run.probe, &spec, &node_ns, ip).await {
            Some(true) if run.probe.successes >= readiness.success_threshold.unwrap_or(1) => {
                run.probe.ready = true;
            }
            Some(false) if run.probe.failures >= readiness.failure_threshold.unwrap_or(3) => {
                run.probe.ready = false;
            }
            _ => {}
        }
    }

    /// SIGTERM to every process, SIGKILL to what is left after `grace`.
    async fn stop(&mut self, grace: Duration) {
        for run in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let Some(pid) = run.child.as_ref().and_then(|c| c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + grace;
        for run in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let Some(child) = run.child.as_mut()
                && tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
            {
                let _ = child.kill().await;
            }
            run.child = None;
        }
    }

    /// The pod's status as a kubelet reports it.
    fn status(&self) -> Value {
        let initialized = self.init.iter().all(|r| r.completed);
        let ready = initialized && self.containers.iter().all(|r| r.probe.ready);
        let started = initialized && self.containers.iter().all(|r| r.started_at.is_some());
        let simulated: Vec<&str> = self
            .init
            .iter()
            .chain(&self.containers)
            .filter(|r| r.started_at.is_some() && r.program.is_none() && r.child.is_none())
            .map(|r| r.image.as_str())
            .collect();
        let since = Time(self.started);
        let condition = |type_: &str, yes: bool| json!({"type": type_, "status": if yes { "True" } else { "False" }, "lastTransitionTime": since});
        let mut conditions = vec![
            condition("PodReadyToStartContainers", self.volumes_ready),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
            condition("PodScheduled", true),
        ];
        if !simulated.is_empty() {
            conditions.push(json!({
                "type": SIMULATED,
                "status": "True",
                "lastTransitionTime": since,
                "reason": "NoLocalProgram",
                "message": format!(
                    "no local program runs image {}: reported running without running",
                    simulated.join(", ")
                ),
            }));
        }
        let finished = !self.containers.is_empty() && self.containers.iter().all(|r| r.completed);
        let phase = if finished {
            let failed = self
                .containers
                .iter()
                .any(|r| r.last_exit.is_some_and(|(code, _, _)| code != 0));
            if failed { "Failed" } else { "Succeeded" }
        } else if started {
            "Running"
        } else {
            "Pending"
        };
        json!({
            "phase": phase,
            "hostIP": NODE_IP.to_string(),
            "hostIPs": [{"ip": NODE_IP.to_string()}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": since,
            "conditions": conditions,
            "initContainerStatuses": self.init.iter().map(|r| container_status(r, false)).collect::<Vec<_>>(),
            "containerStatuses": self.containers.iter().map(|r| container_status(r, r.probe.ready)).collect::<Vec<_>>(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Init,
    App,
}

fn container_status(run: &Run, ready: bool) -> Value {
    let state = if let Some((code, started, finished)) = run.last_exit.filter(|_| run.completed) {
        json!({"terminated": {
            "exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": Time(started),
            "finishedAt": Time(finished),
        }})
    } else if let Some((reason, message)) = &run.waiting {
        json!({"waiting": {"reason": reason, "message": message}})
    } else if let Some(started) = run.started_at {
        json!({"running": {"startedAt": Time(started)}})
    } else {
        json!({"waiting": {"reason": "PodInitializing"}})
    };
    let last_state = match run.last_exit.filter(|_| !run.completed) {
        Some((code, started, finished)) => json!({"terminated": {
            "exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": Time(started),
            "finishedAt": Time(finished),
        }}),
        None => json!({}),
    };
    json!({
        "name": run.spec.name,
        "image": run.image,
        "imageID": run.program.as_ref().map(|p| format!("local://{}", p.path.display())).unwrap_or_default(),
        "ready": ready,
        "started": run.child.is_some() || (run.started_at.is_some() && run.program.is_none() && !run.completed),
        "restartCount": run.restarts,
        "state": state,
        "lastState": last_state,
    })
}

/// Runs `probe` when it is due (after its initial delay, then every
/// period), counting successes and failures in a row; `None` when it was not
/// due.
async fn due(
    probe: &Probe,
    state: &mut ProbeState,
    container: &Container,
    ns: &str,
    ip: Ipv4Addr,
) -> Option<bool> {
    let now = Instant::now();
    let next = *state.next.get_or_insert_with(|| {
        now + Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64)
    });
    if now < next {
        return None;
    }
    state.next = Some(now + Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64));
    let ok = check(probe, container, ns, ip).await;
    if ok {
        state.successes += 1;
        state.failures = 0;
    } else {
        state.failures += 1;
        state.successes = 0;
    }
    Some(ok)
}

/// An httpGet (HTTP only), tcpSocket or absent check of `probe` against
/// the pod at `ip`, from namespace `ns`.
async fn check(probe: &Probe, container: &Container, ns: &str, ip: Ipv4Addr) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let port = |port: &IntOrString| -> Option<u16> {
        match port {
            IntOrString::Int(p) => u16::try_from(*p).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    };
    let attempt = async {
        if let Some(get) = &probe.http_get {
            let port = port(&get.port).context("the probe's port")?;
            let stream = connect_in(ns, SocketAddr::from((ip, port))).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let request = http::Request::get(get.path.as_deref().unwrap_or("/"))
                .header("host", format!("{ip}:{port}"))
                .header("user-agent", "kube-probe/1.33")
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            let code = response.status().as_u16();
            anyhow::ensure!((200..400).contains(&code), "status {code}");
            return Ok(());
        }
        if let Some(tcp) = &probe.tcp_socket {
            let port = port(&tcp.port).context("the probe's port")?;
            connect_in(ns, SocketAddr::from((ip, port))).await?;
            return Ok(());
        }
        // An exec or gRPC probe: no container filesystem to run a command
        // in here. Not checked — said so in the agent's log.
        tracing::warn!(container = %container.name, "exec and grpc probes are not run by the local node agent; taken as passing");
        Ok(())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(())))
}

/// Kubernetes' `$(VAR)` references in args and env values; `$$` escapes.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(name_end) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=name_end];
            match env.iter().rev().find(|(n, _)| n == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&rest[at..at + name_end + 3]),
            }
            rest = &after[name_end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn format_map(map: &Option<BTreeMap<String, String>>) -> String {
    map.iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}\n", serde_json::to_string(v).unwrap_or_default()))
        .collect()
}

fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data).with_context(|| path.display().to_string())?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    Ok(())
}

/// Where a mount goes must exist on this machine for `mount --bind`: an
/// empty directory (or file) is made when missing, and left — it is only
/// ever a mount point, never written through.
fn mount_point(source: &Path, target: &Path) -> anyhow::Result<()> {
    if target.exists() {
        return Ok(());
    }
    if source.is_dir() {
        std::fs::create_dir_all(target).with_context(|| target.display().to_string())?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, b"").with_context(|| target.display().to_string())?;
    }
    Ok(())
}

/// What a volume, or a projection into one, takes from a ConfigMap or a
/// Secret: which, whether it may be missing, and the keys by path (every key
/// when none are named).
struct Keys {
    name: String,
    optional: bool,
    items: Vec<(String, String)>,
}

impl Keys {
    fn of(name: &str, optional: Option<bool>, items: &Option<Vec<KeyToPath>>) -> Self {
        Self {
            name: name.to_string(),
            optional: optional == Some(true),
            items: items
                .iter()
                .flatten()
                .map(|i| (i.key.clone(), i.path.clone()))
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    ConfigMap,
    Secret,
}

/// The keys of a ConfigMap or Secret as files under `dir`. One not there
/// yet fails (the pod waits in ContainerCreating), unless it is optional.
async fn write_keys(
    client: &Client,
    namespace: &str,
    kind: Kind,
    keys: Keys,
    dir: &Path,
) -> anyhow::Result<()> {
    let data: Option<BTreeMap<String, Vec<u8>>> = match kind {
        Kind::ConfigMap => {
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            maps.get_opt(&keys.name).await?.map(|map| {
                let text = map
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()));
                let binary = map
                    .binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0));
                text.chain(binary).collect()
            })
        }
        Kind::Secret => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            secrets.get_opt(&keys.name).await?.map(|secret| {
                secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            })
        }
    };
    match data {
        Some(data) => write_items(data, keys.items, dir),
        None if keys.optional => Ok(()),
        None => bail!("{kind:?} {:?} not found", keys.name),
    }
}

/// Every key as a file, or only `items` (key → path) when given.
fn write_items(
    data: BTreeMap<String, Vec<u8>>,
    items: Vec<(String, String)>,
    dir: &Path,
) -> anyhow::Result<()> {
    if items.is_empty() {
        for (key, value) in data {
            write_file(&dir.join(key), &value)?;
        }
        return Ok(());
    }
    for (key, path) in items {
        let value = data.get(&key).with_context(|| format!("no key {key}"))?;
        write_file(&dir.join(path), value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_from_earlier_variables() {
        let env = vec![("POD".to_string(), "echo-1".to_string())];
        assert_eq!(expand("--id=$(POD).x", &env), "--id=echo-1.x");
        assert_eq!(expand("$(MISSING)", &env), "$(MISSING)");
        assert_eq!(expand("$$(POD) costs $5", &env), "$(POD) costs $5");
    }
}
