//! Debian's Prometheus, scraping loopback targets every second, and its
//! query API read with curl.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::free_port;
use crate::process::ProcessGroup;

/// Where Debian's package puts it.
const BINARY: &str = "/usr/bin/prometheus";

/// One series of a query's answer: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

#[derive(Debug)]
pub struct Prometheus {
    port: u16,
    group: ProcessGroup,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes each `(job, port, path)` on 127.0.0.1 every second.
    pub fn start(targets: &[(&str, u16, &str)]) -> anyhow::Result<Self> {
        if !std::path::Path::new(BINARY).exists() {
            bail!("{BINARY} is missing: apt-get install prometheus (.ci/run does)");
        }
        let dir = tempfile::tempdir()?;
        let jobs: Vec<serde_json::Value> = targets
            .iter()
            .map(|(job, port, path)| {
                serde_json::json!({
                    "job_name": job,
                    "metrics_path": path,
                    "static_configs": [{"targets": [format!("127.0.0.1:{port}")]}],
                })
            })
            .collect();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        });
        let file = dir.path().join("prometheus.yml");
        // JSON is YAML.
        std::fs::write(&file, serde_json::to_vec_pretty(&config)?)?;
        let port = free_port()?;
        let owned: PathBuf = dir.path().join("run");
        let mut group = ProcessGroup::new(&owned, &dir.path().join("logs"))?;
        let mut command = Command::new(BINARY);
        command
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                owned.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        group.spawn("prometheus", command)?;
        let prometheus = Self {
            port,
            group,
            _dir: dir,
        };
        Ok(prometheus)
    }

    /// The instant vector `expr` evaluates to now.
    pub fn query(&mut self, expr: &str) -> anyhow::Result<Vec<Sample>> {
        self.group.check_running()?;
        let output = Command::new("curl")
            .args(["-s", "-m", "5", "--get", "--data-urlencode"])
            .arg(format!("query={expr}"))
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .output()
            .context("running curl")?;
        let answer: serde_json::Value = match serde_json::from_slice(&output.stdout) {
            Ok(answer) => answer,
            // Not listening yet.
            Err(_) => return Ok(Vec::new()),
        };
        if answer["status"] != "success" {
            bail!("Prometheus refused {expr:?}: {answer}");
        }
        let samples = answer["data"]["result"]
            .as_array()
            .context("a result list")?
            .iter()
            .map(|series| {
                let labels = serde_json::from_value(series["metric"].clone()).unwrap_or_default();
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect();
        Ok(samples)
    }

    /// Queries `expr` until `done` holds for its answer, for up to `limit`.
    pub async fn wait_for(
        &mut self,
        expr: &str,
        limit: Duration,
        done: impl Fn(&[Sample]) -> bool,
    ) -> anyhow::Result<Vec<Sample>> {
        let started = Instant::now();
        loop {
            let samples = self.query(expr)?;
            if done(&samples) {
                return Ok(samples);
            }
            if started.elapsed() > limit {
                bail!(
                    "after {limit:?} Prometheus answers {expr:?} with {samples:?}; its log:\n{}",
                    self.group.log_tail("prometheus", 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
