//! The `bowline-operator` binary's offline subcommands: what GitOps users run
//! to see what would be applied.

use std::process::Command;

fn operator(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_bowline-operator"))
        .args(args)
        .output()
        .expect("bowline-operator runs");
    assert!(
        output.status.success(),
        "bowline-operator {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

fn sample(name: &str) -> String {
    format!("{}/../config/samples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn render_prints_what_the_sample_installs() {
    let yaml = operator(&["render", "-f", &sample("demo.yaml")]);
    let kinds: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "Deployment").count(),
        7,
        "istiod, 2 gateways, 4 addons"
    );
    assert!(yaml.contains("image: ghcr.io/bowline-mesh/controlplane:0.1.0"));
    assert!(yaml.contains("name: istio-egressgateway"));
    assert!(yaml.contains("install.bowline.dev/installation: default"));
    assert!(
        yaml.contains("otlpAddress: jaeger-collector.istio-system.svc.cluster.local:4317"),
        "with the Jaeger addon, proxies send spans to its collector"
    );
}

#[test]
fn render_applies_the_samples_settings() {
    let yaml = operator(&["render", "-f", &sample("default.yaml")]);
    assert!(
        yaml.contains("kind: PodDisruptionBudget"),
        "the sample asks for a PDB"
    );
    assert!(yaml.contains("replicas: 2"));
    assert!(
        yaml.contains("accessLogFile: /dev/stdout"),
        "the mesh config reaches the istio ConfigMap"
    );
}

#[test]
fn render_names_a_revision_based_control_plane_after_its_version() {
    let yaml = operator(&["render", "-f", &sample("revision-based.yaml")]);
    assert!(yaml.contains("name: istiod-default-v0-1-0"), "{yaml}");
    assert!(yaml.contains("istio.io/rev: default-v0-1-0"));
    assert!(
        !yaml.contains("values:\n      - enabled"),
        "only the tag named default answers istio-injection=enabled"
    );
}

#[test]
fn render_refuses_an_unknown_version_by_name() {
    let dir = std::env::temp_dir().join(format!("bowline-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(
        &file,
        "apiVersion: install.bowline.dev/v1alpha1\nkind: MeshInstallation\nmetadata: {name: m}\nspec: {version: v9.0.0}\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bowline-operator"))
        .args(["render", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spec.version: v9.0.0 is not a release"),
        "{stderr}"
    );
}

#[test]
fn crds_and_versions_print_what_is_embedded() {
    let crds = operator(&["crds"]);
    assert!(crds.contains("name: meshinstallations.install.bowline.dev"));
    let versions = operator(&["versions"]);
    assert!(
        versions.lines().any(|l| l.starts_with("v0.1.0\t")),
        "{versions}"
    );
}
