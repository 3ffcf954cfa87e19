//! Child processes that cannot outlive the process that started them.
//!
//! Every process of a local cluster joins one process group whose leader is
//! a tiny watchdog shell. The watchdog blocks reading a pipe whose only
//! writer is us; when we go away by any route — return, panic, SIGKILL — the
//! kernel closes that pipe, the watchdog's `read` returns, and it signals the
//! whole group and removes the cluster's directory. A normal drop does the
//! same work itself, faster, and waits for every child.
//!
//! A parent-death signal (`PR_SET_PDEATHSIG`) would need `unsafe` in
//! `pre_exec`, and it fires when the spawning *thread* exits, which in a
//! multi-threaded test harness is not when the test process exits.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::Error;

/// How long children get to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// The watchdog. First it starts, in a session of its own (so no signal to
/// the group reaches it), a cleaner that waits on the same pipe and removes
/// `$1` once the group has had time to stop. Then it waits for EOF itself,
/// terminates its group, gives it two seconds and kills what is left, itself
/// included. (An asynchronous command's stdin is /dev/null unless redirected
/// from another descriptor, hence fd 3.)
const WATCHDOG: &str = r#"trap '' TERM INT HUP
exec 3<&0
setsid sh -c 'read -r _; sleep 3; rm -rf -- "$1"' bowline-cleanup "$1" <&3 &
read -r _
kill -TERM 0
sleep 2
kill -KILL 0"#;

/// A group of processes torn down together.
#[derive(Debug)]
pub struct ProcessGroup {
    watchdog: Child,
    /// Dropping this closes the pipe the watchdog waits on.
    lifeline: Option<ChildStdin>,
    children: Vec<Named>,
    log_dir: PathBuf,
    /// Removed by the watchdog after everything has stopped.
    owned_dir: PathBuf,
}

#[derive(Debug)]
struct Named {
    name: String,
    child: Child,
}

impl ProcessGroup {
    /// Starts the watchdog. `owned_dir` is removed when the group goes away;
    /// each child's stdout and stderr go to `<log_dir>/<name>.log`.
    pub fn new(owned_dir: &Path, log_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(log_dir).map_err(|e| Error::io(log_dir, e))?;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("bowline-watchdog")
            .arg(owned_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Spawn {
                name: "watchdog".into(),
                source,
            })?;
        let lifeline = watchdog.stdin.take();
        Ok(Self {
            watchdog,
            lifeline,
            children: Vec::new(),
            log_dir: log_dir.to_path_buf(),
            owned_dir: owned_dir.to_path_buf(),
        })
    }

    /// The process group id every child joins.
    pub fn pgid(&self) -> Pid {
        Pid::from_raw(self.watchdog.id() as i32)
    }

    /// Spawns `command` into the group under `name`.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> Result<(), Error> {
        let log_path = self.log_path(name);
        let log = File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
        let log_err = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(self.pgid().as_raw())
            .spawn()
            .map_err(|source| Error::Spawn {
                name: name.into(),
                source,
            })?;
        self.children.push(Named {
            name: name.into(),
            child,
        });
        Ok(())
    }

    /// The process id of child `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|named| named.name == name)
            .map(|named| named.child.id())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// The last lines `name` wrote, for error messages.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails if a child has exited: a component that dies during start-up
    /// should be reported as such, not as a time-out.
    pub fn check_running(&mut self) -> Result<(), Error> {
        for named in &mut self.children {
            if let Ok(Some(status)) = named.child.try_wait() {
                let name = named.name.clone();
                return Err(Error::Exited {
                    log_tail: self.log_tail(&name, 30),
                    name,
                    status: status.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // The watchdog ignores TERM, so this reaches the children only.
        let _ = killpg(self.pgid(), Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        for named in &mut self.children {
            while matches!(named.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = killpg(self.pgid(), Signal::SIGKILL);
        for named in &mut self.children {
            let _ = named.child.wait();
        }
        drop(self.lifeline.take());
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.owned_dir);
    }
}
