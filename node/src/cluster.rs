//! A cluster's configuration files: what `switchboard cluster init` writes, what
//! `switchboard node --config` reads, and `switchboard cluster status`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One node's configuration file (`node-<id>.toml`). Relative paths are read from the
/// file's own folder. Documented with an example in `deploy/README.md`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: unique in the cluster, never reused.
    pub id: u64,
    /// Its data folder (Raft log, records, snapshots, attachments).
    pub data_dir: PathBuf,
    /// Public listener: web chat page and client WebSocket.
    pub public_addr: SocketAddr,
    /// Private listener: operators, supervisors, REST, `/metrics`, `/api/cluster`.
    pub private_addr: SocketAddr,
    /// QUIC listener for Raft traffic and forwarded commands; the other members dial
    /// the address given for this node in `members`.
    pub raft_addr: SocketAddr,
    /// SMTP listener for email channels' inbound mail; none when absent.
    #[serde(default)]
    pub smtp_addr: Option<SocketAddr>,
    /// Folder with the cluster CA's `ca.pem` and this node's `node-<id>.pem` and `.key`.
    pub certs_dir: PathBuf,
    /// The token key every node of the cluster shares (32 bytes or more).
    pub token_key: PathBuf,
    /// Extra origins allowed to open the client WebSocket.
    #[serde(default)]
    pub client_origins: Vec<String>,
    /// Extra origins allowed to open the operator WebSocket.
    #[serde(default)]
    pub staff_origins: Vec<String>,
    /// Raft entries between snapshot points.
    #[serde(default)]
    pub snapshot_every: Option<u64>,
    /// Seconds between retention purges on the leader.
    #[serde(default)]
    pub retention_check_s: Option<u64>,
    /// Seconds an attachment file must have been on disk before it may be taken for a
    /// stray; 3600 when absent, 900 at the least.
    #[serde(default)]
    pub stray_files_after_s: Option<u64>,
    /// Seconds between two looks for stray attachment files; 600 when absent.
    #[serde(default)]
    pub stray_sweep_every_s: Option<u64>,
    /// Seconds an online operator may be without a live socket before they are set
    /// away (`disconnected`); 30 when absent.
    #[serde(default)]
    pub presence_grace_s: Option<u64>,
    /// Whether `POST /api/chaos/*` drills are served (admin only).
    #[serde(default)]
    pub enable_chaos_drills: bool,
    /// A node added to a running cluster (`cluster add-node`): on its first start it
    /// asks the `members` to admit it rather than starting the group with them.
    #[serde(default)]
    pub join: bool,
    /// The group's first members, the same list in every node's file. The member with
    /// the lowest id creates the first admin on the cluster's first start. Once the
    /// group runs, its membership lives in its log (`cluster add-node`, `remove-node`);
    /// this list only matters to a node's first start.
    pub members: Vec<Member>,
    /// The cluster's state split as ADR 0006 lays it out: a metadata group, a routing
    /// shard (on every member, three voting) and this many conversation shards (each kept
    /// by its three voters only).
    /// Fixed when the cluster is made; absent: one group holds everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    /// Where the other members reach this one over QUIC.
    pub raft_addr: String,
}

impl NodeConfig {
    /// Reads and checks `path`, resolving relative paths against its folder.
    pub fn read(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let mut config: NodeConfig = toml::from_str(&text).with_context(|| format!("{} is not a valid node configuration", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.data_dir, &mut config.certs_dir, &mut config.token_key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.check().with_context(|| format!("{}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.members.is_empty() {
            anyhow::bail!("`members` is empty: list every first member, this node included");
        }
        let mut ids = std::collections::BTreeSet::new();
        for member in &self.members {
            if !ids.insert(member.id) {
                anyhow::bail!("member id {} is listed twice", member.id);
            }
            member.raft_addr.parse::<SocketAddr>().map_err(|e| anyhow::anyhow!("member {}: raft_addr {:?}: {e}", member.id, member.raft_addr))?;
        }
        if !ids.contains(&self.id) {
            anyhow::bail!("this node's id {} is not among `members`", self.id);
        }
        Ok(())
    }

    /// Whether this node makes the first admin: the member with the lowest id, unless
    /// it joins a running cluster.
    pub fn bootstraps(&self) -> bool {
        !self.join && self.members.iter().map(|m| m.id).min() == Some(self.id)
    }
}

/// A standalone gateway's file (`switchboard gateway --config gateway-a.toml`). Relative
/// paths are read from the file's own folder.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFileConfig {
    /// Its name: its certificate is `<certs_dir>/<name>.pem`, issued with the role
    /// gateway (`switchboard certs --role gateway --name <name>`).
    pub name: String,
    /// Public listener: the web chat page and the client WebSocket, relayed.
    pub public_addr: SocketAddr,
    /// Private listener: staff sockets and REST, relayed; the gateway's own `/metrics`
    /// and `/api/gateway`.
    pub private_addr: SocketAddr,
    /// Folder with the cluster CA's `ca.pem` and this gateway's certificate and key.
    pub certs_dir: PathBuf,
    /// Members to reach first; the others are learnt from them.
    pub members: Vec<Member>,
}

impl GatewayFileConfig {
    pub fn read(path: &Path) -> anyhow::Result<GatewayFileConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let mut config: GatewayFileConfig = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid gateway configuration", path.display()))?;
        if config.certs_dir.is_relative() {
            config.certs_dir = path
                .parent()
                .unwrap_or(Path::new("."))
                .join(&config.certs_dir);
        }
        if config.members.is_empty() {
            anyhow::bail!(
                "{}: `members` is empty: list the members to reach",
                path.display()
            );
        }
        for member in &config.members {
            member.raft_addr.parse::<SocketAddr>().map_err(|e| {
                anyhow::anyhow!(
                    "{}: member {}: raft_addr {:?}: {e}",
                    path.display(),
                    member.id,
                    member.raft_addr
                )
            })?;
        }
        Ok(config)
    }
}

/// The name of the `n`th gateway (0-based): gateway-a, gateway-b…
pub fn gateway_name(n: u64) -> String {
    let letter = (b'a' + (n % 26) as u8) as char;
    if n < 26 {
        format!("gateway-{letter}")
    } else {
        format!("gateway-{letter}{}", n / 26)
    }
}

/// Writes `config` as TOML under `head` (each of its lines a comment), readable by the
/// owner only: the files name the keys a member trusts.
fn write_config<T: Serialize>(path: &Path, head: &str, config: &T) -> anyhow::Result<()> {
    let mut text: String = head.lines().map(|l| format!("# {l}\n")).collect();
    text.push_str(&toml::to_string(config).with_context(|| format!("write {}", path.display()))?);
    switchboard_raft::files::write_private(path, text.as_bytes())?;
    Ok(())
}

/// What `cluster init` lays out.
pub struct InitPlan {
    pub dir: PathBuf,
    pub nodes: u64,
    /// One host per node, or one for all.
    pub hosts: Vec<String>,
    pub public_port: u16,
    pub private_port: u16,
    pub raft_port: u16,
    /// Added to each port for every next node on the same host.
    pub port_step: u16,
    /// Standalone gateways to lay out, on the first host, with their public and
    /// private ports starting at these (stepping by `port_step`).
    pub gateways: u64,
    pub gateway_public_port: u16,
    pub gateway_private_port: u16,
    /// Conversation shards of a split cluster (ADR 0006); `None`: one group.
    pub shards: Option<u64>,
}

/// Writes the CA, a certificate per node, the shared token key and one configuration
/// file per node into `plan.dir`; refuses a folder that already holds a cluster.
pub fn init(plan: &InitPlan) -> anyhow::Result<Vec<PathBuf>> {
    if plan.nodes == 0 || plan.nodes > 64 {
        anyhow::bail!("--nodes must be between 1 and 64");
    }
    if let Some(shards) = plan.shards.filter(|n| !(1..=64).contains(n)) {
        anyhow::bail!("--shards is 1 to 64 conversation shards (0 for one group), not {shards}");
    }
    if plan.hosts.is_empty() || (plan.hosts.len() != 1 && plan.hosts.len() as u64 != plan.nodes) {
        anyhow::bail!("give one --host for all nodes or one per node ({} nodes, {} hosts)", plan.nodes, plan.hosts.len());
    }
    if plan.dir.join("node-1.toml").exists() || plan.dir.join("token.key").exists() {
        anyhow::bail!("{} already holds a cluster's files; choose another folder", plan.dir.display());
    }
    let host = |i: u64| -> &str { if plan.hosts.len() == 1 { &plan.hosts[0] } else { &plan.hosts[(i - 1) as usize] } };
    // Nodes on one host need ports of their own; on hosts of their own they share them.
    let port = |base: u16, i: u64| -> anyhow::Result<u16> {
        let step = if plan.hosts.len() == 1 { u64::from(plan.port_step) * (i - 1) } else { 0 };
        u16::try_from(u64::from(base) + step).map_err(|_| anyhow::anyhow!("port {base} + {step} is past 65535"))
    };
    let gateway_port = |base: u16, g: u64| {
        u16::try_from(u64::from(base) + u64::from(plan.port_step) * g).map_err(|_| anyhow::anyhow!("gateway port {base} + {g} steps is past 65535"))
    };
    // Every listener of one host on a port of its own (TCP: the public and private
    // listeners of nodes and gateways; UDP: the nodes' QUIC), before anything is written:
    // two on one port would leave the second process unable to start.
    let mut listeners: Vec<(String, &str, u16, String)> = Vec::new();
    for i in 1..=plan.nodes {
        listeners.push((host(i).to_string(), "tcp", port(plan.public_port, i)?, format!("node {i}'s public port")));
        listeners.push((host(i).to_string(), "tcp", port(plan.private_port, i)?, format!("node {i}'s private port")));
        listeners.push((host(i).to_string(), "udp", port(plan.raft_port, i)?, format!("node {i}'s raft port")));
    }
    for g in 0..plan.gateways {
        listeners.push((host(1).to_string(), "tcp", gateway_port(plan.gateway_public_port, g)?, format!("{}'s public port", gateway_name(g))));
        listeners.push((host(1).to_string(), "tcp", gateway_port(plan.gateway_private_port, g)?, format!("{}'s private port", gateway_name(g))));
    }
    let mut seen: std::collections::BTreeMap<(String, &str, u16), String> = std::collections::BTreeMap::new();
    for (h, kind, p, what) in listeners {
        if let Some(first) = seen.get(&(h.clone(), kind, p)) {
            anyhow::bail!("{first} and {what} would both be {h}:{p}: choose ports further apart (each next node on a host adds --port-step, {})", plan.port_step);
        }
        seen.insert((h, kind, p), what);
    }
    std::fs::create_dir_all(&plan.dir).with_context(|| format!("create {}", plan.dir.display()))?;
    let certs = plan.dir.join("certs");
    let addr = |h: &str, p: u16| -> anyhow::Result<SocketAddr> {
        let text = if h.contains(':') { format!("[{h}]:{p}") } else { format!("{h}:{p}") };
        text.parse().map_err(|e| anyhow::anyhow!("{text}: {e} (hosts are IP addresses)"))
    };
    let mut members = Vec::new();
    for i in 1..=plan.nodes {
        members.push(Member { id: i, raft_addr: addr(host(i), port(plan.raft_port, i)?)?.to_string() });
    }
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).map_err(|_| anyhow::anyhow!("no randomness"))?;
    switchboard_raft::files::write_private(&plan.dir.join("token.key"), &secret)?;
    let mut written = Vec::new();
    for i in 1..=plan.nodes {
        switchboard_raft::tls::ensure_member(&certs, &format!("node-{i}"), &[host(i).to_string()])?;
        let config = NodeConfig {
            id: i,
            data_dir: PathBuf::from(format!("data/node-{i}")),
            public_addr: addr(host(i), port(plan.public_port, i)?)?,
            private_addr: addr(host(i), port(plan.private_port, i)?)?,
            raft_addr: addr(host(i), port(plan.raft_port, i)?)?,
            smtp_addr: None,
            certs_dir: PathBuf::from("certs"),
            token_key: PathBuf::from("token.key"),
            client_origins: Vec::new(),
            staff_origins: Vec::new(),
            snapshot_every: None,
            retention_check_s: None,
            stray_files_after_s: None,
            stray_sweep_every_s: None,
            presence_grace_s: None,
            enable_chaos_drills: false,
            join: false,
            members: members.clone(),
            shards: plan.shards,
        };
        let path = plan.dir.join(format!("node-{i}.toml"));
        let head = format!("Switchboard node {i}: run it with `switchboard node --config {}`.\nRelative paths are read from this file's folder. Fields: deploy/README.md.", path.display());
        write_config(&path, &head, &config)?;
        written.push(path);
    }
    for g in 0..plan.gateways {
        let name = gateway_name(g);
        let host = host(1);
        switchboard_raft::tls::ensure_member_as(
            &certs,
            &name,
            switchboard_raft::tls::Role::Gateway,
            &[host.to_string()],
        )?;
        let config = GatewayFileConfig {
            name: name.clone(),
            public_addr: addr(host, gateway_port(plan.gateway_public_port, g)?)?,
            private_addr: addr(host, gateway_port(plan.gateway_private_port, g)?)?,
            certs_dir: PathBuf::from("certs"),
            members: members.clone(),
        };
        let path = plan.dir.join(format!("{name}.toml"));
        let head = format!(
            "Switchboard gateway {name}: run it with `switchboard gateway --config {}`.\nRelative paths are read from this file's folder. Fields: deploy/gateway.example.toml.",
            path.display()
        );
        write_config(&path, &head, &config)?;
        written.push(path);
    }
    Ok(written)
}

/// A JSON request to a node's private listener (the project's HTTP client), bounded
/// in time; returns the status and the JSON body.
async fn http(private_addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&serde_json::Value>) -> anyhow::Result<(u16, serde_json::Value)> {
    let request = switchboard_gateway::client::http_json(private_addr, method, path, token, body);
    tokio::time::timeout(std::time::Duration::from_secs(60), request)
        .await
        .map_err(|_| anyhow::anyhow!("{private_addr} did not answer within 60 s"))?
        .with_context(|| format!("{method} {path} on {private_addr}"))
}

/// Whether a node's status (`GET /api/cluster`) names node `id` anywhere: among the
/// `members`, or a group's `voters` or `holders`.
pub fn names_node(status: &serde_json::Value, id: u64) -> bool {
    match status {
        serde_json::Value::Object(fields) => fields.iter().any(|(key, value)| match (key.as_str(), value) {
            ("members", serde_json::Value::Array(members)) => members.iter().any(|m| m.get("id").and_then(|v| v.as_u64()) == Some(id) || names_node(m, id)),
            ("voters" | "holders", serde_json::Value::Array(ids)) => ids.iter().any(|v| v.as_u64() == Some(id)),
            _ => names_node(value, id),
        }),
        serde_json::Value::Array(items) => items.iter().any(|item| names_node(item, id)),
        _ => false,
    }
}

/// `GET /api/cluster` from a node's private listener, as JSON.
pub async fn status(private_addr: &str) -> anyhow::Result<serde_json::Value> {
    match http(private_addr, "GET", "/api/cluster", None, None).await? {
        (200, status) => Ok(status),
        (code, body) => anyhow::bail!("{private_addr} answered {code}: {body}"),
    }
}

/// Whether the node at `private_addr` answers `/readyz` with 200.
pub async fn ready(private_addr: &str) -> bool {
    matches!(http(private_addr, "GET", "/readyz", None, None).await, Ok((200, _)))
}

/// Removes node `id` through the node at `private_addr`, logged in as an admin.
pub async fn remove_node(private_addr: &str, id: u64, login: &str, password: &str) -> anyhow::Result<serde_json::Value> {
    admin_call(private_addr, login, password, "DELETE", &format!("/api/cluster/members/{id}"), &format!("removing node {id}")).await
}

/// Balances where a split cluster's groups vote and lead, through the node at
/// `private_addr`, logged in as an admin; answers the cluster with the steps taken.
pub async fn rebalance(private_addr: &str, login: &str, password: &str) -> anyhow::Result<serde_json::Value> {
    admin_call(private_addr, login, password, "POST", "/api/cluster/rebalance", "rebalancing").await
}

async fn admin_call(private_addr: &str, login: &str, password: &str, method: &str, path: &str, what: &str) -> anyhow::Result<serde_json::Value> {
    let credentials = serde_json::json!({"login": login, "password": password});
    // A node that cannot confirm its logins are current (an election) answers 503
    // `unavailable`: asked again for up to 10 s.
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let token = loop {
        match http(private_addr, "POST", "/api/login", None, Some(&credentials)).await? {
            (200, body) => break body["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("the login answer has no token"))?,
            (503, body) if body["code"] == "unavailable" && std::time::Instant::now() < give_up => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            (code, body) => anyhow::bail!("login as {login} failed ({code}): {}", body["message"].as_str().unwrap_or_default()),
        }
    };
    match http(private_addr, method, path, Some(&token), None).await? {
        (200, status) => Ok(status),
        (code, body) => anyhow::bail!("{what} failed ({code}): {}", body["message"].as_str().unwrap_or_default()),
    }
}

/// Writes the configuration and certificate of a node to add to the cluster laid out in
/// `dir`: the next free id, `join = true`, on `host` (node 1's host by default) with
/// ports that follow the layout. Returns its file.
pub fn add_node(dir: &Path, host: Option<&str>) -> anyhow::Result<PathBuf> {
    let mut existing: Vec<NodeConfig> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("node-") && name.ends_with(".toml") {
            let text = std::fs::read_to_string(&path)?;
            existing.push(toml::from_str(&text).with_context(|| format!("{} is not a valid node configuration", path.display()))?);
        }
    }
    existing.sort_by_key(|c| c.id);
    let Some(first) = existing.first() else { anyhow::bail!("{} holds no node-<id>.toml: run `switchboard cluster init` first", dir.display()) };
    let certs = if first.certs_dir.is_relative() { dir.join(&first.certs_dir) } else { first.certs_dir.clone() };
    // Ids are never reused: past every node a configuration names (its own or as a
    // member) and every node certificate ever issued here (`node-<id>.pem`), which stays
    // when a removed node's configuration is deleted. A node given a removed node's id
    // would pass for it to the groups that still count it.
    let issued = std::fs::read_dir(&certs)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("node-")?.strip_suffix(".pem")?.parse::<u64>().ok()))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let named = existing.iter().flat_map(|c| std::iter::once(c.id).chain(c.members.iter().map(|m| m.id))).max().unwrap_or(0);
    let id = named.max(issued) + 1;
    let host = host.map(str::to_owned).unwrap_or_else(|| first.raft_addr.ip().to_string());
    let ip: std::net::IpAddr = host.parse().map_err(|e| anyhow::anyhow!("{host}: {e} (hosts are IP addresses)"))?;
    // On a host another node uses, ports step by 10 past the highest there.
    let on_host: Vec<&NodeConfig> = existing.iter().filter(|c| c.raft_addr.ip() == ip).collect();
    let shift = |addr: SocketAddr| -> anyhow::Result<SocketAddr> {
        let highest = on_host.iter().map(|c| c.public_addr.port()).max();
        let port = match highest {
            Some(h) => u32::from(addr.port()) + u32::from(h - first.public_addr.port()) + 10,
            None => u32::from(addr.port()),
        };
        let port = u16::try_from(port).map_err(|_| anyhow::anyhow!("no port left past {}", addr.port()))?;
        Ok(SocketAddr::new(ip, port))
    };
    let mut members: Vec<Member> = Vec::new();
    for config in &existing {
        for member in &config.members {
            if !members.iter().any(|m| m.id == member.id) {
                members.push(member.clone());
            }
        }
    }
    let raft_addr = shift(first.raft_addr)?;
    members.push(Member { id, raft_addr: raft_addr.to_string() });
    if !certs.join("ca.key").exists() {
        anyhow::bail!("{} has no ca.key: add nodes where the cluster was laid out", certs.display());
    }
    switchboard_raft::tls::ensure_member(&certs, &format!("node-{id}"), &[host.clone()])?;
    let config = NodeConfig {
        id,
        data_dir: PathBuf::from(format!("data/node-{id}")),
        public_addr: shift(first.public_addr)?,
        private_addr: shift(first.private_addr)?,
        raft_addr,
        smtp_addr: match first.smtp_addr {
            Some(a) => Some(shift(a)?),
            None => None,
        },
        certs_dir: first.certs_dir.clone(),
        token_key: first.token_key.clone(),
        client_origins: first.client_origins.clone(),
        staff_origins: first.staff_origins.clone(),
        snapshot_every: first.snapshot_every,
        retention_check_s: first.retention_check_s,
        stray_files_after_s: first.stray_files_after_s,
        stray_sweep_every_s: first.stray_sweep_every_s,
        presence_grace_s: first.presence_grace_s,
        enable_chaos_drills: first.enable_chaos_drills,
        join: true,
        members,
        shards: first.shards,
    };
    let path = dir.join(format!("node-{id}.toml"));
    let head = format!(
        "Switchboard node {id}, added to a running cluster: run it with `switchboard node --config {}`;\non its first start it asks the members below to admit it. Fields: deploy/README.md.",
        path.display()
    );
    write_config(&path, &head, &config)?;
    Ok(path)
}

/// `status` as lines for a person.
pub fn describe(status: &serde_json::Value) -> String {
    let mut out = String::new();
    // A split node (ADR 0006): one line per group, then the members.
    if let Some(groups) = status.get("groups").and_then(|g| g.as_array()) {
        let shards = status.pointer("/split/shards").map(|v| v.to_string()).unwrap_or_default();
        out.push_str(&format!("node {}, split into {} groups ({shards} conversation shards):\n", status.get("node").map(|v| v.to_string()).unwrap_or_default(), groups.len()));
        for g in groups {
            let field = |k: &str| g.get(k).map(|v| if v.is_null() { "none".to_string() } else { v.to_string() }).unwrap_or_default();
            // ADR 0012: a conversation shard this node does not hold is read from its holders.
            if g.get("held").and_then(|v| v.as_bool()) == Some(false) {
                out.push_str(&format!(
                    "  group {} ({}): not held here, read from nodes {}\n",
                    field("group"),
                    g.get("part").and_then(|v| v.as_str()).unwrap_or("?"),
                    field("holders"),
                ));
                continue;
            }
            // ADR 0011: a quiet shard beats every 500 ms.
            let quiet = match g.get("quiet").and_then(|v| v.as_str()) {
                Some("leading") => ", quiet (beating every 500 ms)",
                Some("following") => ", quiet (waiting for beats)",
                _ => "",
            };
            out.push_str(&format!(
                "  group {} ({}): {} here, leader {}, term {}, applied {} of {} (committed {}), leader changes {}, letters in flight {} (retries {}), voters {}{quiet}\n",
                field("group"),
                g.get("part").and_then(|v| v.as_str()).unwrap_or("?"),
                g.get("role").and_then(|v| v.as_str()).unwrap_or("?"),
                field("leader"),
                field("term"),
                field("last_applied"),
                field("last_log"),
                field("commit_index"),
                field("leader_changes"),
                field("letters_in_flight"),
                field("mail_retries"),
                field("voters"),
            ));
        }
        for member in status.get("members").and_then(|m| m.as_array()).into_iter().flatten() {
            let id = member.get("id").map(|v| v.to_string()).unwrap_or_default();
            let addr = member.get("raft_addr").and_then(|v| v.as_str()).unwrap_or("?");
            let kind = if member.get("voter").and_then(|v| v.as_bool()) == Some(true) { "voter" } else { "learner" };
            out.push_str(&format!("  member {id} at {addr}: {kind}\n"));
        }
        return out;
    }
    let get = |k: &str| status.get(k).map(|v| if v.is_null() { "none".to_string() } else { v.to_string() }).unwrap_or_default();
    out.push_str(&format!(
        "node {} ({}) in group {}: leader {}, term {}, applied {} of {}\n",
        get("node"),
        status.get("role").and_then(|v| v.as_str()).unwrap_or("?"),
        get("group"),
        get("leader"),
        get("term"),
        get("last_applied"),
        get("last_log"),
    ));
    for member in status.get("members").and_then(|m| m.as_array()).into_iter().flatten() {
        let id = member.get("id").map(|v| v.to_string()).unwrap_or_default();
        let addr = member.get("raft_addr").and_then(|v| v.as_str()).unwrap_or("?");
        let kind = if member.get("voter").and_then(|v| v.as_bool()) == Some(true) { "voter" } else { "learner" };
        let matched = match member.get("matched") {
            Some(serde_json::Value::Null) => ", nothing replicated yet".to_string(),
            Some(m) => format!(", replicated up to {m}"),
            None => String::new(),
        };
        out.push_str(&format!("  member {id} at {addr}: {kind}{matched}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_nodes_status_reads_one_line_per_group() {
        let status = serde_json::json!({
            "node": 1, "split": {"shards": 1}, "leader": 2, "term": 3,
            "members": [{"id": 1, "raft_addr": "127.0.0.1:9002", "voter": true}],
            "groups": [
                {"group": 1, "part": "directory", "role": "leader", "leader": 1, "term": 3, "last_log": 39, "commit_index": 39, "last_applied": 39, "leader_changes": 0, "letters_in_flight": 0, "mail_retries": 0},
                {"group": 3, "part": "conversations 0", "role": "follower", "leader": null, "term": 2, "last_log": 10, "commit_index": 10, "last_applied": 9, "leader_changes": 2, "letters_in_flight": 4, "mail_retries": 7, "voters": [1, 2, 3]},
            ],
        });
        let text = describe(&status);
        assert!(names_node(&status, 1) && names_node(&status, 3) && !names_node(&status, 7), "member 1, voter 3, not 7");
        assert!(text.starts_with("node 1, split into 2 groups (1 conversation shards):\n"), "{text}");
        assert!(text.contains("  group 3 (conversations 0): follower here, leader none, term 2, applied 9 of 10 (committed 10), leader changes 2, letters in flight 4 (retries 7), voters [1,2,3]\n"), "{text}");
        let mut quiet = status.clone();
        quiet["groups"][1]["quiet"] = serde_json::json!("following");
        assert!(describe(&quiet).contains("voters [1,2,3], quiet (waiting for beats)\n"), "{}", describe(&quiet));
        assert!(text.ends_with("  member 1 at 127.0.0.1:9002: voter\n"), "{text}");
    }

    #[test]
    fn the_documented_example_configuration_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let config = NodeConfig::read(&path).expect("deploy/node.example.toml stays a valid configuration");
        assert_eq!(config.id, 1);
        assert_eq!(config.members.len(), 3);
        assert!(config.bootstraps(), "the lowest id makes the first admin");
        assert_eq!(config.raft_addr.to_string(), config.members[0].raft_addr);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.example.toml");
        let gateway = GatewayFileConfig::read(&path).expect("deploy/gateway.example.toml stays a valid configuration");
        assert_eq!(gateway.name, "gateway-a");
        assert_eq!(gateway.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn init_refuses_ports_two_listeners_of_one_host_would_share() {
        let dir = tempfile::tempdir().unwrap();
        let plan = |public_port: u16, private_port: u16, gateway_public_port: u16, hosts: Vec<String>| InitPlan {
            dir: dir.path().join("c"),
            nodes: 3,
            hosts,
            public_port,
            private_port,
            raft_port: 9002,
            port_step: 10,
            gateways: 1,
            gateway_public_port,
            gateway_private_port: 7001,
            shards: None,
        };
        let one = vec!["127.0.0.1".to_string()];
        // Node 2's public port is node 1's private one.
        let refused = init(&plan(8080, 8090, 7000, one.clone())).unwrap_err().to_string();
        assert!(refused.contains("node 1's private port and node 2's public port would both be 127.0.0.1:8090"), "{refused}");
        // A gateway's port is a node's.
        let refused = init(&plan(8080, 8081, 8100, one)).unwrap_err().to_string();
        assert!(refused.contains("node 3's public port and gateway-a's public port would both be 127.0.0.1:8100"), "{refused}");
        assert!(!dir.path().join("c").exists(), "nothing written");
        // On hosts of their own, nodes share port numbers.
        let hosts = vec!["10.0.0.1".to_string(), "10.0.0.2".to_string(), "10.0.0.3".to_string()];
        init(&plan(8080, 8081, 7000, hosts)).expect("laid out");
    }

    #[test]
    fn init_lays_out_a_cluster_whose_files_read_back_and_refuses_to_do_it_twice() {
        let dir = tempfile::tempdir().unwrap();
        let plan = InitPlan {
            dir: dir.path().join("c"),
            nodes: 3,
            hosts: vec!["127.0.0.1".into()],
            public_port: 9000,
            private_port: 9001,
            raft_port: 9002,
            port_step: 10,
            gateways: 2,
            gateway_public_port: 8000,
            gateway_private_port: 8001,
            shards: None,
        };
        let files = init(&plan).unwrap();
        assert_eq!(files.len(), 5);
        let (nodes, gateways) = files.split_at(3);
        for (g, file) in gateways.iter().enumerate() {
            let gateway = GatewayFileConfig::read(file).unwrap();
            assert_eq!(gateway.name, gateway_name(g as u64));
            assert_eq!(
                (gateway.public_addr.port(), gateway.private_addr.port()),
                (8000 + 10 * g as u16, 8001 + 10 * g as u16)
            );
            assert_eq!(gateway.members.len(), 3);
            assert!(gateway
                .certs_dir
                .join(format!("{}.pem", gateway.name))
                .exists());
        }
        let configs: Vec<NodeConfig> = nodes.iter().map(|f| NodeConfig::read(f).unwrap()).collect();
        for (i, config) in configs.iter().enumerate() {
            let step = 10 * i as u16;
            assert_eq!(config.id, i as u64 + 1);
            assert_eq!(config.public_addr.port(), 9000 + step);
            assert_eq!(config.private_addr.port(), 9001 + step);
            assert_eq!(config.raft_addr.port(), 9002 + step);
            assert_eq!(config.members[i].raft_addr, config.raft_addr.to_string(), "each node is listed where it listens");
            assert_eq!(config.bootstraps(), i == 0);
            assert!(config.certs_dir.join(format!("node-{}.pem", i + 1)).exists());
            assert!(config.token_key.exists());
        }
        let lists: Vec<Vec<(u64, String)>> = configs.iter().map(|c| c.members.iter().map(|m| (m.id, m.raft_addr.clone())).collect()).collect();
        assert!(lists.windows(2).all(|w| w[0] == w[1]), "every node starts the group with the same members");
        let again = init(&plan).unwrap_err().to_string();
        assert!(again.contains("already holds a cluster"), "{again}");
    }

    #[test]
    fn add_node_lays_out_the_next_id_on_free_ports_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("c");
        let plan = InitPlan { dir: cluster.clone(), nodes: 3, hosts: vec!["127.0.0.1".into()], public_port: 9000, private_port: 9001, raft_port: 9002, port_step: 10, gateways: 0, gateway_public_port: 0, gateway_private_port: 0, shards: None };
        init(&plan).unwrap();
        let path = add_node(&cluster, None).unwrap();
        let config = NodeConfig::read(&path).unwrap();
        assert_eq!(config.id, 4);
        assert!(config.join, "a node added later joins, it does not start the group");
        assert!(!config.bootstraps());
        assert_eq!((config.public_addr.port(), config.private_addr.port(), config.raft_addr.port()), (9030, 9031, 9032));
        assert_eq!(config.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert!(config.certs_dir.join("node-4.key").exists());
        // On a host of its own it takes the first node's ports.
        let other = add_node(&cluster, Some("10.0.0.9")).unwrap();
        let other = NodeConfig::read(&other).unwrap();
        assert_eq!(other.id, 5);
        assert_eq!(other.public_addr.to_string(), "10.0.0.9:9000");
        // Node 5 removed and its configuration deleted: its id is not given again (its
        // certificate, issued here, still names it).
        std::fs::remove_file(cluster.join("node-5.toml")).unwrap();
        let next = NodeConfig::read(&add_node(&cluster, None).unwrap()).unwrap();
        assert_eq!(next.id, 6, "a removed node's id is never reused");
        assert!(format!("{:#}", add_node(&dir.path().join("missing"), None).unwrap_err()).contains("read"));
    }

    #[test]
    fn a_configuration_that_cannot_form_a_cluster_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| {
            let path = dir.path().join("node.toml");
            std::fs::write(&path, text).unwrap();
            format!("{:#}", NodeConfig::read(&path).unwrap_err())
        };
        let head = "data_dir = \"d\"\npublic_addr = \"127.0.0.1:1\"\nprivate_addr = \"127.0.0.1:2\"\nraft_addr = \"127.0.0.1:3\"\ncerts_dir = \"c\"\ntoken_key = \"k\"\n";
        let not_member = write(&format!("id = 4\n{head}[[members]]\nid = 1\nraft_addr = \"127.0.0.1:3\"\n"));
        assert!(not_member.contains("this node's id 4 is not among `members`"), "{not_member}");
        let twice = write(&format!("id = 1\n{head}[[members]]\nid = 1\nraft_addr = \"127.0.0.1:3\"\n[[members]]\nid = 1\nraft_addr = \"127.0.0.1:4\"\n"));
        assert!(twice.contains("member id 1 is listed twice"), "{twice}");
        let bad_addr = write(&format!("id = 1\n{head}[[members]]\nid = 1\nraft_addr = \"node-one\"\n"));
        assert!(bad_addr.contains("raft_addr \"node-one\""), "{bad_addr}");
        let unknown = write(&format!("id = 1\nport = 5\n{head}[[members]]\nid = 1\nraft_addr = \"127.0.0.1:3\"\n"));
        assert!(unknown.contains("unknown field `port`"), "{unknown}");
        let empty = write(&format!("id = 1\n{head}members = []\n"));
        assert!(empty.contains("`members` is empty"), "{empty}");
    }
}
