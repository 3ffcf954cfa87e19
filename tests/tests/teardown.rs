//! A local cluster leaves nothing behind: not when it is stopped with Ctrl-C,
//! and not when the process that started it is killed outright.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Starts `bowline-cluster` with one Node and returns it with the cluster's
/// directory, read from the `export KUBECONFIG=<dir>/admin.kubeconfig` line.
/// Its output keeps being read until it exits: a closed pipe would make it
/// fail on its own, and the test would not test the way it is stopped.
fn start_cluster() -> anyhow::Result<(Child, PathBuf)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bowline-cluster"))
        .args(["--nodes", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    while let Ok(line) = received.recv_timeout(Duration::from_secs(600)) {
        if let Some(path) = line.strip_prefix("export KUBECONFIG=") {
            let dir = Path::new(path).parent().context("kubeconfig dir")?;
            return Ok((child, dir.to_path_buf()));
        }
    }
    let status = child.wait()?;
    bail!("bowline-cluster exited ({status}) before printing its kubeconfig")
}

/// Every process on the machine whose command line mentions `dir`: the
/// cluster's components all take their files from it.
fn processes_using(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

/// Checks that the components ran, stops the parent with `signal`, and
/// waits for every process and the directory to be gone.
fn stop_and_check_cleanup(mut child: Child, dir: &Path, signal: Signal) -> anyhow::Result<()> {
    let running = processes_using(dir);
    for component in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ] {
        ensure!(
            running.iter().any(|(_, cmd)| cmd
                .split_whitespace()
                .next()
                .is_some_and(|b| b.ends_with(component))),
            "{component} was running: {running:#?}"
        );
    }

    kill(Pid::from_raw(child.id() as i32), signal)?;
    let status = child.wait()?;
    if signal == Signal::SIGINT {
        ensure!(status.success(), "Ctrl-C is a clean stop, got {status}");
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = processes_using(dir);
        if left.is_empty() && !dir.exists() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "30 s after {signal}, still there: dir exists = {}, processes = {left:#?}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_stops_every_process_and_removes_the_directory() -> anyhow::Result<()> {
    let (child, dir) = start_cluster()?;
    stop_and_check_cleanup(child, &dir, Signal::SIGINT)
}

#[test]
fn killing_the_parent_leaves_no_orphan() -> anyhow::Result<()> {
    let (child, dir) = start_cluster()?;
    stop_and_check_cleanup(child, &dir, Signal::SIGKILL)
}
