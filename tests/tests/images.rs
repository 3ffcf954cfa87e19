//! The component images' Dockerfiles (operator/, controlplane/, proxy/),
//! read as a builder reads them — no container engine runs here — and held
//! to what runs them: each builds its crate with `cargo build --release
//! --locked` in a separate stage (the proxy's with its profile, `make
//! proxy-pgo`), starts the binary that crate makes, runs as
//! the non-root UID the operator's Deployments (and the chart's) run it as,
//! exposes every port they declare, and carries the OCI labels.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, bail, ensure};
use bowline_tests::manifests::{chart, read, repo};
use dockerfile_parser::{Dockerfile, Instruction};
use serde_json::Value;

/// What the final stage of a component's Dockerfile says.
#[derive(Debug)]
struct Image {
    entrypoint: Vec<String>,
    user: i64,
    exposed: BTreeSet<i64>,
    labels: Vec<(String, String)>,
    version_arg: Option<String>,
}

/// Reads `<component>/Dockerfile` and checks how it builds.
fn image(component: &str) -> anyhow::Result<Image> {
    let path = repo().join(component).join("Dockerfile");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dockerfile = Dockerfile::parse(&text).with_context(|| path.display().to_string())?;
    let stages = dockerfile.stages();
    let stages: Vec<_> = stages.iter().collect();
    ensure!(
        stages.len() >= 2,
        "{component}: a build stage and a runtime stage"
    );
    // The proxy's release build is the profile-guided one, which builds
    // it with `cargo build --locked --release -p bowline-proxy` twice.
    let build = match component {
        "proxy" => "make proxy-pgo".to_string(),
        _ => format!("cargo build --release --locked -p bowline-{component}"),
    };
    let builds = stages[..stages.len() - 1].iter().any(|stage| {
        stage.instructions.iter().any(|i| match i {
            Instruction::Run(run) => run
                .as_shell()
                .is_some_and(|shell| shell.to_string().contains(&build)),
            _ => false,
        })
    });
    ensure!(builds, "{component}: a build stage runs `{build}`");
    if component == "proxy" {
        let makefile = std::fs::read_to_string(repo().join("Makefile"))?;
        let recipe: String = makefile
            .split("\nproxy-pgo:")
            .nth(1)
            .context("the Makefile's proxy-pgo target")?
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with('\t'))
            .collect();
        ensure!(
            recipe.contains("-Cprofile-use=") && recipe.contains("-p bowline-proxy"),
            "proxy-pgo builds bowline-proxy with its profile: {recipe}"
        );
    }

    let last = stages.last().context("a stage")?;
    let mut image = Image {
        entrypoint: Vec::new(),
        user: -1,
        exposed: BTreeSet::new(),
        labels: Vec::new(),
        version_arg: None,
    };
    for instruction in &last.instructions {
        match instruction {
            Instruction::Entrypoint(entrypoint) => {
                image.entrypoint = entrypoint
                    .as_exec()
                    .context("ENTRYPOINT in exec form: signals reach the binary, not a shell")?
                    .as_str_vec()
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            }
            Instruction::Label(label) => {
                for l in &label.labels {
                    image
                        .labels
                        .push((l.name.content.clone(), l.value.content.clone()));
                }
            }
            Instruction::Arg(arg) if arg.name.content == "VERSION" => {
                image.version_arg = arg.value.as_ref().map(|v| v.content.clone());
            }
            Instruction::Misc(misc) => {
                let arguments = misc.arguments.to_string();
                match misc.instruction.content.to_uppercase().as_str() {
                    "USER" => {
                        let uid = arguments.trim().split(':').next().unwrap_or_default();
                        image.user = uid.parse().with_context(|| {
                            format!("{component}: USER {arguments} is not numeric (runAsNonRoot cannot check a name)")
                        })?;
                    }
                    "EXPOSE" => {
                        for port in arguments.split_whitespace() {
                            image.exposed.insert(port.trim_end_matches("/tcp").parse()?);
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(image)
}

/// The binaries each workspace package builds, from `cargo metadata`.
fn binaries(package: &str) -> anyhow::Result<Vec<String>> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(repo())
        .output()?;
    ensure!(output.status.success(), "cargo metadata failed");
    let metadata: Value = serde_json::from_slice(&output.stdout)?;
    let package = metadata["packages"]
        .as_array()
        .context("packages")?
        .iter()
        .find(|p| p["name"] == package)
        .with_context(|| format!("no package {package}"))?;
    Ok(package["targets"]
        .as_array()
        .context("targets")?
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.contains(&"bin".into()))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect())
}

/// The UID a container runs as: its own securityContext, else its pod's.
fn run_as_user(pod: &Value, container: &Value) -> Option<i64> {
    container["securityContext"]["runAsUser"]
        .as_i64()
        .or_else(|| pod["securityContext"]["runAsUser"].as_i64())
}

fn container_ports(container: &Value) -> BTreeSet<i64> {
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect()
}

#[test]
fn each_image_builds_and_starts_its_crates_binary() -> anyhow::Result<()> {
    for component in ["operator", "controlplane", "proxy"] {
        let image = image(component)?;
        let binary = format!("bowline-{component}");
        ensure!(
            binaries(&binary)?.contains(&binary),
            "the {binary} package builds a {binary} binary"
        );
        ensure!(
            image.entrypoint == [format!("/usr/local/bin/{binary}")],
            "{component}: ENTRYPOINT {:?}",
            image.entrypoint
        );
        ensure!(image.user > 0, "{component}: runs as a non-root UID");
        for label in ["title", "description", "source", "licenses", "version"] {
            let key = format!("org.opencontainers.image.{label}");
            ensure!(
                image.labels.iter().any(|(k, v)| *k == key && !v.is_empty()),
                "{component}: LABEL {key}"
            );
        }
        ensure!(
            image.version_arg.as_deref() == Some(env!("CARGO_PKG_VERSION")),
            "{component}: ARG VERSION defaults to the workspace's version {}",
            env!("CARGO_PKG_VERSION")
        );
    }
    Ok(())
}

/// Every Deployment the operator renders for the demo profile (control
/// plane, gateways, addons) that runs a Bowline image: the image's USER and
/// EXPOSE match the container.
#[test]
fn the_operators_deployments_match_the_images() -> anyhow::Result<()> {
    let installation = read(&repo().join("config/samples/demo.yaml"))?
        .pop()
        .context("config/samples/demo.yaml is empty")?;
    let objects = bowline_tests::operator::render(installation)?;
    let hub = bowline_operator::release::default_hub();
    let mut seen = BTreeSet::new();
    for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let pod = &deployment["spec"]["template"]["spec"];
        for container in pod["containers"].as_array().into_iter().flatten() {
            let reference = container["image"].as_str().unwrap_or_default();
            let Some(component) = reference
                .strip_prefix(&format!("{hub}/"))
                .and_then(|rest| rest.split(':').next())
            else {
                continue;
            };
            let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
            let image = image(component)
                .with_context(|| format!("{name} runs {reference}: no {component}/Dockerfile"))?;
            ensure!(
                run_as_user(pod, container) == Some(image.user),
                "{name}: runs {reference} as {:?}, its image as USER {}",
                run_as_user(pod, container),
                image.user
            );
            let missing: Vec<_> = container_ports(container)
                .difference(&image.exposed)
                .copied()
                .collect();
            ensure!(
                missing.is_empty(),
                "{name}: ports {missing:?} are not in {component}/Dockerfile's EXPOSE"
            );
            seen.insert(component.to_string());
        }
    }
    ensure!(
        seen == BTreeSet::from(["controlplane".to_string(), "proxy".to_string()]),
        "the demo runs the control plane and gateways: {seen:?}"
    );
    Ok(())
}

/// The chart's Deployment runs the operator image: its repository is the
/// hub's `operator`, it requires a non-root user, and its ports are exposed.
#[test]
fn the_charts_deployment_matches_the_operator_image() -> anyhow::Result<()> {
    let objects = chart("bowline", "bowline-system")?;
    let Some(deployment) = objects.iter().find(|o| o["kind"] == "Deployment") else {
        bail!("the chart renders no Deployment");
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let image = image("operator")?;
    let reference = container["image"].as_str().unwrap_or_default();
    let hub = bowline_operator::release::default_hub();
    ensure!(
        reference.starts_with(&format!("{hub}/operator:")),
        "the chart runs {reference}"
    );
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    if let Some(uid) = run_as_user(pod, container) {
        ensure!(uid == image.user, "the chart runs the operator as {uid}");
    }
    let missing: Vec<_> = container_ports(container)
        .difference(&image.exposed)
        .copied()
        .collect();
    ensure!(missing.is_empty(), "ports {missing:?} are not exposed");
    Ok(())
}
