//! A small network lab of Linux network namespaces, made and removed by a test: one
//! namespace per node and a hub namespace with a bridge they all hang off, on
//! `10.77.0.0/24`. The test itself runs its clients inside the hub
//! ([`Lab::run_in_hub`]), so nothing touches the machine's own network, and cuts a node
//! off from its peers with an nftables table inside that node's namespace.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Lab::create`] says which is
//! missing instead of failing, so a test can skip with a clear message.

use std::process::Command;

use anyhow::{bail, Context};

/// The hub's address on the bridge; node `i` (from 1) is `10.77.0.(10 + i)`.
pub const HUB_IP: &str = "10.77.0.1";

pub struct Lab {
    prefix: String,
    hub: String,
    nodes: Vec<String>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("run {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn run_with_input(args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", args.join(" ")))?;
    child.stdin.take().context("no stdin")?.write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// Makes the hub and `n` node namespaces. `Err` says why this machine cannot (not
    /// root, no `ip` or `nft`, namespaces refused by the kernel).
    pub fn create(n: usize) -> anyhow::Result<Lab> {
        for tool in ["ip", "nft"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false)
                || std::path::Path::new("/usr/sbin").join(tool).is_file();
            if !found {
                bail!("`{tool}` is not installed (apt-get install iproute2 nftables)");
            }
        }
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_micros()).unwrap_or(0) % 100_000;
        let prefix = format!("sb{nonce}");
        let mut lab = Lab { hub: format!("{prefix}h"), prefix, nodes: Vec::new() };
        run(&["ip", "netns", "add", &lab.hub]).context("make a network namespace (needs root)")?;
        run(&["ip", "-n", &lab.hub, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &lab.hub, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &lab.hub, "addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"])?;
        run(&["ip", "-n", &lab.hub, "link", "set", "br0", "up"])?;
        for i in 1..=n {
            let ns = format!("{}n{i}", lab.prefix);
            run(&["ip", "netns", "add", &ns])?;
            lab.nodes.push(ns.clone());
            let (inner, outer) = (format!("{}v{i}", lab.prefix), format!("{}p{i}", lab.prefix));
            run(&["ip", "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer, "netns", &lab.hub])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", Self::ip(i)), "dev", &inner])?;
            run(&["ip", "-n", &ns, "link", "set", &inner, "up"])?;
            run(&["ip", "-n", &lab.hub, "link", "set", &outer, "master", "br0"])?;
            run(&["ip", "-n", &lab.hub, "link", "set", &outer, "up"])?;
        }
        Ok(lab)
    }

    /// Node `i`'s address (from 1).
    pub fn ip(i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    /// Node `i`'s namespace (from 1).
    pub fn namespace(&self, i: usize) -> &str {
        &self.nodes[i - 1]
    }

    /// Cuts node `i` off from the other nodes: every UDP packet to or from port `port`
    /// (the nodes' QUIC) is dropped inside its namespace. Clients still reach it over TCP.
    pub fn isolate(&self, i: usize, port: u16) -> anyhow::Result<()> {
        let rules = format!(
            "table inet sbpartition {{\n chain input {{ type filter hook input priority 0; udp dport {port} drop; udp sport {port} drop; }}\n chain output {{ type filter hook output priority 0; udp dport {port} drop; udp sport {port} drop; }}\n}}\n"
        );
        run_with_input(&["ip", "netns", "exec", self.namespace(i), "nft", "-f", "-"], &rules)
    }

    /// Undoes [`Lab::isolate`].
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        run(&["ip", "netns", "exec", self.namespace(i), "nft", "delete", "table", "inet", "sbpartition"])
    }

    /// Runs `work` on a thread inside the hub namespace, on a runtime of its own: every
    /// socket it opens (clients, HTTP) is in the lab.
    pub fn run_in_hub<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.hub);
        let thread = std::thread::spawn(move || -> anyhow::Result<T> {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns(2) on a namespace file this thread opened; it moves only the
            // calling thread (and the threads it starts) into the namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(work())
        });
        thread.join().map_err(|_| anyhow::anyhow!("the lab's thread panicked"))?
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Removing a namespace removes its veth ends; processes still in it keep it
        // alive until they exit (the test kills its nodes first).
        for ns in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
