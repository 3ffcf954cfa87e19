//! Where the local cluster's binaries come from.
//!
//! They are built from the Go modules pinned in `tests/k8s` and `tests/kwok`
//! by `tests/k8s/build.sh`, which caches them outside the clone and returns
//! at once when they are up to date. `BOWLINE_K8S_BIN` points at a directory
//! that already holds them and skips the build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::Error;

pub const ENV_K8S_BIN: &str = "BOWLINE_K8S_BIN";

/// The binaries one local cluster runs.
#[derive(Clone, Debug)]
pub struct K8sBinaries {
    dir: PathBuf,
}

impl K8sBinaries {
    pub const NAMES: [&'static str; 6] = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kwok",
    ];

    /// Finds the binaries, building them first if needed (once per process).
    pub fn ensure() -> Result<Self, Error> {
        static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let dir = DIR.get_or_init(|| locate().map_err(|e| e.to_string()));
        let dir = dir.clone().map_err(Error::Binaries)?;
        let bins = Self { dir };
        for name in Self::NAMES {
            let path = bins.path(name);
            if !path.is_file() {
                return Err(Error::Binaries(format!(
                    "{} is missing: run tests/k8s/build.sh, or unset {ENV_K8S_BIN}",
                    path.display()
                )));
            }
        }
        Ok(bins)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn command(&self, name: &str) -> Command {
        Command::new(self.path(name))
    }
}

fn locate() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os(ENV_K8S_BIN) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    tracing::info!(script = %script.display(), "building or locating the local cluster's binaries");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::io(&script, e))?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed with {}",
            script.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(dir))
}

/// A tool the tests run besides the cluster — `helm/build.sh`,
/// `kstatus/build.sh`, `envoy/fetch.sh` under tests/: its script builds or
/// fetches it into the cache (once; it keeps a stamp) and prints its path.
pub fn tool(script: &str) -> Result<PathBuf, Error> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::io(&script, e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !output.status.success() || !path.is_file() {
        return Err(Error::Binaries(format!(
            "{} failed with {} (it prints the tool's path)",
            script.display(),
            output.status
        )));
    }
    Ok(path)
}
