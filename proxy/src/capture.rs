//! Transparent capture: the iptables rules `bowline-proxy init` writes in
//! a pod's network namespace, as istio-iptables writes them in REDIRECT
//! mode, so that the workload's TCP leaves through the proxy's outbound
//! port (15001) and arrives through its inbound port (15006).
//!
//! - `ISTIO_INBOUND` (from PREROUTING): the excluded inbound ports return,
//!   the others (or only the included ones) go to `ISTIO_IN_REDIRECT`.
//! - `ISTIO_OUTPUT` (from OUTPUT): the proxy's own traffic (its UID or
//!   GID) returns — except what it sends to its own pod's address over
//!   loopback, which is inbound — as does traffic to 127.0.0.1, from
//!   127.0.0.6 (the proxy's inbound connections to the application),
//!   to excluded ports and excluded ranges; the rest, or only the
//!   included ranges and ports, goes to `ISTIO_REDIRECT`.
//!
//! Rules are written as `iptables-save` prints them, so what `--dry-run`
//! shows is what lands. They are applied with `iptables-restore --noflush` after the
//! chains of an earlier run are removed, so applying twice leaves one
//! set; [`Capture::cleanup`] removes them.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;

const INBOUND: &str = "ISTIO_INBOUND";
const OUTPUT: &str = "ISTIO_OUTPUT";
const REDIRECT: &str = "ISTIO_REDIRECT";
const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const CHAINS: [&str; 4] = [INBOUND, REDIRECT, IN_REDIRECT, OUTPUT];

/// The source address the proxy's inbound connections to its
/// application come from, which capture leaves alone.
pub const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6";

/// A set of ports or address ranges: every one (`*`), or those listed
/// (none when the list is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope<T> {
    All,
    Only(Vec<T>),
}

/// What to capture, with istio-iptables' flags.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Capture {
    /// The port outbound traffic is redirected to.
    #[arg(short = 'p', long = "proxy-port", default_value_t = 15001)]
    pub outbound_port: u16,
    /// The port inbound traffic is redirected to.
    #[arg(short = 'z', long = "inbound-capture-port", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's UID, whose own traffic is not captured.
    #[arg(short = 'u', long = "proxy-uid", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's GID (its UID when not given).
    #[arg(short = 'g', long = "proxy-gid")]
    pub proxy_gid: Option<u32>,
    /// How inbound traffic is captured; only REDIRECT is supported.
    #[arg(
        short = 'm',
        long = "inbound-interception-mode",
        default_value = "REDIRECT"
    )]
    pub mode: String,
    /// Outbound destinations captured: `*`, or comma-separated CIDRs.
    #[arg(short = 'i', long = "outbound-ip-ranges-include", default_value = "*")]
    pub include_outbound_ranges: String,
    /// Outbound destinations never captured: comma-separated CIDRs.
    #[arg(short = 'x', long = "outbound-ip-ranges-exclude", default_value = "")]
    pub exclude_outbound_ranges: String,
    /// Inbound ports captured: `*`, or comma-separated ports.
    #[arg(short = 'b', long = "inbound-ports", default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured (with `-b '*'`).
    #[arg(short = 'd', long = "inbound-ports-exclude", default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound ports never captured.
    #[arg(short = 'o', long = "outbound-ports-exclude", default_value = "")]
    pub exclude_outbound_ports: String,
    /// Outbound ports captured whatever their destination.
    #[arg(short = 'q', long = "outbound-ports-include", default_value = "")]
    pub include_outbound_ports: String,
}

/// A flag that does not read, named.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct InvalidFlag {
    flag: &'static str,
    message: String,
}

fn invalid(flag: &'static str, message: impl Into<String>) -> InvalidFlag {
    InvalidFlag {
        flag,
        message: message.into(),
    }
}

/// A flag's `*`, or its comma-separated items read by `item` (which says
/// what it wanted when one does not read).
fn scope<T>(
    flag: &'static str,
    text: &str,
    item: impl Fn(&str) -> Option<T>,
    wanted: &str,
) -> Result<Scope<T>, InvalidFlag> {
    if text.trim() == "*" {
        return Ok(Scope::All);
    }
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|i| item(i).ok_or_else(|| invalid(flag, format!("{i:?} is not {wanted}"))))
        .collect::<Result<_, _>>()
        .map(Scope::Only)
}

fn ports(flag: &'static str, text: &str) -> Result<Scope<u16>, InvalidFlag> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    scope(flag, text, port, "a port (1-65535)")
}

fn ranges(flag: &'static str, text: &str) -> Result<Scope<IpNet>, InvalidFlag> {
    let range = |r: &str| {
        let net = r.parse::<IpNet>().ok();
        net.or_else(|| r.parse::<std::net::IpAddr>().ok().map(IpNet::from))
            .map(|net| net.trunc())
    };
    scope(flag, text, range, "a CIDR (10.0.0.0/8) or address")
}

fn only<T: Clone>(scope: Scope<T>) -> Vec<T> {
    match scope {
        Scope::All => Vec::new(),
        Scope::Only(items) => items,
    }
}

impl Capture {
    /// The rules, as `iptables-restore` reads them (the nat table). IPv6
    /// ranges are left to ip6tables, which this does not write.
    pub fn rules(&self) -> Result<String, InvalidFlag> {
        if !self.mode.eq_ignore_ascii_case("REDIRECT") {
            return Err(invalid(
                "-m",
                format!("{:?}: only REDIRECT is supported", self.mode),
            ));
        }
        let include_inbound = ports("-b", &self.include_inbound_ports)?;
        let exclude_inbound = only(ports("-d", &self.exclude_inbound_ports)?);
        let exclude_outbound_ports = only(ports("-o", &self.exclude_outbound_ports)?);
        let include_outbound_ports = only(ports("-q", &self.include_outbound_ports)?);
        let include_ranges = ranges("-i", &self.include_outbound_ranges)?;
        let exclude_ranges = only(ranges("-x", &self.exclude_outbound_ranges)?);
        let v4 = |nets: Vec<IpNet>| -> Vec<IpNet> {
            nets.into_iter()
                .filter(|n| matches!(n, IpNet::V4(_)))
                .collect()
        };
        let (uid, gid) = (self.proxy_uid, self.proxy_gid.unwrap_or(self.proxy_uid));

        let mut out = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        let mut rule = |line: String| {
            out.push_str("-A ");
            out.push_str(&line);
            out.push('\n');
        };
        rule(format!(
            "{REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        rule(format!(
            "{IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        // Inbound.
        match &include_inbound {
            Scope::Only(ports) if ports.is_empty() => {}
            _ => rule(format!("PREROUTING -p tcp -j {INBOUND}")),
        }
        match include_inbound {
            Scope::All => {
                for port in exclude_inbound {
                    rule(format!("{INBOUND} -p tcp -m tcp --dport {port} -j RETURN"));
                }
                rule(format!("{INBOUND} -p tcp -j {IN_REDIRECT}"));
            }
            Scope::Only(ports) => {
                for port in ports {
                    rule(format!(
                        "{INBOUND} -p tcp -m tcp --dport {port} -j {IN_REDIRECT}"
                    ));
                }
            }
        }

        // Outbound.
        rule(format!("OUTPUT -p tcp -j {OUTPUT}"));
        rule(format!(
            "{OUTPUT} -s {INBOUND_PASSTHROUGH_SOURCE}/32 -o lo -j RETURN"
        ));
        for port in &exclude_outbound_ports {
            rule(format!("{OUTPUT} -p tcp -m tcp --dport {port} -j RETURN"));
        }
        for (owner, id) in [("uid", uid), ("gid", gid)] {
            // The proxy calling its own pod's address over loopback is
            // inbound traffic; the application calling itself is not
            // captured; nothing else the proxy sends is.
            rule(format!(
                "{OUTPUT} ! -d 127.0.0.1/32 -o lo -m owner --{owner}-owner {id} -j {IN_REDIRECT}"
            ));
            rule(format!(
                "{OUTPUT} -o lo -m owner ! --{owner}-owner {id} -j RETURN"
            ));
            rule(format!("{OUTPUT} -m owner --{owner}-owner {id} -j RETURN"));
        }
        rule(format!("{OUTPUT} -d 127.0.0.1/32 -j RETURN"));
        for port in &include_outbound_ports {
            rule(format!(
                "{OUTPUT} -p tcp -m tcp --dport {port} -j {REDIRECT}"
            ));
        }
        for net in v4(exclude_ranges) {
            rule(format!("{OUTPUT} -d {net} -j RETURN"));
        }
        match include_ranges {
            Scope::All => rule(format!("{OUTPUT} -j {REDIRECT}")),
            Scope::Only(nets) => {
                for net in v4(nets) {
                    rule(format!("{OUTPUT} -d {net} -j {REDIRECT}"));
                }
            }
        }
        out.push_str("COMMIT\n");
        Ok(out)
    }

    /// Writes the rules in this network namespace, replacing an earlier
    /// run's.
    pub fn apply(&self) -> anyhow::Result<()> {
        let rules = self.rules()?;
        Self::cleanup()?;
        restore(&rules)
    }

    /// Removes the rules (and nothing else): the jumps into the chains,
    /// then the chains. Harmless when there are none.
    pub fn cleanup() -> anyhow::Result<()> {
        let saved = iptables_save()?;
        let mut out = String::from("*nat\n");
        for line in saved.lines() {
            // Each jump into the chains, deleted by its own spec.
            if let Some(spec) = line.strip_prefix("-A ")
                && (spec.starts_with("PREROUTING ") || spec.starts_with("OUTPUT "))
                && CHAINS.iter().any(|c| spec.ends_with(&format!("-j {c}")))
            {
                let _ = writeln!(out, "-D {spec}");
            }
        }
        let present: Vec<&str> = CHAINS
            .into_iter()
            .filter(|c| saved.lines().any(|l| l.starts_with(&format!(":{c} "))))
            .collect();
        for chain in &present {
            let _ = writeln!(out, "-F {chain}");
        }
        for chain in &present {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
        restore(&out)
    }
}

fn iptables_save() -> anyhow::Result<String> {
    let output = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .map_err(|e| anyhow::anyhow!("running iptables-save (is iptables installed?): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "iptables-save -t nat failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

fn restore(rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running iptables-restore (is iptables installed?): {e}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("iptables-restore has no stdin"))?
        .write_all(rules.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "iptables-restore failed: {}\n{rules}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        capture: Capture,
    }

    fn capture(args: &[&str]) -> Capture {
        Args::parse_from(std::iter::once("init").chain(args.iter().copied())).capture
    }

    #[test]
    fn the_injectors_flags_give_istios_rules() {
        let rules = capture(&[
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
        ])
        .rules()
        .unwrap();
        let expected = "\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";
        assert_eq!(rules, expected);
    }

    #[test]
    fn ranges_and_ports_narrow_what_is_captured() {
        let rules = capture(&[
            "-i",
            "10.96.0.0/12, 10.244.0.0/16",
            "-x",
            "10.96.0.1",
            "-b",
            "8080,9090",
            "-o",
            "5432",
            "-q",
            "3306",
        ])
        .rules()
        .unwrap();
        for line in [
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 9090 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A ISTIO_OUTPUT -p tcp -m tcp --dport 3306 -j ISTIO_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN",
            "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.244.0.0/16 -j ISTIO_REDIRECT",
        ] {
            assert!(rules.contains(line), "{line}\n{rules}");
        }
        assert!(!rules.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(!rules.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
        // Excluded ports come before the proxy's own traffic is told apart.
        let exclude = rules.find("--dport 5432 -j RETURN").unwrap();
        assert!(exclude < rules.find("--uid-owner").unwrap());
    }

    #[test]
    fn nothing_inbound_when_no_port_is_included() {
        let rules = capture(&["-b", ""]).rules().unwrap();
        assert!(!rules.contains("PREROUTING"), "{rules}");
        assert!(rules.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT"));
    }

    #[test]
    fn bad_flags_are_named() {
        let error = capture(&["-d", "15090,http"]).rules().unwrap_err();
        assert_eq!(error.to_string(), "-d: \"http\" is not a port (1-65535)");
        let error = capture(&["-x", "10.0.0.0/33"]).rules().unwrap_err();
        assert!(
            error.to_string().starts_with("-x: \"10.0.0.0/33\""),
            "{error}"
        );
        let error = capture(&["-m", "TPROXY"]).rules().unwrap_err();
        assert_eq!(
            error.to_string(),
            "-m: \"TPROXY\": only REDIRECT is supported"
        );
    }
}
