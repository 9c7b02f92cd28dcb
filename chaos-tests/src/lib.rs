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
        std::fs::create_dir_all(data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("node.log"))?;
        let mut child = tokio::process::Command::new(binary)
            .args([subcommand, "--public-addr", "127.0.0.1:0", "--private-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info,openraft=warn,sled=warn,quinn=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn switchboard {subcommand}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut public, mut private) = (None, None);
        let ready = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("public listener: http://") {
                    public = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some(rest) = line.strip_prefix("private listener: http://") {
                    private = rest.split_whitespace().next().map(str::to_owned);
                }
                if line == "ready" {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        };
        match tokio::time::timeout(Duration::from_secs(60), ready).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Ok(Err(_)) => bail!("switchboard {subcommand} exited before it was ready; see {}", data_dir.join("node.log").display()),
            Err(_) => bail!("switchboard {subcommand} not ready within 60 s"),
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let logins = if subcommand == "dev" {
            serde_json::from_slice(&std::fs::read(data_dir.join("demo-logins.json"))?)?
        } else {
            let password = std::fs::read_to_string(data_dir.join("admin-password")).context("read the first-start admin password")?;
            HashMap::from([("admin".to_owned(), password.trim().to_owned())])
        };
        Ok(Dev {
            child,
            public: public.ok_or_else(|| anyhow!("no public listener printed"))?,
            private: private.ok_or_else(|| anyhow!("no private listener printed"))?,
            data_dir: data_dir.to_path_buf(),
            logins,
        })
    }

    /// SIGKILL, as a power cut would: nothing gets to flush or say goodbye.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(WAIT, self.child.wait()).await??;
        Ok(())
    }

    /// Logs in a demo user and returns the token.
    pub async fn login(&self, login: &str) -> anyhow::Result<String> {
        let password = self.logins.get(login).ok_or_else(|| anyhow!("no demo login {login}"))?;
        let (status, body) =
            http_json(&self.private, "POST", "/api/login", None, Some(&json!({"login": login, "password": password}))).await?;
        if status != 200 {
            bail!("login {login}: {status} {body}");
        }
        body["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("login reply has no token"))
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
        let started = ws.wait_for(WAIT, |v| v["type"] == "started").await?;
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
