//! `bowline-proxy init` writing its capture rules with the real iptables,
//! in a network namespace the test makes and removes: `--dry-run` prints
//! them and writes nothing, running twice leaves one set, and `--cleanup`
//! removes them (twice harmlessly).

use std::process::Command;

use anyhow::{Context, ensure};

/// The injector's flags for a pod without annotations.
const FLAGS: [&str; 16] = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// A network namespace of this test's own, removed when dropped.
struct Namespace(String);

impl Namespace {
    fn new() -> anyhow::Result<Self> {
        let name = format!("bowline-init-{}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status()?;
        ensure!(
            status.success(),
            "ip netns add {name} (needs root and iproute2)"
        );
        Ok(Self(name))
    }

    /// Runs `command` inside; its standard output.
    fn run(&self, command: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(command)
            .output()
            .with_context(|| format!("running {command:?}"))?;
        ensure!(
            output.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    fn nat(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .run(&["iptables-save", "-t", "nat"])?
            .lines()
            .filter(|l| l.starts_with("-A ") || l.starts_with(':'))
            .map(str::to_string)
            .collect())
    }

    fn init(&self, extra: &[&str]) -> anyhow::Result<String> {
        let mut command = vec![env!("CARGO_BIN_EXE_bowline-proxy"), "init"];
        command.extend(FLAGS);
        command.extend(extra);
        self.run(&command)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn init_writes_istios_rules_once_and_cleanup_removes_them() -> anyhow::Result<()> {
    let namespace = Namespace::new()?;
    let ours = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains("ISTIO_"))
            .cloned()
            .collect()
    };

    let printed = namespace.init(&["--dry-run"])?;
    ensure!(
        printed.starts_with("*nat\n") && printed.ends_with("COMMIT\n"),
        "{printed}"
    );
    ensure!(
        ours(&namespace.nat()?).is_empty(),
        "--dry-run writes nothing"
    );
    let wanted: Vec<&str> = printed.lines().filter(|l| l.starts_with("-A ")).collect();

    namespace.init(&[])?;
    let first = ours(&namespace.nat()?);
    for rule in &wanted {
        ensure!(
            first.iter().filter(|l| l == rule).count() == 1,
            "{rule} once, in:\n{}",
            first.join("\n")
        );
    }
    namespace.init(&[])?;
    ensure!(
        ours(&namespace.nat()?) == first,
        "a second run changes nothing"
    );

    namespace.init(&["--cleanup"])?;
    ensure!(ours(&namespace.nat()?).is_empty(), "{:?}", namespace.nat()?);
    namespace.init(&["--cleanup"])?;
    Ok(())
}
