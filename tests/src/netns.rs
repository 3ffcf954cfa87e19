//! Pods as network namespaces, for the data path's tests: a "node"
//! namespace holding a bridge, and per pod a namespace with one veth on
//! it and the pod's address. The addresses exist only inside these
//! namespaces; everything is removed (processes stopped, namespaces
//! deleted) when the [`Network`] drops. Needs root and iproute2.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context, ensure};

/// The bridge's namespace and the pods', removed when dropped.
#[derive(Debug)]
pub struct Network {
    prefix: String,
    node: String,
    pods: Vec<String>,
    children: Vec<Child>,
}

/// Runs `command`; its output, or an error with its standard error.
pub fn run(command: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(command[0])
        .args(&command[1..])
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output)
}

impl Network {
    /// A bridge in a namespace of its own; `tag` (a few letters) names
    /// this test's namespaces, with the process id.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let prefix = format!("bl{tag}{}", std::process::id());
        let node = format!("{prefix}-node");
        run(&["ip", "netns", "add", &node]).context("ip netns add (needs root and iproute2)")?;
        let network = Self {
            prefix,
            node,
            pods: Vec::new(),
            children: Vec::new(),
        };
        run(&[
            "ip",
            "-n",
            &network.node,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ])?;
        run(&["ip", "-n", &network.node, "link", "set", "br0", "up"])?;
        Ok(network)
    }

    /// A pod named `name` with `ip` (in a /24 shared by all pods), whose
    /// `routes` (CIDRs, such as Service ranges) go out of its veth. Returns
    /// its namespace's name.
    pub fn pod(&mut self, name: &str, ip: Ipv4Addr, routes: &[&str]) -> anyhow::Result<String> {
        let pod = format!("{}-{name}", self.prefix);
        run(&["ip", "netns", "add", &pod])?;
        self.pods.push(pod.clone());
        let host_end = format!("v{}", self.pods.len());
        run(&[
            "ip", "-n", &self.node, "link", "add", &host_end, "type", "veth", "peer", "name",
            "eth0", "netns", &pod,
        ])?;
        run(&[
            "ip", "-n", &self.node, "link", "set", &host_end, "master", "br0", "up",
        ])?;
        run(&[
            "ip",
            "-n",
            &pod,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &pod, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &pod, "link", "set", "lo", "up"])?;
        for route in routes {
            run(&["ip", "-n", &pod, "route", "add", route, "dev", "eth0"])?;
        }
        Ok(pod)
    }

    /// The bridge's namespace (for watching the wire).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Starts `command` in namespace `ns` with `env`; stopped when the
    /// network drops (or by [`Network::stop`]).
    pub fn spawn(
        &mut self,
        ns: &str,
        command: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<usize> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(command)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?} in {ns}"))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// Stops a process [`Network::spawn`] started, as SIGTERM does.
    pub fn stop(&mut self, index: usize) {
        let child = &mut self.children[index];
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.pods.iter().chain([&self.node]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `command` in namespace `ns`; its output (failing or not).
pub fn exec(ns: &str, command: &[&str]) -> anyhow::Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(command)
        .output()
        .with_context(|| format!("running {command:?} in {ns}"))
}

/// A TCP listener bound to `address` inside namespace `ns`: made on a
/// thread that enters it (a socket stays in the namespace it was made in),
/// then served by this process like any other.
pub fn listen_in(
    ns: &str,
    address: std::net::SocketAddr,
) -> anyhow::Result<tokio::net::TcpListener> {
    let path = PathBuf::from("/var/run/netns").join(ns);
    let listener = std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<std::net::TcpListener> {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the namespace")?;
                let listener = std::net::TcpListener::bind(address)?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

/// The proxy binary beside this test executable (`cargo test --workspace`
/// builds it), built first when missing.
pub fn proxy_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("the target directory")?;
    let binary = dir.join("bowline-proxy");
    if !binary.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "bowline-proxy", "--bin", "bowline-proxy"])
            .status()?;
        ensure!(status.success(), "building bowline-proxy");
    }
    Ok(binary)
}
