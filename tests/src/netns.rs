//! Test hosts in network namespaces: one bridge, one veth per host, addresses from the
//! benchmarking range 198.18.0.0/15 (never any other). The bridge itself has an address, so
//! the test process can reach every host. A host's link can be cut and healed; everything
//! (processes, namespaces, links, firewall rules) is removed on drop, also when a test fails.
//! Needs root, as CI runs.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TestNet {
    bridge: String,
    subnet: u32,
    hosts: Vec<String>,
    veths: Vec<String>,
    rules: Vec<Vec<String>>,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) {
    if let Err(e) = run(program, args) {
        panic!("{e} (the multi-host tests need root and iproute2)");
    }
}

/// Namespaces a killed test process left behind (their owner pid is gone).
fn remove_orphans() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("simmim-") else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if owner.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{owner}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

impl TestNet {
    /// `count` hosts on one bridge: host `i` has address `198.18.<subnet>.<i+1>`.
    pub fn new(count: usize) -> Self {
        remove_orphans();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // One /24 per net inside 198.18.0.0/15, distinct per process and net.
        let subnet = 10 + (pid * 7 + n) % 240;
        let bridge = format!("smb{}{n}", pid % 100_000);
        let mut net = Self {
            bridge: bridge.clone(),
            subnet,
            hosts: Vec::new(),
            veths: Vec::new(),
            rules: Vec::new(),
        };
        must("ip", &["link", "add", &bridge, "type", "bridge"]);
        must(
            "ip",
            &[
                "addr",
                "add",
                &format!("198.18.{subnet}.254/24"),
                "dev",
                &bridge,
            ],
        );
        must("ip", &["link", "set", &bridge, "up"]);
        // Docker's FORWARD policy may drop bridged traffic.
        for dir in ["-i", "-o"] {
            let rule: Vec<String> = ["FORWARD", dir, &bridge, "-j", "ACCEPT"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let mut insert = vec!["-I".to_string()];
            insert.extend(rule.iter().cloned());
            let args: Vec<&str> = insert.iter().map(String::as_str).collect();
            if run("iptables", &args).is_ok() {
                net.rules.push(rule);
            }
        }
        for i in 0..count {
            let ns = format!("simmim-{pid}-{n}-h{i}");
            let veth = format!("{bridge}h{i}");
            must("ip", &["netns", "add", &ns]);
            net.hosts.push(ns.clone());
            must(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            net.veths.push(veth.clone());
            must("ip", &["link", "set", &veth, "master", &bridge, "up"]);
            must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            must("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            let addr = format!("{}/24", net.address(i));
            must("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        }
        net
    }

    pub fn address(&self, host: usize) -> String {
        format!("198.18.{}.{}", self.subnet, host + 1)
    }

    /// `program` run on `host`.
    pub fn command(&self, host: usize, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.hosts[host]])
            .arg(program);
        command
    }

    /// Cuts `host`'s link: nothing reaches it or leaves it until [`TestNet::heal`].
    pub fn cut(&self, host: usize) {
        must("ip", &["link", "set", &self.veths[host], "down"]);
    }

    pub fn heal(&self, host: usize) {
        must("ip", &["link", "set", &self.veths[host], "up"]);
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in &self.hosts {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = run("kill", &["-9", pid]);
                }
            }
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        for rule in &self.rules {
            let mut args = vec!["-D"];
            args.extend(rule.iter().map(String::as_str));
            let _ = run("iptables", &args);
        }
    }
}
