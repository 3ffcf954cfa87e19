//! The repository's YAML as the tests read it: the documents of a file, and
//! the operator's Helm chart rendered by the real helm.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use serde_json::Value;

use crate::binaries::tool;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The operator's chart.
pub fn chart_dir() -> PathBuf {
    repo().join("config/helm/bowline-operator")
}

/// The Kubernetes version the chart is rendered for (its `kubeVersion`
/// refuses helm's default).
pub const KUBE_VERSION: &str = "1.33.0";

/// The non-empty YAML documents of `text`.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    Ok(serde_saphyr::from_multiple::<Value>(text)?
        .into_iter()
        .filter(|d| !d.is_null())
        .collect())
}

/// The non-empty YAML documents of a file.
pub fn read(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    documents(&text).with_context(|| path.display().to_string())
}

/// The chart rendered with its default values (`helm template`).
pub fn chart(release: &str, namespace: &str) -> anyhow::Result<Vec<Value>> {
    let output = Command::new(tool("helm/build.sh")?)
        .args([
            "template",
            release,
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
        ])
        .arg(chart_dir())
        .output()
        .context("running helm template")?;
    ensure!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8(output.stdout)?)
}
