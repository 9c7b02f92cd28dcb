//! Harness for tests that drive real `switchboard` processes: start one on a data
//! folder, find its listeners, log in, open sockets, and kill it with SIGKILL.
//!
//! The binary is `$SWITCHBOARD_BIN`, or `target/debug/switchboard` of this workspace
//! (`scripts/test` builds it first). Every process started here is killed when its
//! handle drops, and every wait is bounded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use switchboard_gateway::client::{http_json, WsClient};
use tokio::io::{AsyncBufReadExt, BufReader};

pub mod fake_provider;
pub mod netns;

pub const WAIT: Duration = Duration::from_secs(10);

/// Path of the switchboard binary under test.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHBOARD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow!("no workspace root"))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join("switchboard");
    if !path.exists() {
        bail!("{} not found: run `cargo build --bin switchboard` first (scripts/test does) or set SWITCHBOARD_BIN", path.display());
    }
    Ok(path)
}

/// A running `switchboard dev` process.
pub struct Dev {
    child: tokio::process::Child,
    pub public: String,
    pub private: String,
    /// The SMTP listener, when it was started with `--smtp-addr`.
    pub smtp: Option<String>,
    pub data_dir: PathBuf,
    pub logins: HashMap<String, String>,
}

impl Dev {
    /// Starts `switchboard dev` on `data_dir` with listeners on free loopback ports.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Dev> {
        Self::start_with(binary()?, data_dir, &[]).await
    }

    /// Starts with extra command-line arguments for `switchboard dev`.
    pub async fn start_with(binary: PathBuf, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Dev> {
        Self::spawn(binary, "dev", data_dir, extra).await
    }

    /// Starts a production `switchboard node` (no demo data); its only login is the
    /// first-start admin, `admin`, whose password it wrote into the data folder.
    pub async fn start_node(data_dir: &Path) -> anyhow::Result<Dev> {
        Self::spawn(binary()?, "node", data_dir, &[]).await
    }

    async fn spawn(binary: PathBuf, subcommand: &str, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Dev> {
        Self::launch(binary, subcommand, data_dir, "127.0.0.1:0", "127.0.0.1:0", extra)?.ready().await
    }

    /// Spawns `switchboard <subcommand>` on the given listener addresses without waiting
    /// for it: the caller may probe it while it starts, then wait with
    /// [`Starting::ready`] or kill it with [`Starting::kill`].
    pub fn launch(binary: PathBuf, subcommand: &str, data_dir: &Path, public_addr: &str, private_addr: &str, extra: &[&str]) -> anyhow::Result<Starting> {
        Self::launch_in(None, binary, subcommand, data_dir, public_addr, private_addr, extra)
    }

    /// [`Dev::launch`] inside a network namespace (`ip netns exec`), when one is given.
    pub fn launch_in(
        netns: Option<&str>,
        binary: PathBuf,
        subcommand: &str,
        data_dir: &Path,
        public_addr: &str,
        private_addr: &str,
        extra: &[&str],
    ) -> anyhow::Result<Starting> {
        std::fs::create_dir_all(data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("node.log"))?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => tokio::process::Command::new(binary),
        };
        let mut child = command
            .args([subcommand, "--public-addr", public_addr, "--private-addr", private_addr, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn,fjall=warn,lsm_tree=warn,quinn=warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn switchboard {subcommand}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        Ok(Starting { child, lines: BufReader::new(stdout).lines(), subcommand: subcommand.to_owned(), data_dir: data_dir.to_path_buf() })
    }

    /// The process id of the running node.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().ok_or_else(|| anyhow!("the node has exited"))
    }

    /// The node's resident set size (VmRSS of `/proc/<pid>/status`), in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(self.pid()?)
    }

    /// Runs `work` while sampling the node's RSS every 50 ms; returns its output and the
    /// highest RSS seen (sampled once more when it ends).
    pub async fn peak_rss_during<T>(&self, work: impl std::future::Future<Output = T>) -> anyhow::Result<(T, u64)> {
        let mut peak = self.rss_bytes()?;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => {
                    peak = peak.max(self.rss_bytes()?);
                    return Ok((out, peak));
                }
                _ = tick.tick() => peak = peak.max(self.rss_bytes()?),
            }
        }
    }

    /// Sends the process a signal with `kill` (`-STOP` freezes it, `-CONT` wakes it).
    pub async fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid()?.to_string();
        anyhow::ensure!(tokio::process::Command::new("kill").args([sig, &pid]).status().await?.success(), "kill {sig} {pid}");
        Ok(())
    }

    /// SIGKILL, as a power cut would: nothing gets to flush or say goodbye.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(WAIT, self.child.wait()).await??;
        Ok(())
    }

    /// SIGTERM, as an operator stopping the service would, and wait (bounded) for the
    /// process to exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.context("the node did not stop within 30 s")??;
        Ok(())
    }

    /// Logs in a demo user and returns the token.
    pub async fn login(&self, login: &str) -> anyhow::Result<String> {
        let password = self.logins.get(login).ok_or_else(|| anyhow!("no demo login {login}"))?;
        // A node that cannot confirm its logins are current (an election under way)
        // answers 503 `unavailable`, which a client sends again.
        let give_up = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) =
                http_json(&self.private, "POST", "/api/login", None, Some(&json!({"login": login, "password": password}))).await?;
            if status == 503 && body["code"] == "unavailable" && tokio::time::Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if status != 200 {
                bail!("login {login}: {status} {body}");
            }
            return body["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("login reply has no token"));
        }
    }

    /// Opens an operator socket and returns it with its `hello` frame.
    pub async fn operator(&self, login: &str) -> anyhow::Result<(WsClient, Value)> {
        let token = self.login(login).await?;
        let mut ws = WsClient::connect(&self.private, &format!("/ws/operator?token={token}"), None).await?;
        let hello = ws.wait_for(WAIT, |v| v["type"] == "hello").await?;
        Ok((ws, hello))
    }

    /// Opens an operator socket resuming after `last_seq`.
    pub async fn operator_resume(&self, login: &str, last_seq: u64) -> anyhow::Result<(WsClient, Value)> {
        let token = self.login(login).await?;
        let mut ws = WsClient::connect(&self.private, &format!("/ws/operator?token={token}&last_seq={last_seq}"), None).await?;
        let hello = ws.wait_for(WAIT, |v| v["type"] == "hello").await?;
        Ok((ws, hello))
    }

    /// Opens a client socket and starts a conversation; returns (socket, conversation, token).
    pub async fn client(&self, name: &str) -> anyhow::Result<(WsClient, u64, String)> {
        let mut ws = WsClient::connect(&self.public, "/ws/client", None).await?;
        ws.send(&json!({"type": "start", "name": name})).await?;
        let started = ws.wait_for(WAIT, |v| v["type"] == "started" || v["type"] == "error").await?;
        if started["type"] == "error" {
            bail!("start refused: {started}");
        }
        let conversation = started["conversation"].as_u64().ok_or_else(|| anyhow!("no conversation id"))?;
        let token = started["token"].as_str().ok_or_else(|| anyhow!("no token"))?.to_owned();
        Ok((ws, conversation, token))
    }

    /// A REST call on the private listener.
    pub async fn api(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        Ok(http_json(&self.private, method, path, token, body.as_ref()).await?)
    }
}

/// Sets an operator's presence and waits for the confirming `ok`.
pub async fn set_presence(ws: &mut WsClient, status: &str) -> anyhow::Result<()> {
    ws.send(&json!({"type": "presence", "status": status, "ref": "presence"})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "presence").await?;
    Ok(())
}

/// Waits for the next event of `kind` on an operator or client socket.
pub async fn next_event(ws: &mut WsClient, kind: &str) -> anyhow::Result<Value> {
    Ok(ws.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == kind).await.with_context(|| format!("waiting for {kind}"))?)
}

/// Runs a `switchboard` command to completion (`cluster …`, `certs …`), with `env`
/// added: its standard output, or an error carrying its standard error if it failed.
pub async fn cli<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>, env: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let mut command = tokio::process::Command::new(binary()?);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().await?;
    if !output.status.success() {
        bail!("switchboard failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(output.stdout)
}

/// A `switchboard` process spawned by [`Dev::launch`] that may not be ready yet.
pub struct Starting {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    subcommand: String,
    data_dir: PathBuf,
}

impl Starting {
    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait (bounded) for the process to be gone.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(WAIT, self.child.wait()).await??;
        Ok(())
    }

    /// Waits (at most 60 s) for the `ready` line and returns the running node.
    pub async fn ready(self) -> anyhow::Result<Dev> {
        let Starting { child, mut lines, subcommand, data_dir } = self;
        let (mut public, mut private, mut smtp) = (None, None, None);
        let ready = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("public listener: http://") {
                    public = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some(rest) = line.strip_prefix("private listener: http://") {
                    private = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some(rest) = line.strip_prefix("smtp listener: smtp://") {
                    smtp = rest.split_whitespace().next().map(str::to_owned);
                }
                if line == "ready" {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        };
        match tokio::time::timeout(Duration::from_secs(60), ready).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Ok(Err(_)) => {
                // The folder may be gone by the time anyone looks: say what it said.
                let log = std::fs::read_to_string(data_dir.join("node.log")).unwrap_or_default();
                // Its last words, without the backtrace frames that follow an error.
                let words = log.lines().filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with("at ") || t.split_once(':').is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit())) || t.starts_with("Stack backtrace"))
                });
                let tail: Vec<&str> = words.collect::<Vec<_>>().into_iter().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
                bail!("switchboard {subcommand} exited before it was ready; the end of its log:\n{}", tail.join("\n"))
            }
            Err(_) => bail!("switchboard {subcommand} not ready within 60 s"),
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // A dev node (or a cluster's first member started with --demo) has the demo
        // logins; a node its first-start admin; another cluster member none of its own.
        let demo = data_dir.join("demo-logins.json");
        let logins = if subcommand == "dev" || demo.exists() {
            serde_json::from_slice(&std::fs::read(&demo)?)?
        } else {
            match std::fs::read_to_string(data_dir.join("admin-password")) {
                Ok(password) => HashMap::from([("admin".to_owned(), password.trim().to_owned())]),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
                Err(e) => return Err(e).context("read the first-start admin password"),
            }
        };
        Ok(Dev {
            child,
            public: public.ok_or_else(|| anyhow!("no public listener printed"))?,
            private: private.ok_or_else(|| anyhow!("no private listener printed"))?,
            smtp,
            data_dir,
            logins,
        })
    }
}

/// Starts `switchboard gateway --config <config>` (its log in `log_dir`) and waits
/// until it is ready.
pub async fn start_gateway(config: &Path, log_dir: &Path) -> anyhow::Result<Dev> {
    std::fs::create_dir_all(log_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join("node.log"))?;
    let mut child = tokio::process::Command::new(binary()?)
        .arg("gateway")
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn switchboard gateway --config {}", config.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    Starting {
        child,
        lines: BufReader::new(stdout).lines(),
        subcommand: "gateway".into(),
        data_dir: log_dir.to_path_buf(),
    }
    .ready()
    .await
}

/// A cluster laid out by `switchboard cluster init` in a folder, each node its own
/// `switchboard node --config` process on loopback ports. Node 1 loads the demo.
/// What a node's `/api/cluster` says it applied: of its one group, or of each group of a
/// split node, by group id.
pub fn applied(status: &Value) -> std::collections::BTreeMap<u64, u64> {
    match status["groups"].as_array() {
        // A conversation shard the node does not hold (ADR 0012) is not its to apply.
        Some(groups) => groups.iter().filter(|g| g["held"] != false).filter_map(|g| Some((g["group"].as_u64()?, g["last_applied"].as_u64().unwrap_or(0)))).collect(),
        None => std::collections::BTreeMap::from([(0, status["last_applied"].as_u64().unwrap_or(0))]),
    }
}

/// Whether the node whose status is `status` applied, in every group, at least what
/// `other`'s did.
pub fn caught_up(status: &Value, other: &Value) -> bool {
    let mine = applied(status);
    applied(other).iter().all(|(group, index)| mine.get(group).is_some_and(|m| m >= index))
}

pub struct Cluster {
    pub dir: PathBuf,
    /// By node id - 1; `None` while a node is down.
    pub nodes: Vec<Option<Dev>>,
    /// The demo logins node 1 made.
    pub logins: HashMap<String, String>,
    starting: Vec<(usize, Starting)>,
    /// Each node's network namespace, in a [`netns::Lab`] cluster.
    namespaces: Vec<Option<String>>,
}

impl Cluster {
    /// Lays out and starts `n` nodes, and waits until every one is ready.
    /// As `cluster init` lays it out by default: split into a metadata group, a routing
    /// shard and four conversation shards (ADR 0006).
    pub async fn start(dir: &Path, n: usize) -> anyhow::Result<Cluster> {
        Self::start_split(dir, n, None).await
    }

    /// [`Cluster::start`] with one group holding everything (`--shards 0`), every node
    /// voting in it.
    pub async fn start_one_group(dir: &Path, n: usize) -> anyhow::Result<Cluster> {
        Self::start_split(dir, n, Some(0)).await
    }

    /// [`Cluster::start`] with the state split into `shards` conversation shards
    /// (`cluster init --shards`, ADR 0006); `None`: `cluster init`'s default; 0: one group.
    pub async fn start_split(dir: &Path, n: usize, shards: Option<u64>) -> anyhow::Result<Cluster> {
        // One node more than asked (room for a node added later, `add_node`), then two
        // gateways (`start_gateway`).
        let base = free_port_block(n + 3)?;
        let gateways = base + 10 * (n as u16 + 1);
        let ports = [
            "--public-port".to_string(),
            base.to_string(),
            "--private-port".into(),
            (base + 1).to_string(),
            "--raft-port".into(),
            (base + 2).to_string(),
            "--gateways".into(),
            "2".into(),
            "--gateway-public-port".into(),
            gateways.to_string(),
            "--gateway-private-port".into(),
            (gateways + 1).to_string(),
        ];
        let mut layout = ports.to_vec();
        if let Some(shards) = shards {
            layout.extend(["--shards".to_string(), shards.to_string()]);
        }
        Self::start_with(dir, n, &layout, vec![None; n]).await
    }

    /// A cluster whose node `i` runs in the lab's namespace `i`, at its address there
    /// (ports 8080, 8081 and 8082 on each: the namespaces do not share them). Call it
    /// from inside [`netns::Lab::run_in_hub`] so the test's sockets reach the nodes.
    pub async fn start_in(lab: &netns::Lab, dir: &Path, n: usize) -> anyhow::Result<Cluster> {
        Self::start_in_with_gateways(lab, dir, n, 0).await
    }

    /// [`Cluster::start_in`] with `gateways` gateway configurations whose listeners are
    /// on the hub's address (ports 8000/8001, then 8010/8011 …): a gateway started with
    /// [`Cluster::start_gateway`] from the hub runs there, beside the test's clients,
    /// and reaches the nodes over the lab's bridge as clients do.
    pub async fn start_in_with_gateways(lab: &netns::Lab, dir: &Path, n: usize, gateways: usize) -> anyhow::Result<Cluster> {
        let mut layout = vec!["--gateways".to_string(), gateways.to_string()];
        for i in 1..=n {
            layout.push("--host".to_string());
            layout.push(netns::Lab::ip(i));
        }
        let mut args: Vec<std::ffi::OsString> = ["cluster", "init", "--nodes", &n.to_string(), "--dir"].iter().map(Into::into).collect();
        args.push(dir.into());
        args.extend(layout.iter().map(Into::into));
        cli(args, &[]).await.context("cluster init")?;
        for g in 0..gateways {
            let path = dir.join(format!("gateway-{}.toml", (b'a' + g as u8) as char));
            let text = std::fs::read_to_string(&path)?;
            let moved: Vec<String> = text
                .lines()
                .map(|line| match line.split_once(" = ") {
                    Some((field @ ("public_addr" | "private_addr"), value)) => {
                        let port = value.trim_matches('"').rsplit(':').next().unwrap_or_default();
                        format!("{field} = \"{}:{port}\"", netns::HUB_IP)
                    }
                    _ => line.to_owned(),
                })
                .collect();
            std::fs::write(&path, moved.join("\n") + "\n")?;
        }
        Self::start_laid_out(dir, n, (1..=n).map(|i| Some(lab.namespace(i).to_string())).collect()).await
    }

    async fn start_with(dir: &Path, n: usize, layout: &[String], namespaces: Vec<Option<String>>) -> anyhow::Result<Cluster> {
        let mut args: Vec<std::ffi::OsString> = ["cluster", "init", "--nodes", &n.to_string(), "--dir"].iter().map(Into::into).collect();
        args.push(dir.into());
        args.extend(layout.iter().map(Into::into));
        cli(args, &[]).await.context("cluster init")?;
        Self::start_laid_out(dir, n, namespaces).await
    }

    /// Starts the `n` nodes `cluster init` laid out in `dir`.
    async fn start_laid_out(dir: &Path, n: usize, namespaces: Vec<Option<String>>) -> anyhow::Result<Cluster> {
        // Launched together: each waits for a quorum before it says ready.
        let starting = (1..=n).map(|id| Self::launch(dir, id, namespaces[id - 1].as_deref())).collect::<anyhow::Result<Vec<_>>>()?;
        let mut nodes = Vec::new();
        for s in starting {
            nodes.push(Some(s.ready().await?));
        }
        let logins = nodes[0].as_ref().map(|d| d.logins.clone()).unwrap_or_default();
        for node in nodes.iter_mut().flatten() {
            node.logins = logins.clone();
        }
        let cluster = Cluster { dir: dir.to_path_buf(), nodes, logins, starting: Vec::new(), namespaces };
        // Every node has applied the demo configuration node 1 committed.
        let first = cluster.status(1).await?;
        for id in 2..=n {
            eventually(WAIT, Duration::from_millis(50), || async { Ok(caught_up(&cluster.status(id).await?, &first).then_some(())) }).await?;
        }
        Ok(cluster)
    }

    fn launch(dir: &Path, id: usize, netns: Option<&str>) -> anyhow::Result<Starting> {
        let config = dir.join(format!("node-{id}.toml"));
        let config = config.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?.to_owned();
        // Stray files are looked for every 5 s (every 10 minutes by default), so that
        // drills see a shard's files leave the node that gave it up; a file is taken
        // only once it is an hour old (the default), which a drill makes so by dating
        // it back.
        let mut extra = vec!["--config", config.as_str(), "--enable-chaos-drills", "--stray-sweep-every-s", "5"];
        if id == 1 {
            extra.push("--demo");
        }
        Dev::launch_in(netns, binary()?, "node", &dir.join("data").join(format!("node-{id}")), "127.0.0.1:0", "127.0.0.1:0", &extra)
    }

    /// Starts the cluster's gateway `g` (0: gateway-a, 1: gateway-b) and waits until it
    /// is ready. Its listeners are the returned `Dev`'s; it knows the demo logins.
    pub async fn start_gateway(&self, g: usize) -> anyhow::Result<Dev> {
        let name = format!("gateway-{}", (b'a' + g as u8) as char);
        let mut gateway = start_gateway(
            &self.dir.join(format!("{name}.toml")),
            &self.dir.join("data").join(&name),
        )
        .await?;
        gateway.logins = self.logins.clone();
        Ok(gateway)
    }

    fn namespace(&self, id: usize) -> Option<&str> {
        self.namespaces.get(id - 1).and_then(|n| n.as_deref())
    }

    /// Node `id` (from 1), which must be running.
    pub fn node(&self, id: usize) -> &Dev {
        self.nodes[id - 1].as_ref().expect("node is running")
    }

    pub async fn kill9(&mut self, id: usize) -> anyhow::Result<()> {
        if let Some(mut node) = self.nodes[id - 1].take() {
            node.kill9().await?;
        }
        Ok(())
    }

    /// Lays out one more node with `switchboard cluster add-node`, starts it (it joins
    /// on its first start) and waits until it is ready; returns its id.
    pub async fn add_node(&mut self) -> anyhow::Result<usize> {
        cli([std::ffi::OsStr::new("cluster"), "add-node".as_ref(), "--dir".as_ref(), self.dir.as_os_str()], &[]).await.context("cluster add-node")?;
        let id = self.nodes.len() + 1;
        anyhow::ensure!(self.dir.join(format!("node-{id}.toml")).exists(), "add-node wrote no node-{id}.toml");
        let mut node = Self::launch(&self.dir, id, None)?.ready().await?;
        node.logins = self.logins.clone();
        self.nodes.push(Some(node));
        self.namespaces.push(None);
        Ok(id)
    }

    /// Stops node `id` as an operator would (SIGTERM), and waits for it to exit.
    pub async fn stop(&mut self, id: usize) -> anyhow::Result<()> {
        if let Some(mut node) = self.nodes[id - 1].take() {
            node.terminate().await?;
        }
        Ok(())
    }

    /// Launches node `id` again without waiting for it: members wait for a quorum, so a
    /// whole cluster is launched first and waited for with [`Cluster::wait_started`].
    pub fn launch_again(&mut self, id: usize) -> anyhow::Result<()> {
        self.starting.push((id, Self::launch(&self.dir, id, self.namespace(id))?));
        Ok(())
    }

    /// Waits for every node launched with [`Cluster::launch_again`].
    pub async fn wait_started(&mut self) -> anyhow::Result<()> {
        let logins = self.logins.clone();
        for (id, starting) in std::mem::take(&mut self.starting) {
            let mut node = starting.ready().await?;
            node.logins = logins.clone();
            self.nodes[id - 1] = Some(node);
        }
        Ok(())
    }

    /// Starts node `id` again on its configuration and data folder.
    pub async fn restart(&mut self, id: usize) -> anyhow::Result<()> {
        let mut node = Self::launch(&self.dir, id, self.namespace(id))?.ready().await?;
        node.logins = self.logins.clone();
        self.nodes[id - 1] = Some(node);
        Ok(())
    }

    /// `GET /api/cluster` of node `id`.
    pub async fn status(&self, id: usize) -> anyhow::Result<Value> {
        let (status, body) = self.node(id).api("GET", "/api/cluster", None, None).await?;
        if status != 200 {
            bail!("/api/cluster of node {id}: {status} {body}");
        }
        Ok(body)
    }

    /// Waits until every running node applied, in each group it holds, as much as any
    /// running node did: a member serves reads from its own replica, which may lag
    /// (ARCHITECTURE.md), so a test that reads what another node acknowledged waits here
    /// first.
    pub async fn settled(&self, within: Duration) -> anyhow::Result<()> {
        let running: Vec<usize> = (1..=self.nodes.len()).filter(|id| self.nodes[id - 1].is_some()).collect();
        // What any of them applied now; writes made later do not move the target.
        let mut target = std::collections::BTreeMap::<u64, u64>::new();
        for id in &running {
            for (group, index) in applied(&self.status(*id).await?) {
                let top = target.entry(group).or_insert(0);
                *top = (*top).max(index);
            }
        }
        eventually(within, Duration::from_millis(100), || async {
            for id in &running {
                let mine = applied(&self.status(*id).await?);
                if mine.iter().any(|(group, index)| target.get(group).is_some_and(|top| index < top)) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
        .context("every running node applies what the others did")
    }

    /// The leader every running node agrees on (waits up to 10 s for them to agree).
    pub async fn leader(&self) -> anyhow::Result<usize> {
        eventually(WAIT, Duration::from_millis(100), || async {
            let mut leaders = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                if node.is_some() {
                    leaders.push(self.status(i + 1).await?["leader"].as_u64());
                }
            }
            match leaders.first() {
                Some(Some(leader)) if leaders.iter().all(|l| *l == Some(*leader)) && self.nodes.get(*leader as usize - 1).is_some_and(Option::is_some) => {
                    Ok(Some(*leader as usize))
                }
                _ => Ok(None),
            }
        })
        .await
    }
}

/// Each visitor socket's member by the gateway's map, when every conversation shard has
/// a leader and every socket is on the leader of its conversation's shard.
pub fn pinned_to_shard_leaders(view: &Value, conversations: &[u64]) -> Option<std::collections::BTreeMap<u64, u64>> {
    let shards = view["shards"].as_array()?;
    if shards.is_empty() {
        return None;
    }
    let mut expected: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for c in conversations {
        let leader = shards[(*c % shards.len() as u64) as usize]["leader"].as_u64()?;
        *expected.entry(leader).or_default() += 1;
    }
    let actual: std::collections::BTreeMap<u64, u64> = view["members"].as_array()?.iter().filter_map(|m| Some((m["id"].as_u64()?, m["sockets"].as_u64()?))).filter(|(_, n)| *n > 0).collect();
    (actual == expected).then_some(actual)
}

pub use switchboard_gateway::client::free_port_block;

/// VmRSS of a process, in bytes.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?;
    Ok(kib * 1024)
}

pub const MIB: u64 = 1024 * 1024;

/// `n` distinct loopback addresses nobody listens on right now (all bound at once,
/// then released).
pub fn free_local_addrs(n: usize) -> anyhow::Result<Vec<String>> {
    let listeners = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<Vec<_>, _>>()?)
}

/// `switchboard dev`'s two layouts: one group holding everything, and split into a
/// metadata group, a routing shard and two conversation shards (`--shards 2`).
pub const LAYOUTS: [&[&str]; 2] = [&[], &["--shards", "2"]];

/// Runs `check` against a fresh `switchboard dev` of each of [`LAYOUTS`], saying which
/// one failed.
pub async fn on_each_layout<F, Fut>(mut check: F) -> anyhow::Result<()>
where
    F: FnMut(Dev) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for layout in LAYOUTS {
        let dir = tempfile::tempdir()?;
        let dev = Dev::start_with(binary()?, &dir.path().join("data"), layout).await?;
        check(dev).await.map_err(|e| e.context(format!("switchboard dev {layout:?}")))?;
    }
    Ok(())
}

/// Polls `attempt` every `every` until it yields `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, every: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(left.max(Duration::from_millis(1)), attempt()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => "not yet".to_owned(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "attempt timed out".to_owned(),
        };
        if tokio::time::Instant::now() + every > deadline {
            bail!("not within {within:?}: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The close code a [`WsClient`] receives within `timeout` (1006 when the connection
/// was lost without a close frame); frames before it are skipped.
pub async fn next_close(ws: &mut WsClient, timeout: Duration) -> anyhow::Result<u16> {
    use switchboard_gateway::client::Incoming;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next(left).await {
            Ok(Incoming::Closed { code, .. }) => return Ok(code),
            Ok(_) => continue,
            Err(e) => bail!("no close within {timeout:?}: {e}"),
        }
    }
}

/// A fresh visitor starts a conversation, sends a message and gets its ack; a second
/// socket resuming with the token from seq 0 finds that message. Proves the node still
/// serves visitors and keeps what it acknowledged.
pub async fn serves_a_new_client(dev: &Dev) -> anyhow::Result<()> {
    let (ws, conversation, token) = dev.client("Still served").await.context("a fresh client starts")?;
    let mut ws = ws;
    ws.send(&json!({"type": "send", "key": "still-served", "text": "are you there?"})).await?;
    let ack = ws.wait_for(WAIT, |v| (v["type"] == "ack" && v["key"] == "still-served") || v["type"] == "error").await?;
    anyhow::ensure!(ack["type"] == "ack", "a fresh client's send was refused: {ack}");
    let mut again = WsClient::connect(&dev.public, "/ws/client", None).await?;
    again.send(&json!({"type": "resume", "token": token, "last_seq": 0})).await?;
    let resumed = again.wait_for(WAIT, |v| v["type"] == "resumed" || v["type"] == "error").await?;
    anyhow::ensure!(resumed["type"] == "resumed" && resumed["conversation"] == conversation, "resume refused: {resumed}");
    again
        .wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "message" && v["key"] == "still-served" && v["seq"] == ack["seq"])
        .await
        .context("the acknowledged message is in the history")?;
    Ok(())
}

/// An operator logs in, opens the operator socket, gets `hello` and goes online.
pub async fn serves_an_operator(dev: &Dev, login: &str) -> anyhow::Result<()> {
    let (mut ws, hello) = dev.operator(login).await.with_context(|| format!("{login} opens the operator socket"))?;
    anyhow::ensure!(hello["type"] == "hello", "{hello}");
    set_presence(&mut ws, "online").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Raw HTTP/1.1 over TCP, for requests a well-behaved client never makes.
// ---------------------------------------------------------------------------------

/// Percent-encodes a query-string component (everything but RFC 3986 unreserved).
pub fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Connects to `addr`, optionally from a chosen local address (any of 127.0.0.0/8 on
/// Linux loopback), with an optional receive buffer size.
pub async fn tcp_connect(addr: &str, source: Option<std::net::IpAddr>, recv_buffer: Option<u32>) -> std::io::Result<tokio::net::TcpStream> {
    let target: std::net::SocketAddr =
        addr.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if let Some(ip) = source {
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = tokio::time::timeout(WAIT, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The head of an HTTP/1.1 request: request line, `Host`, the given headers and, if
/// given, `Content-Length`; ends with the blank line.
pub fn request_head(method: &str, path: &str, host: &str, headers: &[(&str, &str)], content_length: Option<usize>) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(length) = content_length {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or as a JSON string when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }
}

/// What came back on a raw HTTP connection.
#[derive(Debug)]
pub enum HttpOutcome {
    Response(HttpResponse),
    /// The server closed (or reset) the connection before a whole response.
    Closed,
    TimedOut,
}

/// Appends what `reader` has to `buf`; `false` (and `eof` set) at end of stream or on a
/// reset.
async fn read_more<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>, eof: &mut bool) -> bool {
    use tokio::io::AsyncReadExt;
    if *eof {
        return false;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    match reader.read(&mut chunk).await {
        Ok(0) | Err(_) => {
            *eof = true;
            false
        }
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// One raw HTTP/1.1 connection: write any bytes, read a response with a deadline, or
/// wait for the server to close it.
pub struct HttpConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl HttpConn {
    pub async fn connect(addr: &str) -> std::io::Result<HttpConn> {
        Self::connect_from(addr, None).await
    }

    pub async fn connect_from(addr: &str, source: Option<std::net::IpAddr>) -> std::io::Result<HttpConn> {
        Ok(HttpConn { stream: tcp_connect(addr, source, None).await?, buf: Vec::new(), eof: false })
    }

    /// Writes bytes, failing if the peer takes more than `WAIT` to take them.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match tokio::time::timeout(WAIT, self.stream.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write made no progress")),
        }
    }

    /// Reads more bytes; `false` at end of stream or on a reset.
    async fn fill(&mut self) -> bool {
        read_more(&mut self.stream, &mut self.buf, &mut self.eof).await
    }

    /// The next response, if one arrives within `timeout`. Bytes read stay buffered
    /// across calls, so a timed-out read can be continued.
    pub async fn read_response(&mut self, timeout: Duration) -> HttpOutcome {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match parse_response(&self.buf, self.eof) {
                Parsed::Complete(response, used) => {
                    self.buf.drain(..used);
                    return HttpOutcome::Response(response);
                }
                Parsed::Invalid => return HttpOutcome::Closed,
                Parsed::Incomplete if self.eof => return HttpOutcome::Closed,
                Parsed::Incomplete => {}
            }
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return HttpOutcome::TimedOut,
                Ok(_) => continue,
            }
        }
    }

    /// Whether the server closes (or resets) the connection within `timeout`;
    /// anything it sends first is discarded.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.buf.clear();
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return false,
                Ok(false) => return true,
                Ok(true) => continue,
            }
        }
    }

    /// The local port of the connection (to find it in `/proc/net/tcp`).
    pub fn local_port(&self) -> std::io::Result<u16> {
        Ok(self.stream.local_addr()?.port())
    }

    pub fn into_inner(self) -> tokio::net::TcpStream {
        self.stream
    }
}

enum Parsed {
    Complete(HttpResponse, usize),
    Incomplete,
    Invalid,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(buf: &[u8], eof: bool) -> Parsed {
    let Some(head_end) = find(buf, b"\r\n\r\n") else { return Parsed::Incomplete };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let Some(status) = status_line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()) else { return Parsed::Invalid };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body_start = head_end + 4;
    let rest = &buf[body_start..];
    let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let response = |body: Vec<u8>| HttpResponse { status, headers: headers.clone(), body };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Parsed::Complete(response(Vec::new()), body_start);
    }
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let Some(line_end) = find(&rest[at..], b"\r\n") else { return Parsed::Incomplete };
            let size_text = String::from_utf8_lossy(&rest[at..at + line_end]).into_owned();
            let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16) else { return Parsed::Invalid };
            at += line_end + 2;
            if size == 0 {
                // Trailers, then a blank line.
                let Some(end) = find(&rest[at..], b"\r\n") else { return Parsed::Incomplete };
                if end == 0 {
                    return Parsed::Complete(response(body), body_start + at + 2);
                }
                let Some(end) = find(&rest[at..], b"\r\n\r\n") else { return Parsed::Incomplete };
                return Parsed::Complete(response(body), body_start + at + end + 4);
            }
            if rest.len() < at + size + 2 {
                return Parsed::Incomplete;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    }
    if let Some(length) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < length {
            return Parsed::Incomplete;
        }
        return Parsed::Complete(response(rest[..length].to_vec()), body_start + length);
    }
    if eof {
        Parsed::Complete(response(rest.to_vec()), buf.len())
    } else {
        Parsed::Incomplete
    }
}

/// One request on a fresh connection (`Connection: close`), optionally from a chosen
/// local address; the response must come within `WAIT`.
pub async fn http_request(
    addr: &str,
    source: Option<std::net::IpAddr>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    let mut conn = HttpConn::connect_from(addr, source).await.with_context(|| format!("connect {addr}"))?;
    let mut all: Vec<(&str, &str)> = vec![("Connection", "close")];
    all.extend_from_slice(headers);
    let length = (!body.is_empty() || matches!(method, "POST" | "PUT")).then_some(body.len());
    let mut request = request_head(method, path, addr, &all, length);
    request.extend_from_slice(body);
    conn.send(&request).await.with_context(|| format!("{method} {path}"))?;
    match conn.read_response(WAIT).await {
        HttpOutcome::Response(response) => Ok(response),
        HttpOutcome::Closed => bail!("{method} {path}: connection closed without a response"),
        HttpOutcome::TimedOut => bail!("{method} {path}: no response within {WAIT:?}"),
    }
}

/// A visitor's upload, `POST /attachments?token=&name=` on the public listener, with the
/// whole body; returns the status and the JSON reply.
pub async fn client_upload(dev: &Dev, token: &str, name: &str, content_type: &str, body: &[u8]) -> anyhow::Result<(u16, Value)> {
    let path = format!("/attachments?token={}&name={}", query_escape(token), query_escape(name));
    let response = http_request(&dev.public, None, "POST", &path, &[("Content-Type", content_type)], body).await?;
    Ok((response.status, response.json()))
}

impl Dev {
    /// `POST /api/login` from a chosen local address; returns the status and reply.
    pub async fn login_from(&self, source: Option<std::net::IpAddr>, login: &str, password: &str) -> anyhow::Result<(u16, Value)> {
        let body = json!({"login": login, "password": password}).to_string();
        let response =
            http_request(&self.private, source, "POST", "/api/login", &[("Content-Type", "application/json")], body.as_bytes()).await?;
        Ok((response.status, response.json()))
    }

    /// The demo password of a login.
    pub fn password(&self, login: &str) -> anyhow::Result<String> {
        self.logins.get(login).cloned().ok_or_else(|| anyhow!("no demo login {login}"))
    }
}

// ---------------------------------------------------------------------------------
// Raw WebSocket, for frames the protocol forbids.
// ---------------------------------------------------------------------------------

pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// How a frame's payload length is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenForm {
    /// The shortest form that fits.
    Auto,
    /// 7-bit length (payloads of at most 125 bytes).
    Short,
    /// 126 and a 16-bit length.
    Medium,
    /// 127 and a 64-bit length.
    Long,
}

/// A frame as a client writes it: every bit under the test's control.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub fin: bool,
    /// The three RSV bits, RSV1 being 0b100.
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
    pub len_form: LenForm,
}

impl RawFrame {
    /// A final, masked frame with no RSV bits.
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> RawFrame {
        RawFrame { fin: true, rsv: 0, opcode, mask: Some([0x37, 0xfa, 0x21, 0x3d]), payload: payload.into(), len_form: LenForm::Auto }
    }

    pub fn text(text: &str) -> RawFrame {
        Self::new(opcode::TEXT, text.as_bytes())
    }

    pub fn json(value: &Value) -> RawFrame {
        Self::text(&value.to_string())
    }

    pub fn continuation(payload: impl Into<Vec<u8>>) -> RawFrame {
        Self::new(opcode::CONTINUATION, payload)
    }

    pub fn ping(payload: impl Into<Vec<u8>>) -> RawFrame {
        Self::new(opcode::PING, payload)
    }

    pub fn close(code: u16, reason: &str) -> RawFrame {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        Self::new(opcode::CLOSE, payload)
    }

    pub fn fin(mut self, fin: bool) -> RawFrame {
        self.fin = fin;
        self
    }

    pub fn rsv(mut self, rsv: u8) -> RawFrame {
        self.rsv = rsv & 0b111;
        self
    }

    pub fn unmasked(mut self) -> RawFrame {
        self.mask = None;
        self
    }

    pub fn len_form(mut self, form: LenForm) -> RawFrame {
        self.len_form = form;
        self
    }

    /// The frame's bytes on the wire. A `Short` form too small for the payload is
    /// widened to `Medium`.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.payload.len();
        let mut out = Vec::with_capacity(len + 14);
        out.push((u8::from(self.fin) << 7) | (self.rsv << 4) | (self.opcode & 0x0F));
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let form = match self.len_form {
            LenForm::Auto if len < 126 => LenForm::Short,
            LenForm::Auto if len <= 0xFFFF => LenForm::Medium,
            LenForm::Auto => LenForm::Long,
            LenForm::Short if len >= 126 => LenForm::Medium,
            other => other,
        };
        match form {
            LenForm::Short => out.push(mask_bit | len as u8),
            LenForm::Medium => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            LenForm::Long | LenForm::Auto => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match self.mask {
            Some(mask) => {
                out.extend_from_slice(&mask);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
        out
    }
}

/// A frame as the server sent it.
#[derive(Clone, Debug)]
pub struct ServerFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    /// Server frames must not be masked; kept to check it.
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// The close code of a close frame (`None` for an empty close payload).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == opcode::CLOSE && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// A text frame's JSON.
    pub fn json(&self) -> Option<Value> {
        (self.opcode == opcode::TEXT).then(|| serde_json::from_slice(&self.payload).ok()).flatten()
    }
}

/// What a raw read produced.
#[derive(Debug)]
pub enum RawEvent {
    Frame(ServerFrame),
    /// The TCP connection ended (end of stream or reset).
    Closed,
    TimedOut,
}

/// How a raw socket ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close frame, with its code (`None` if it had no payload).
    CloseFrame(Option<u16>),
    /// The TCP connection was closed or reset without a close frame.
    Dropped,
}

/// The reading half of a raw WebSocket.
pub struct RawReader {
    half: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
    eof: bool,
    /// Frames passed over by `wait_close`, by opcode.
    pub skipped: HashMap<u8, usize>,
}

impl RawReader {
    async fn fill(&mut self) -> bool {
        read_more(&mut self.half, &mut self.buf, &mut self.eof).await
    }

    fn parse(&mut self) -> anyhow::Result<Option<ServerFrame>> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let masked = b1 & 0x80 != 0;
        let (len, mut at) = match b1 & 0x7F {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into()?), 10),
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        anyhow::ensure!(len <= 64 * MIB, "server frame of {len} bytes");
        let len = len as usize;
        let mask = if masked {
            if buf.len() < at + 4 {
                return Ok(None);
            }
            let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
            at += 4;
            Some(m)
        } else {
            None
        };
        if buf.len() < at + len {
            return Ok(None);
        }
        let mut payload = buf[at..at + len].to_vec();
        if let Some(m) = mask {
            payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
        }
        self.buf.drain(..at + len);
        Ok(Some(ServerFrame { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0b111, opcode: b0 & 0x0F, masked, payload }))
    }

    /// The next server frame within `timeout`.
    pub async fn read_frame(&mut self, timeout: Duration) -> anyhow::Result<RawEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(RawEvent::Frame(frame));
            }
            if self.eof {
                return Ok(RawEvent::Closed);
            }
            if tokio::time::timeout_at(deadline, self.fill()).await.is_err() {
                return Ok(RawEvent::TimedOut);
            }
        }
    }

    /// Skips frames until a close frame or the end of the connection, within `timeout`
    /// (an error if neither comes).
    pub async fn wait_close(&mut self, timeout: Duration) -> anyhow::Result<Ending> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await? {
                RawEvent::Frame(frame) if frame.opcode == opcode::CLOSE => return Ok(Ending::CloseFrame(frame.close_code())),
                RawEvent::Frame(frame) => *self.skipped.entry(frame.opcode).or_default() += 1,
                RawEvent::Closed => return Ok(Ending::Dropped),
                RawEvent::TimedOut => bail!("neither a close frame nor the end of the connection within {timeout:?}"),
            }
        }
    }

    /// Whether the TCP connection ends (end of stream or reset) within `timeout`;
    /// whatever arrives first is discarded.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.buf.clear();
            if self.eof {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.fill()).await.is_err() {
                return false;
            }
        }
    }
}

/// The writing half of a raw WebSocket.
pub struct RawWriter {
    half: tokio::net::tcp::OwnedWriteHalf,
}

impl RawWriter {
    pub async fn send(&mut self, frame: &RawFrame) -> std::io::Result<()> {
        self.send_bytes(&frame.encode()).await
    }

    /// Writes bytes, failing if the peer takes more than `WAIT` to take them.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match tokio::time::timeout(WAIT, self.half.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write made no progress")),
        }
    }
}

/// A WebSocket opened by hand (no `Origin`, version 13), whose frames the test encodes
/// itself and whose server frames it reads raw.
pub struct RawWs {
    pub reader: RawReader,
    pub writer: RawWriter,
}

impl RawWs {
    /// Upgrades `GET path` on `addr`; fails unless the server answers 101.
    pub async fn connect(addr: &str, path: &str) -> anyhow::Result<RawWs> {
        Self::connect_with(addr, path, None).await
    }

    /// As [`RawWs::connect`], with a small receive buffer when given (a client that
    /// does not read then holds little of what the server sends).
    pub async fn connect_with(addr: &str, path: &str, recv_buffer: Option<u32>) -> anyhow::Result<RawWs> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tcp_connect(addr, None, recv_buffer).await.with_context(|| format!("connect {addr}"))?;
        let request = request_head(
            "GET",
            path,
            addr,
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            None,
        );
        tokio::time::timeout(WAIT, stream.write_all(&request)).await.context("upgrade request not taken")??;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end;
            }
            anyhow::ensure!(buf.len() < 16 * 1024, "upgrade response head too long");
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.context("no upgrade response")??;
            anyhow::ensure!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
        anyhow::ensure!(status == "101", "upgrade refused: {}", head.lines().next().unwrap_or_default());
        let rest = buf[head_end + 4..].to_vec();
        let (read, write) = stream.into_split();
        Ok(RawWs {
            reader: RawReader { half: read, buf: rest, eof: false, skipped: HashMap::new() },
            writer: RawWriter { half: write },
        })
    }

    pub async fn send(&mut self, frame: &RawFrame) -> std::io::Result<()> {
        self.writer.send(frame).await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.send_bytes(bytes).await
    }

    pub async fn read_frame(&mut self, timeout: Duration) -> anyhow::Result<RawEvent> {
        self.reader.read_frame(timeout).await
    }

    pub async fn wait_close(&mut self, timeout: Duration) -> anyhow::Result<Ending> {
        self.reader.wait_close(timeout).await
    }

    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        self.reader.closed_within(timeout).await
    }

    /// The first text frame whose JSON satisfies `matches`, within `timeout`.
    pub async fn wait_json(&mut self, timeout: Duration, matches: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.reader.read_frame(left).await? {
                RawEvent::Frame(frame) => {
                    if let Some(v) = frame.json().filter(|v| matches(v)) {
                        return Ok(v);
                    }
                    anyhow::ensure!(frame.opcode != opcode::CLOSE, "closed with {:?} while waiting", frame.close_code());
                }
                RawEvent::Closed => bail!("connection closed while waiting"),
                RawEvent::TimedOut => bail!("no matching frame within {timeout:?}"),
            }
        }
    }

    pub fn split(self) -> (RawReader, RawWriter) {
        (self.reader, self.writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_encode_as_rfc_6455_shows() {
        // RFC 6455 §5.7: a masked "Hello".
        let hello = RawFrame::text("Hello").encode();
        assert_eq!(hello, [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        let unmasked = RawFrame::text("Hello").unmasked().encode();
        assert_eq!(unmasked, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        let fragment = RawFrame::continuation(vec![0u8; 300]).fin(false).rsv(0b100).encode();
        assert_eq!(&fragment[..4], &[0x40, 0x80 | 126, 0x01, 0x2c]);
        let long = RawFrame::ping(b"x".to_vec()).len_form(LenForm::Long).encode();
        assert_eq!(&long[..10], &[0x89, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(RawFrame::close(1000, "").payload, vec![0x03, 0xe8]);
    }

    #[tokio::test]
    async fn server_frames_and_responses_parse() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while find(&head, b"\r\n\r\n").is_none() {
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await.unwrap();
                head.extend_from_slice(&chunk[..n]);
            }
            let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
            out.extend_from_slice(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o']);
            out.extend_from_slice(&[0x82, 126, 0x01, 0x00]);
            out.extend_from_slice(&[7u8; 256]);
            out.extend_from_slice(&[0x88, 0x02, 0x03, 0xf1]);
            stream.write_all(&out).await.unwrap();
        });
        let mut ws = RawWs::connect(&addr, "/ws/client").await.unwrap();
        match ws.read_frame(WAIT).await.unwrap() {
            RawEvent::Frame(f) => assert_eq!((f.opcode, f.payload.as_slice(), f.masked), (opcode::TEXT, b"Hello".as_slice(), false)),
            other => panic!("{other:?}"),
        }
        match ws.read_frame(WAIT).await.unwrap() {
            RawEvent::Frame(f) => assert_eq!((f.opcode, f.payload.len()), (opcode::BINARY, 256)),
            other => panic!("{other:?}"),
        }
        assert_eq!(ws.wait_close(WAIT).await.unwrap(), Ending::CloseFrame(Some(1009)));
        server.await.unwrap();
        assert!(ws.closed_within(WAIT).await);

        let sized = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\nX-A: b\r\n\r\n{}{}";
        match parse_response(sized, false) {
            Parsed::Complete(r, used) => {
                assert_eq!((r.status, r.body.as_slice(), r.header("x-a"), used), (401, b"{}{}".as_slice(), Some("b"), sized.len()))
            }
            _ => panic!("sized response"),
        }
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        match parse_response(chunked, false) {
            Parsed::Complete(r, used) => assert_eq!((r.body.as_slice(), used), (b"abcde".as_slice(), chunked.len())),
            _ => panic!("chunked response"),
        }
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", false), Parsed::Incomplete));
        assert!(matches!(parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false), Parsed::Complete(r, _) if r.status == 204));
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nuntil eof", true), Parsed::Complete(r, _) if r.body == b"until eof"));
        assert_eq!(query_escape("a b/\u{202E}"), "a%20b%2F%E2%80%AE");
    }
}
