//! Which local program runs a container of which image. No image is pulled:
//! an image's repository (its last path segment, whatever the registry and
//! tag) names a binary of this workspace or one built from a pinned Go
//! module, with the user its image runs as.
//!
//! | image (last segment) | runs                                  | user  |
//! |----------------------|---------------------------------------|-------|
//! | `controlplane`       | `bowline-controlplane`                | 1337  |
//! | `proxy`              | `bowline-proxy` (`sidecar`, `gateway`, `init` from the container's args) | 1337 |
//! | `operator`           | `bowline-operator`                    | 65532 |
//! | `sample-echo`        | `sample-echo` (tests/src/bin)         | 1000  |
//! | `sample-grpc`        | `sample-grpc` (tests/src/bin)         | 1000  |
//! | `prometheus`         | Prometheus v3.5.0 from its Go module (tests/prometheus) | 65534 |
//! | `all-in-one`         | Jaeger v1.72.0 from its Go module (tests/jaeger) | 10001 |
//!
//! Any other image (Grafana, Kiali) has no local program: its
//! container is reported running without running, and the pod carries the
//! condition `bowline.dev/Simulated` saying so.

use std::path::PathBuf;

use anyhow::{Context, ensure};

/// A program for an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub path: PathBuf,
    /// The image's `USER`, for containers that do not say.
    pub user: u32,
}

/// Where an image's program comes from.
enum Source {
    /// A binary of this workspace's package.
    Workspace {
        package: &'static str,
        binary: &'static str,
    },
    /// A program built from a pinned Go module by `tests/<script>`.
    GoModule { script: &'static str },
}

const fn workspace(package: &'static str, binary: &'static str) -> Source {
    Source::Workspace { package, binary }
}

/// Image → (program, user).
const TABLE: &[(&str, Source, u32)] = &[
    (
        "controlplane",
        workspace("bowline-controlplane", "bowline-controlplane"),
        1337,
    ),
    ("proxy", workspace("bowline-proxy", "bowline-proxy"), 1337),
    (
        "operator",
        workspace("bowline-operator", "bowline-operator"),
        65532,
    ),
    (
        "sample-echo",
        workspace("bowline-tests", "sample-echo"),
        1000,
    ),
    (
        "sample-grpc",
        workspace("bowline-tests", "sample-grpc"),
        1000,
    ),
    (
        "prometheus",
        Source::GoModule {
            script: "prometheus/build.sh",
        },
        65534,
    ),
    (
        "all-in-one",
        Source::GoModule {
            script: "jaeger/build.sh",
        },
        10001,
    ),
];

/// The image names of the sample apps, for manifests.
pub const SAMPLE_ECHO: &str = "ghcr.io/bowline-mesh/sample-echo:0.1.0";
pub const SAMPLE_GRPC: &str = "ghcr.io/bowline-mesh/sample-grpc:0.1.0";

/// The repository's last segment: `ghcr.io/bowline-mesh/proxy:0.1.0@sha…`
/// → `proxy`.
pub fn short_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last)
}

/// The program for `image`, built first when it is this workspace's and
/// missing; `None` when nothing here runs it.
pub fn program(image: &str) -> anyhow::Result<Option<Program>> {
    let name = short_name(image);
    let Some((_, source, user)) = TABLE.iter().find(|(n, ..)| *n == name) else {
        return Ok(None);
    };
    let path = match source {
        Source::Workspace { package, binary } => workspace_binary(package, binary)?,
        Source::GoModule { script } => crate::binaries::tool(script)?,
    };
    Ok(Some(Program { path, user: *user }))
}

/// A workspace binary from the target directory this executable runs from
/// (a test's `deps/` or a binary's own directory), built when missing.
pub fn workspace_binary(package: &str, binary: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("the executable's directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("the target directory")?;
    }
    let path = dir.join(binary);
    if !path.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "-p", package, "--bin", binary]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().context("cargo build")?;
        ensure!(status.success(), "building {binary}");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_named_by_their_last_segment() {
        assert_eq!(short_name("ghcr.io/bowline-mesh/proxy:0.1.0"), "proxy");
        assert_eq!(short_name("localhost:5000/proxy@sha256:abc"), "proxy");
        assert_eq!(short_name("docker.io/prom/prometheus:v3.5.0"), "prometheus");
        assert_eq!(short_name("controlplane"), "controlplane");
    }
}
