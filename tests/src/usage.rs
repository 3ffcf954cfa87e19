//! What a process uses, read from /proc: resident memory and CPU time —
//! of the process alone, or with its descendants (nginx's workers).

use std::time::Duration;

use anyhow::Context;
use procfs::process::Process;

/// Resident memory and CPU time at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub rss_mb: f64,
    /// The most resident memory so far (VmHWM).
    pub peak_rss_mb: f64,
    /// User and system time since the process started.
    pub cpu: Duration,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        Usage {
            rss_mb: self.rss_mb + other.rss_mb,
            peak_rss_mb: self.peak_rss_mb + other.peak_rss_mb,
            cpu: self.cpu + other.cpu,
        }
    }
}

/// The process `pid` alone.
pub fn of(pid: u32) -> anyhow::Result<Usage> {
    let process = Process::new(pid as i32).with_context(|| format!("process {pid}"))?;
    let status = process.status()?;
    let stat = process.stat()?;
    let mb = |kb: Option<u64>| kb.unwrap_or(0) as f64 / 1024.0;
    Ok(Usage {
        rss_mb: mb(status.vmrss),
        peak_rss_mb: mb(status.vmhwm),
        cpu: Duration::from_secs_f64(
            (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
        ),
    })
}

/// The process `pid` and its descendants, summed.
pub fn of_tree(pid: u32) -> anyhow::Result<Usage> {
    let mut total = of(pid)?;
    let process = Process::new(pid as i32)?;
    for task in process.tasks()?.flatten() {
        for child in task.children().unwrap_or_default() {
            // A child that has just exited has nothing left to count.
            if let Ok(usage) = of_tree(child) {
                total = total + usage;
            }
        }
    }
    Ok(total)
}
