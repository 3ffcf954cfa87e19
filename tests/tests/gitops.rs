//! Bowline driven from Git: a MeshInstallation file applied server-side as
//! Argo CD and Flux apply it. The operator writes only status, so applying
//! the same file again changes nothing and `kubectl diff` is empty; and
//! the kstatus library Flux judges health with reads the installation as
//! InProgress while it waits, Current once Ready, Failed when its spec
//! cannot be installed — and the Argo CD health check in
//! config/gitops (run with Lua 5.1, the Lua Argo CD embeds) says
//! Progressing, Healthy and Degraded at the same moments.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, ensure};
use bowline_api::install::MeshInstallation;
use bowline_tests::binaries::tool;
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::shared;
use kube::Api;
use serde_json::json;

/// The field manager a GitOps tool applies with.
const MANAGER: &str = "argocd-controller";

/// What kstatus makes of the installation as the API server has it now.
async fn kstatus(api: &Api<MeshInstallation>, name: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let object = serde_json::to_vec(&api.get(name).await?)?;
    let mut child = tokio::process::Command::new(tool("kstatus/build.sh")?)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(&object).await?;
    stdin.write_all(b"\n").await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    ensure!(
        output.status.success(),
        "kstatus: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// The Argo CD health check from config/gitops/argocd-application.yaml,
/// run on the installation as the API server has it now.
async fn argocd_health(api: &Api<MeshInstallation>, name: &str) -> anyhow::Result<String> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gitops/argocd-application.yaml"),
    )?)?;
    let script = docs
        .iter()
        .find_map(|d| {
            d["data"]["resource.customizations.health.install.bowline.dev_MeshInstallation"]
                .as_str()
        })
        .context("the health check in argocd-cm")?;
    let object = serde_json::to_value(api.get(name).await?)?;
    let program = format!(
        "obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nprint(hs.status)",
        lua(&object)
    );
    let output = tokio::process::Command::new("lua5.1")
        .arg("-e")
        .arg(&program)
        .output()
        .await
        .context("running lua5.1 (Debian's lua5.1 package; .ci/run installs it)")?;
    ensure!(
        output.status.success(),
        "lua: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// A JSON value as a Lua literal, as Argo CD hands objects to health checks.
fn lua(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn kubectl(args: &[&str], file: &Path) -> anyhow::Result<Output> {
    let cluster = shared()?;
    Ok(cluster.kubectl().args(args).arg("-f").arg(file).output()?)
}

fn apply(file: &Path) -> anyhow::Result<()> {
    let output = kubectl(
        &["apply", "--server-side", "--field-manager", MANAGER],
        file,
    )?;
    ensure!(
        output.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn write(dir: &Path, name: &str, spec: serde_json::Value) -> anyhow::Result<PathBuf> {
    let file = dir.join(format!("{name}.yaml"));
    let object = json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": name},
        "spec": spec,
    });
    std::fs::write(&file, serde_json::to_string_pretty(&object)?)?;
    Ok(file)
}

#[tokio::test]
async fn a_mesh_applied_from_git_stays_in_sync_and_reports_health() -> anyhow::Result<()> {
    let cluster = shared()?;
    let client = cluster.client().await?;
    let api: Api<MeshInstallation> = Api::all(client.clone());
    let repo = tempfile::tempdir()?;
    let name = "gitops";

    // A control plane that cannot be scheduled yet: the installation waits.
    let waiting = write(
        repo.path(),
        name,
        json!({
            "version": "v0.1.0", "profile": "minimal", "namespace": name,
            "components": {"controlPlane": {"nodeSelector": {"bowline.dev/gitops": "ready"}}},
        }),
    )?;
    apply(&waiting)?;
    wait_until(
        "kstatus InProgress while the control plane waits",
        || async {
            Ok(kstatus(&api, name)
                .await
                .is_ok_and(|s| s.starts_with("InProgress")))
        },
    )
    .await?;

    // The file as it will stay in Git: Ready, and kstatus says Current.
    let file = write(
        repo.path(),
        name,
        json!({"version": "v0.1.0", "profile": "minimal", "namespace": name}),
    )?;
    apply(&file)?;
    wait_until(
        "the installation to be Ready and kstatus Current",
        || async {
            Ok(kstatus(&api, name)
                .await
                .is_ok_and(|s| s.starts_with("Current")))
        },
    )
    .await?;

    // Applying the same file again changes nothing, and there is no diff.
    let before = api.get(name).await?.metadata.generation;
    apply(&file)?;
    let diff = kubectl(
        &["diff", "--server-side", "--field-manager", MANAGER],
        &file,
    )?;
    ensure!(
        diff.status.code() == Some(0),
        "kubectl diff after a second apply (exit {:?}):\n{}{}",
        diff.status.code(),
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    ensure!(
        api.get(name).await?.metadata.generation == before,
        "the second apply changed the spec"
    );

    // Only the GitOps tool owns spec; the operator owns status alone.
    let managed = api
        .get(name)
        .await?
        .metadata
        .managed_fields
        .unwrap_or_default();
    for entry in &managed {
        let fields = entry
            .fields_v1
            .as_ref()
            .map(|f| f.0.to_string())
            .unwrap_or_default();
        let owner = entry.manager.as_deref().unwrap_or_default();
        if owner != MANAGER {
            ensure!(
                entry.subresource.as_deref() == Some("status") || !fields.contains("f:spec"),
                "{owner} owns spec fields: {fields}"
            );
        }
    }

    // A spec the operator cannot install: Failed, with the reason.
    let invalid = write(
        repo.path(),
        name,
        json!({"version": "v9.9.9", "profile": "minimal", "namespace": name}),
    )?;
    apply(&invalid)?;
    wait_until("kstatus Failed for an unknown version", || async {
        Ok(kstatus(&api, name)
            .await
            .is_ok_and(|s| s.starts_with("Failed") && s.contains("spec.version")))
    })
    .await?;
    ensure!(argocd_health(&api, name).await? == "Degraded");

    let deleted = kubectl(&["delete", "--wait=false"], &file)?;
    ensure!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    Ok(())
}
