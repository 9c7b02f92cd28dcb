//! `switchboard`: run a node, a local dev cluster, make certificates, or load-test.

mod bench;
mod bench_channels;
mod bench_cluster;
mod bench_live;
mod bench_routing;
mod bench_split;
mod bootstrap;
mod cluster;
mod cutover;
mod demo;
mod groups;
mod outbox;
mod placement;
mod remote;
mod server;
mod split;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use server::NodeOptions;

/// mimalloc instead of glibc's malloc: under load the node spent a fifth of its CPU in
/// glibc's allocator and its arena locks (docs/benchmarks.md, issue 8). mimalloc also
/// gives large blocks back when freed, as each argon2 check's 19 MiB must be (glibc
/// needed its mmap threshold fixed for that; the edge test of 400 logins checks it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Clustered real-time routing core for contact centers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A complete local switchboard on an embedded store, with a demo configuration.
    Dev(DevArgs),
    /// Run one node (with its gateway listeners in the same process), alone or as a
    /// member of a cluster (`--config node.toml`, from `switchboard cluster init`).
    Node(NodeArgs),
    /// Lay out a cluster (`init`) and look at one (`status`).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Run a standalone gateway: it holds clients' connections and relays them to the
    /// cluster's members over QUIC (mutual TLS).
    Gateway(GatewayArgs),
    /// Create the cluster CA and member certificates.
    Certs(CertsArgs),
    /// Drive client and operator sessions over real sockets and report latency.
    Bench(bench::BenchArgs),
    /// Read one mail from stdin and write what it holds to stdout: the process the
    /// SMTP listener starts for each mail, so that a mail the parser takes very long or
    /// much memory over is stopped with its process (docs/channel-api.md).
    #[command(name = "read-mail", hide = true)]
    ReadMail,
}

#[derive(Args, Clone)]
struct Listeners {
    /// Where the data (Raft log, records, snapshots, certificates, token key) lives.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Public listener: web chat page and client WebSocket.
    #[arg(long, default_value = "127.0.0.1:8080")]
    public_addr: SocketAddr,
    /// Private listener: operator WebSocket, REST, /metrics, /openapi.json.
    #[arg(long, default_value = "127.0.0.1:8081")]
    private_addr: SocketAddr,
    /// QUIC listener for Raft traffic between nodes (mutual TLS).
    #[arg(long, default_value = "127.0.0.1:0")]
    raft_addr: SocketAddr,
    /// SMTP listener taking email channels' inbound mail (off when not given).
    #[arg(long)]
    smtp_addr: Option<SocketAddr>,
    /// Extra origins allowed to open the client WebSocket (a site embedding the chat).
    #[arg(long = "client-origin")]
    client_origins: Vec<String>,
    /// Extra origins allowed to open the operator WebSocket.
    #[arg(long = "staff-origin")]
    staff_origins: Vec<String>,
    /// Raft entries between state snapshots (the log before them is purged).
    #[arg(long, default_value_t = switchboard_raft::DEFAULT_SNAPSHOT_EVERY)]
    snapshot_every: u64,
    /// How often the leader deletes closed conversations past their channel's
    /// retention (up to 500 each time), in seconds.
    #[arg(long, default_value_t = 60)]
    retention_check_s: u64,
    /// Seconds an attachment file must have been on disk before the node may take it
    /// for a stray and give its space back: one no record names, or on a split node a
    /// file of a conversation shard it no longer holds (once every holder has it).
    /// Longer than any upload takes to commit (900 at the least).
    #[arg(long, default_value_t = 3600)]
    stray_files_after_s: u64,
    /// Seconds between two looks for stray attachment files.
    #[arg(long, default_value_t = 600)]
    stray_sweep_every_s: u64,
    /// Seconds an online operator may be without a live operator socket (a page
    /// reload, a network blip) before they are set away with the reason `disconnected`
    /// and their pending offers withdrawn. Applied by whichever node leads.
    #[arg(long, default_value_t = 30)]
    presence_grace_s: u64,
    #[command(flatten)]
    edge: EdgeArgs,
}

/// Limits of the public edge (`docs/security.md`). Behind a reverse proxy every
/// customer shares its address: raise the per-address ones there.
#[derive(Args, Clone)]
struct EdgeArgs {
    /// Conversations one client address may start per minute.
    #[arg(long, default_value_t = 30)]
    starts_per_minute: u32,
    /// Client messages one address may send per minute, across all its sockets.
    #[arg(long, default_value_t = 120)]
    client_messages_per_minute: u32,
    /// Client messages one conversation may take per minute, from all its sockets.
    #[arg(long, default_value_t = 60)]
    conversation_messages_per_minute: u32,
    /// Tokens a minute for the history one address's `resume` frames replay, across all
    /// its sockets (a token per 200 entries replayed).
    #[arg(long, default_value_t = 60)]
    client_resumes_per_minute: u32,
    /// Client WebSockets one address may hold open.
    #[arg(long, default_value_t = 32)]
    client_sockets_per_address: u32,
    /// Attachment bytes one client address may upload per hour.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    upload_bytes_per_hour: u64,
    /// Uploads in progress from one client address.
    #[arg(long, default_value_t = 4)]
    uploads_per_address: u32,
    /// Uploads in progress on the node.
    #[arg(long, default_value_t = 32)]
    uploads: u32,
    /// Provider webhook calls with a wrong secret or signature one address may make per
    /// minute; past that its webhook calls get 429 before their body is read.
    #[arg(long, default_value_t = 30)]
    bad_hooks_per_minute: u32,
    /// Open TCP connections per listener.
    #[arg(long, default_value_t = 10_000)]
    max_connections: u32,
    /// Open TCP connections per client address, per listener.
    #[arg(long, default_value_t = 256)]
    max_connections_per_address: u32,
    /// Time to send a request's headers; also the idle time between kept-alive requests.
    #[arg(long, default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Time to handle one request, its body included (uploads too).
    #[arg(long, default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// Time a write may make no progress (a peer that does not read) before the
    /// connection is closed.
    #[arg(long, default_value_t = 10_000)]
    write_timeout_ms: u64,
    /// Server WebSocket ping interval; a peer silent for two intervals is dropped.
    #[arg(long, default_value_t = 30_000)]
    ping_interval_ms: u64,
    /// A reverse proxy's address or network (`10.0.0.0/8`), repeatable: requests from
    /// it count against the address its `X-Forwarded-For` names (docs/security.md).
    #[arg(long = "trusted-proxy", value_name = "ADDRESS_OR_NETWORK")]
    trusted_proxies: Vec<switchboard_gateway::listener::ProxyNet>,
}

impl EdgeArgs {
    fn connection_limits(&self) -> switchboard_gateway::listener::ConnectionLimits {
        switchboard_gateway::listener::ConnectionLimits {
            header_timeout: ms(self.header_timeout_ms),
            write_timeout: ms(self.write_timeout_ms),
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }

    /// The same limits as command-line flags, for the node processes `dev --nodes`
    /// starts: what `dev` was given, each node gets.
    fn to_flags(&self) -> Vec<String> {
        let pairs: [(&str, u64); 15] = [
            ("--starts-per-minute", self.starts_per_minute.into()),
            ("--client-messages-per-minute", self.client_messages_per_minute.into()),
            ("--conversation-messages-per-minute", self.conversation_messages_per_minute.into()),
            ("--client-resumes-per-minute", self.client_resumes_per_minute.into()),
            ("--client-sockets-per-address", self.client_sockets_per_address.into()),
            ("--upload-bytes-per-hour", self.upload_bytes_per_hour),
            ("--uploads-per-address", self.uploads_per_address.into()),
            ("--uploads", self.uploads.into()),
            ("--bad-hooks-per-minute", self.bad_hooks_per_minute.into()),
            ("--max-connections", self.max_connections.into()),
            ("--max-connections-per-address", self.max_connections_per_address.into()),
            ("--header-timeout-ms", self.header_timeout_ms),
            ("--request-timeout-ms", self.request_timeout_ms),
            ("--write-timeout-ms", self.write_timeout_ms),
            ("--ping-interval-ms", self.ping_interval_ms),
        ];
        let mut flags: Vec<String> = pairs.into_iter().flat_map(|(flag, value)| [flag.to_string(), value.to_string()]).collect();
        for net in &self.trusted_proxies {
            flags.extend(["--trusted-proxy".to_string(), net.to_string()]);
        }
        flags
    }
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    listeners: Listeners,
    /// Run a local cluster of this many node processes (each on its own ports, 10
    /// apart from the given ones) instead of one node in this process.
    #[arg(long, default_value_t = 1)]
    nodes: u64,
    /// Split the state as ADR 0006 lays out a cluster: a metadata group, a routing
    /// shard and this many conversation shards, each its own Raft group (operator desks
    /// follow it with protocol 2). One node: one group unless given. With `--nodes`:
    /// 4 unless given; 0 keeps one group.
    #[arg(long)]
    shards: Option<u64>,
}

/// Conversation shards of a cluster made now, unless `--shards` says otherwise (0: one
/// group holds everything, as clusters made before the split became the default).
const DEFAULT_SHARDS: u64 = 4;

/// What `--shards` asks of a cluster: `None` for one group.
fn cluster_shards(asked: Option<u64>) -> Option<u64> {
    match asked {
        None => Some(DEFAULT_SHARDS),
        Some(0) => None,
        Some(n) => Some(n),
    }
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Write the CA, node certificates, the shared token key and one `node-<id>.toml`
    /// per node into a folder; start each node with `switchboard node --config`.
    Init(InitArgs),
    /// A node's view of the cluster: leader, term, members and how far each is.
    Status(StatusArgs),
    /// Write the configuration and certificate of one more node (next free id, joins on
    /// its first start) into the folder `init` made.
    AddNode(AddNodeArgs),
    /// Remove a node from the running cluster (as an admin); stop it afterwards.
    RemoveNode(RemoveNodeArgs),
    /// Balance where a split cluster's groups vote and lead, now (as an admin).
    Rebalance(RebalanceArgs),
    /// Move a stopped node's data folder of one group into the split (the metadata
    /// group, the routing shard and N conversation shards), keeping the old folder.
    Split(SplitArgs),
}

#[derive(Args)]
struct SplitArgs {
    /// The stopped node's data folder (`data_dir` of its file, or `dev --data-dir`).
    #[arg(long, default_value = "./data")]
    data: PathBuf,
    /// The node's id (`node_id` of its file; 1 for `dev`).
    #[arg(long, default_value_t = 1)]
    node_id: u64,
    /// Conversation shards (1 to 64), fixed from now on.
    #[arg(long, default_value_t = 4)]
    shards: u64,
}

#[derive(Args)]
struct RebalanceArgs {
    /// Any member's private listener.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    /// An admin login.
    #[arg(long, default_value = "admin")]
    login: String,
    /// A file holding the admin's password (else $SWITCHBOARD_PASSWORD).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Print the cluster as JSON (with the steps taken) instead of text.
    #[arg(long)]
    json: bool,
}

fn admin_password(file: &Option<PathBuf>) -> anyhow::Result<String> {
    match file {
        Some(path) => Ok(std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?.trim().to_owned()),
        None => std::env::var("SWITCHBOARD_PASSWORD").map_err(|_| anyhow::anyhow!("give --password-file or set SWITCHBOARD_PASSWORD")),
    }
}

#[derive(Args)]
struct AddNodeArgs {
    /// The folder `cluster init` made (it holds certs/ca.key).
    #[arg(long, default_value = "./cluster")]
    dir: PathBuf,
    /// IP address of the new node (node 1's by default).
    #[arg(long)]
    host: Option<String>,
}

#[derive(Args)]
struct RemoveNodeArgs {
    /// Any member's private listener.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    /// The node to remove.
    #[arg(long)]
    id: u64,
    /// An admin login.
    #[arg(long, default_value = "admin")]
    login: String,
    /// A file holding the admin's password (else $SWITCHBOARD_PASSWORD).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

#[derive(Args)]
struct InitArgs {
    /// Folder to write into (must not hold a cluster yet).
    #[arg(long, default_value = "./cluster")]
    dir: PathBuf,
    /// How many nodes. Each group of a split cluster votes on three of them, so any one
    /// node may fail; one group (`--shards 0`) votes on all: 3 tolerate one failure, 5 two.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// IP address of every node (one for all: ports are then 10 apart per node).
    #[arg(long = "host", default_values_t = ["127.0.0.1".to_string()])]
    hosts: Vec<String>,
    #[arg(long, default_value_t = 8080)]
    public_port: u16,
    #[arg(long, default_value_t = 8081)]
    private_port: u16,
    #[arg(long, default_value_t = 8082)]
    raft_port: u16,
    /// Standalone gateways to lay out (gateway-a, gateway-b…), on the first host.
    #[arg(long, default_value_t = 1)]
    gateways: u64,
    /// The first gateway's public port (the next ones 10 above).
    #[arg(long, default_value_t = 8000)]
    gateway_public_port: u16,
    /// The first gateway's private port.
    #[arg(long, default_value_t = 8001)]
    gateway_private_port: u16,
    /// Split the cluster's state as ADR 0006 lays it out: a metadata group, a routing
    /// shard and this many conversation shards (1 to 64); the metadata group and the
    /// routing shard are followed by every node and voted on by three, each conversation
    /// shard is kept by its three voters only; fixed for the cluster's life. 4 unless given;
    /// 0: one group holds everything, voted on by every node.
    #[arg(long)]
    shards: Option<u64>,
}

#[derive(Args)]
struct StatusArgs {
    /// A node's private listener.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    /// Print the JSON of `GET /api/cluster` (for scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    listeners: Listeners,
    /// This node's id in the cluster.
    #[arg(long, default_value_t = 1)]
    node_id: u64,
    /// Login of the admin created on first start (when the store has no users).
    #[arg(long, default_value = "admin")]
    admin_login: String,
    /// Serve `POST /api/chaos/crash-actor` (admin only) for chaos drills; `dev` always does.
    #[arg(long)]
    enable_chaos_drills: bool,
    /// A cluster member's configuration file (from `switchboard cluster init`); it
    /// replaces --node-id, --data-dir and the listener addresses. Edge limits still come
    /// from the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Load the demo configuration and logins on first start (what `dev --nodes` asks of
    /// its first node).
    #[arg(long, hide = true)]
    demo: bool,
}

#[derive(Args)]
struct GatewayArgs {
    /// The gateway's file (`cluster init` writes gateway-a.toml; fields in
    /// deploy/gateway.example.toml).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    edge: EdgeArgs,
}

#[derive(Args)]
struct CertsArgs {
    /// Folder holding ca.pem / ca.key and the member certificates.
    #[arg(long, default_value = "./data/certs")]
    dir: PathBuf,
    /// Members to issue certificates for (node-1, gateway-a…).
    #[arg(long = "name", default_values_t = ["node-1".to_string()])]
    names: Vec<String>,
    /// Extra DNS names or IPs to put in each certificate.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// What the certificates let their holders do: `node` (Raft and client work) or
    /// `gateway` (relaying client work to members, and asking where the groups are).
    #[arg(long, default_value = "node", value_parser = ["node", "gateway"])]
    role: String,
}

/// A duration flag in milliseconds; zero would disable a bound, so it is at least 1 ms.
fn ms(millis: u64) -> std::time::Duration {
    std::time::Duration::from_millis(millis.max(1))
}

fn options(listeners: Listeners, node_id: u64, chaos_drills: bool) -> NodeOptions {
    let edge = listeners.edge.clone();
    NodeOptions {
        node_id,
        data_dir: listeners.data_dir,
        raft_addr: listeners.raft_addr,
        public_addr: listeners.public_addr,
        private_addr: listeners.private_addr,
        smtp_addr: listeners.smtp_addr,
        client_origins: listeners.client_origins,
        staff_origins: listeners.staff_origins,
        snapshot_every: listeners.snapshot_every,
        retention_every: std::time::Duration::from_secs(listeners.retention_check_s.max(1)),
        stray_files_after: std::time::Duration::from_secs(listeners.stray_files_after_s.max(1)),
        stray_sweep_every: std::time::Duration::from_secs(listeners.stray_sweep_every_s.max(1)),
        presence_grace: std::time::Duration::from_secs(listeners.presence_grace_s),
        budgets: switchboard_gateway::Budgets {
            starts_per_minute: edge.starts_per_minute,
            client_messages_per_minute: edge.client_messages_per_minute,
            conversation_messages_per_minute: edge.conversation_messages_per_minute,
            client_resumes_per_minute: edge.client_resumes_per_minute,
            client_sockets_per_address: edge.client_sockets_per_address,
            upload_bytes_per_hour: edge.upload_bytes_per_hour,
            uploads_per_address: edge.uploads_per_address,
            uploads: edge.uploads,
            bad_hooks_per_minute: edge.bad_hooks_per_minute,
        },
        connections: edge.connection_limits(),
        request_timeout: ms(edge.request_timeout_ms),
        ping_interval: ms(edge.ping_interval_ms),
        chaos_drills,
        members: Vec::new(),
        certs_dir: None,
        token_key: None,
        join: false,
    }
}

/// A cluster member's options: its configuration file, and the edge limits of the flags.
fn member_options(config: cluster::NodeConfig, listeners: Listeners, chaos_drills: bool) -> NodeOptions {
    let mut options = options(listeners, config.id, chaos_drills || config.enable_chaos_drills);
    options.data_dir = config.data_dir;
    options.public_addr = config.public_addr;
    options.private_addr = config.private_addr;
    options.raft_addr = config.raft_addr;
    if config.smtp_addr.is_some() {
        options.smtp_addr = config.smtp_addr;
    }
    // The file's origins and the flags' together.
    options.client_origins.extend(config.client_origins);
    options.staff_origins.extend(config.staff_origins);
    if let Some(every) = config.snapshot_every {
        options.snapshot_every = every;
    }
    if let Some(s) = config.retention_check_s {
        options.retention_every = std::time::Duration::from_secs(s.max(1));
    }
    if let Some(s) = config.stray_files_after_s {
        options.stray_files_after = std::time::Duration::from_secs(s.max(1));
    }
    if let Some(s) = config.stray_sweep_every_s {
        options.stray_sweep_every = std::time::Duration::from_secs(s.max(1));
    }
    if let Some(s) = config.presence_grace_s {
        options.presence_grace = std::time::Duration::from_secs(s);
    }
    options.members = config.members.into_iter().map(|m| (m.id, m.raft_addr)).collect();
    options.certs_dir = Some(config.certs_dir);
    options.token_key = Some(config.token_key);
    options.join = config.join;
    options
}

async fn run_until_signal(node: server::RunningNode) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("switchboard: stopping");
    node.stop().await;
    Ok(())
}

fn print_listeners(node: &server::RunningNode) {
    println!("public listener: http://{}  (demo site with the chat widget at /, /widget.js, client socket at /ws/client)", node.public_addr);
    println!("private listener: http://{}  (workstation at /, REST at /api, /metrics, /openapi.json, operator and supervisor sockets at /ws/operator, /ws/supervisor)", node.private_addr);
    if let Some(smtp) = node.smtp_addr {
        println!("smtp listener: smtp://{smtp}  (inbound mail for email channels' addresses)");
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes > 1 {
        return dev_cluster(args).await;
    }
    let data_dir = args.listeners.data_dir.clone();
    let node = match args.shards.filter(|n| *n > 0) {
        Some(shards) => split::start(options(args.listeners, 1, true), shards).await?,
        None => server::start(options(args.listeners, 1, true)).await?,
    };
    let logins = demo::ensure(&node, &data_dir).await?;
    node.gateway.set_configured();
    // "ready" means what /readyz says: on a split node the demo's directory must have
    // reached the conversation shards before a visitor's start can find its channel.
    let patience = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node.gateway.ready() {
        if tokio::time::Instant::now() >= patience {
            anyhow::bail!("the node was not ready 30 s after it started; see its log");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    println!("switchboard dev: node 1 ready, data in {}", data_dir.display());
    print_listeners(&node);
    println!("demo logins (also in {}):", data_dir.join(demo::LOGINS_FILE).display());
    for (login, password) in &logins {
        println!("  {login:<11} {password}");
    }
    println!("ready");
    run_until_signal(node).await
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let (options, bootstraps, shards) = match &args.config {
        Some(path) => {
            let config = cluster::NodeConfig::read(path)?;
            let (bootstraps, shards) = (config.bootstraps(), config.shards);
            (member_options(config, args.listeners, args.enable_chaos_drills), bootstraps, shards)
        }
        None => (options(args.listeners, args.node_id, args.enable_chaos_drills), true, None),
    };
    let (data_dir, node_id) = (options.data_dir.clone(), options.node_id);
    let node = match shards {
        Some(shards) => split::start(options, shards).await?,
        None => server::start(options).await?,
    };
    if args.demo {
        // Its upserts are idempotent: one lost to a leader change at a cluster's start is
        // asked again.
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match demo::ensure(&node, &data_dir).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < until => {
                    tracing::info!(error = %e, "loading the demo did not go through; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        }
    } else if bootstraps {
        if let Some(path) = bootstrap::ensure_admin(&node, &data_dir, &args.admin_login).await? {
            println!("first start: created admin login '{}'; its password is in {}", args.admin_login, path.display());
        }
    }
    node.gateway.set_configured();
    print_listeners(&node);
    // "ready" means what /readyz says: on a split node every shard it holds serves and
    // the directory has reached them, so a visitor's start finds its channel. The node
    // serves meanwhile (a member whose shards wait for a quorum says so when they have
    // one).
    let gateway = node.gateway.clone();
    tokio::spawn(async move {
        let mut told = false;
        let since = tokio::time::Instant::now();
        while !gateway.ready() {
            if !told && since.elapsed() >= std::time::Duration::from_secs(10) {
                told = true;
                tracing::warn!("not ready after 10 s: a group this node holds has no leader yet, or the directory has not reached it (see /readyz); serving meanwhile");
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        println!("switchboard node {node_id} ready");
        println!("ready");
    });
    run_until_signal(node).await
}

/// `switchboard gateway --config`: a standalone gateway until SIGTERM or Ctrl-C.
async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let config = cluster::GatewayFileConfig::read(&args.config)?;
    let identity = switchboard_raft::tls::existing_member(&config.certs_dir, &config.name)
        .with_context(|| {
            format!(
                "the certificate of {} in {}",
                config.name,
                config.certs_dir.display()
            )
        })?;
    let options = switchboard_gateway::standalone::Options {
        public_addr: config.public_addr,
        private_addr: config.private_addr,
        identity,
        members: config
            .members
            .iter()
            .map(|m| (m.id, m.raft_addr.clone()))
            .collect(),
        client_limits: switchboard_gateway::Limits::CLIENT,
        operator_limits: switchboard_gateway::Limits::OPERATOR,
        connections: args.edge.connection_limits(),
        ping_interval: ms(args.edge.ping_interval_ms),
        request_timeout: ms(args.edge.request_timeout_ms),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let running = switchboard_gateway::standalone::start(options, stop_rx).await?;
    println!("switchboard gateway {} ready", config.name);
    println!("public listener: http://{}", running.public_addr);
    println!("private listener: http://{}", running.private_addr);
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("switchboard gateway: stopping");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), running.task).await;
    Ok(())
}

async fn cluster_cmd(cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Init(args) => {
            let plan = cluster::InitPlan {
                dir: args.dir.clone(),
                nodes: args.nodes,
                hosts: args.hosts,
                public_port: args.public_port,
                private_port: args.private_port,
                raft_port: args.raft_port,
                port_step: 10,
                gateways: args.gateways,
                gateway_public_port: args.gateway_public_port,
                gateway_private_port: args.gateway_private_port,
                shards: cluster_shards(args.shards),
            };
            for path in cluster::init(&plan)? {
                println!("wrote {}", path.display());
            }
            println!("certificates in {}, shared token key in {}", args.dir.join("certs").display(), args.dir.join("token.key").display());
            println!("start every node with `switchboard node --config <its file>`; the first admin's password appears in node 1's data folder");
            if args.gateways > 0 {
                println!("start each gateway with `switchboard gateway --config <its file>`: clients connect to the gateways");
            }
            println!("keep certs/ca.key off the nodes once every certificate is issued");
            Ok(())
        }
        ClusterCmd::AddNode(args) => {
            let path = cluster::add_node(&args.dir, args.host.as_deref())?;
            println!("wrote {}", path.display());
            println!("start it with `switchboard node --config {}`: it asks the members to admit it, catches up, then votes", path.display());
            Ok(())
        }
        ClusterCmd::RemoveNode(args) => {
            let password = admin_password(&args.password_file)?;
            // A mistyped id is a no-op for the cluster: said so, lest the wrong
            // process be stopped.
            let member = cluster::status(&args.addr).await.map(|s| cluster::names_node(&s, args.id)).unwrap_or(true);
            // The id is recorded as removed before the membership changes (routing rules
            // 19): a removal that fails after that is finished by asking again.
            let status = cluster::remove_node(&args.addr, args.id, &args.login, &password)
                .await
                .with_context(|| format!("node {} may be recorded as removed already; run `cluster remove-node` again to finish its removal", args.id))?;
            if member {
                println!("node {} removed; stop its process", args.id);
            } else {
                println!("node {} is not a member of the cluster: its membership was not changed, and (from routing rules 19) the id is recorded as removed, so no node joins under it (a layout given up, a retired machine's files)", args.id);
            }
            print!("{}", cluster::describe(&status));
            Ok(())
        }
        ClusterCmd::Rebalance(args) => {
            let password = admin_password(&args.password_file)?;
            let status = cluster::rebalance(&args.addr, &args.login, &password).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let steps: Vec<&str> = status["steps"].as_array().map(|s| s.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
                if steps.is_empty() {
                    println!("balanced already: no step taken");
                }
                for step in steps {
                    println!("{step}");
                }
                print!("{}", cluster::describe(&status));
            }
            Ok(())
        }
        ClusterCmd::Split(args) => {
            let data = args.data.clone();
            let done = tokio::task::spawn_blocking(move || cutover::split_folder(&args.data, args.node_id, args.shards)).await??;
            if done.finished_interrupted {
                println!("finished the cut-over of {} a crash had interrupted; the old folder is kept as {}", data.display(), done.kept.display());
                println!("start the node with `shards = {}` in its file (or `switchboard dev --shards {}`)", done.shards, done.shards);
                return Ok(());
            }
            println!("read {} records of the group, applied up to entry {}", done.read, done.at);
            for (group, records) in &done.records {
                println!("group {group}: {records} records");
            }
            println!("the old folder is kept as {}; remove it once the split node runs", done.kept.display());
            println!("start the node with `shards = {}` in its file (or `switchboard dev --shards {}`); other members of the old cluster join it anew (`join = true`, `shards = {}`, an empty data folder): never start them on their old folders, which would make the old cluster again", done.shards, done.shards, done.shards);
            Ok(())
        }
        ClusterCmd::Status(args) => {
            let status = cluster::status(&args.addr).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", cluster::describe(&status));
            }
            Ok(())
        }
    }
}

/// `dev --nodes N`: a local cluster of N node processes and a standalone gateway, laid
/// out once in `<data_dir>/cluster`; node 1 loads the demo. The gateway takes the
/// listeners `dev` was given, node i the ports 10·i above. Stops them all on Ctrl-C.
async fn dev_cluster(args: DevArgs) -> anyhow::Result<()> {
    let listeners = &args.listeners;
    if listeners.public_addr.port() == 0 || listeners.private_addr.port() == 0 {
        anyhow::bail!("dev --nodes needs fixed --public-addr and --private-addr ports: the gateway takes them, node i the ones 10·i above");
    }
    let dir = listeners.data_dir.join("cluster");
    let existing = (1..=64u64)
        .take_while(|i| dir.join(format!("node-{i}.toml")).exists())
        .count() as u64;
    if existing == 0 {
        let shift = |port: u16| {
            port.checked_add(10)
                .ok_or_else(|| anyhow::anyhow!("port {port} leaves no room for the nodes above it"))
        };
        cluster::init(&cluster::InitPlan {
            dir: dir.clone(),
            nodes: args.nodes,
            hosts: vec![listeners.public_addr.ip().to_string()],
            public_port: shift(listeners.public_addr.port())?,
            private_port: shift(listeners.private_addr.port())?,
            raft_port: shift(if listeners.raft_addr.port() == 0 {
                listeners.public_addr.port().saturating_add(2)
            } else {
                listeners.raft_addr.port()
            })?,
            port_step: 10,
            gateways: 1,
            gateway_public_port: listeners.public_addr.port(),
            gateway_private_port: listeners.private_addr.port(),
            shards: cluster_shards(args.shards),
        })?;
    } else if existing != args.nodes {
        anyhow::bail!(
            "{} holds a cluster of {existing} nodes, not {}: give `dev` another --data-dir",
            dir.display(),
            args.nodes
        );
    }
    let gateway_file = dir.join(format!("{}.toml", cluster::gateway_name(0)));
    let gateway_config = if gateway_file.exists() {
        Some(cluster::GatewayFileConfig::read(&gateway_file)?)
    } else {
        None
    };
    let processes = args.nodes as usize + usize::from(gateway_config.is_some());
    let name = |i: usize| {
        if i < args.nodes as usize {
            format!("node {}", i + 1)
        } else {
            "the gateway".to_string()
        }
    };
    let binary = std::env::current_exe().context("find the switchboard binary")?;
    let mut children = Vec::new();
    let mut configs = Vec::new();
    // Process i: node i+1, or the gateway after the nodes.
    let spawn = |i: usize| {
        let mut command = tokio::process::Command::new(&binary);
        if i < args.nodes as usize {
            command
                .arg("node")
                .arg("--config")
                .arg(dir.join(format!("node-{}.toml", i + 1)))
                .arg("--enable-chaos-drills");
            for origin in &listeners.client_origins {
                command.arg("--client-origin").arg(origin);
            }
            for origin in &listeners.staff_origins {
                command.arg("--staff-origin").arg(origin);
            }
            if i == 0 {
                command.arg("--demo");
            }
            // The node settings `dev` was given apply on every node.
            command
                .arg("--snapshot-every")
                .arg(listeners.snapshot_every.to_string())
                .arg("--retention-check-s")
                .arg(listeners.retention_check_s.to_string())
                .arg("--stray-files-after-s")
                .arg(listeners.stray_files_after_s.to_string())
                .arg("--stray-sweep-every-s")
                .arg(listeners.stray_sweep_every_s.to_string())
                .arg("--presence-grace-s")
                .arg(listeners.presence_grace_s.to_string());
        } else {
            command.arg("gateway").arg("--config").arg(&gateway_file);
        }
        // The limits `dev` was given apply on every process.
        command.args(listeners.edge.to_flags());
        command
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl(2) only, between fork and exec: a process gets SIGTERM when
        // `dev` dies, however it dies, so none outlives it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
            .spawn()
            .with_context(|| format!("start {}", name(i)))
    };
    for i in 1..=args.nodes {
        configs.push(cluster::NodeConfig::read(
            &dir.join(format!("node-{i}.toml")),
        )?);
    }
    for i in 0..processes {
        children.push(spawn(i)?);
    }
    // Ready when every node answers and agrees on a leader, node 1 has loaded the demo
    // (its /readyz turns 200 after that), every node has applied as far as node 1, and
    // the gateway is ready.
    let logins_path = configs[0].data_dir.join(demo::LOGINS_FILE);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for config in &configs {
            if let Ok(status) = cluster::status(&config.private_addr.to_string()).await {
                seen.push((status.get("leader").and_then(|l| l.as_u64()), applied_everywhere(&status)));
            }
        }
        let agreed = seen.len() == configs.len()
            && seen[0].0.is_some()
            && seen.iter().all(|(l, _)| *l == seen[0].0);
        // Each node has applied, in every group all nodes hold, as far as node 1.
        let caught_up = seen.len() == configs.len()
            && seen.iter().all(|(_, applied)| seen[0].1.iter().all(|(group, first)| applied.get(group).is_some_and(|a| a >= first)));
        let gateway_ready = match &gateway_config {
            Some(g) => cluster::ready(&g.private_addr.to_string()).await,
            None => true,
        };
        if agreed
            && caught_up
            && gateway_ready
            && cluster::ready(&configs[0].private_addr.to_string()).await
            && logins_path.exists()
        {
            break;
        }
        for (i, child) in children.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{} exited ({status}) before the cluster was ready; its log is above",
                    name(i)
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the cluster was not ready within 60 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let logins: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&logins_path)?)?;
    // Where `dev` alone keeps them, for scripts that read them there.
    switchboard_raft::files::write_private(
        &listeners.data_dir.join(demo::LOGINS_FILE),
        &std::fs::read(&logins_path)?,
    )?;
    println!(
        "switchboard dev: {} nodes ready, configuration in {}",
        args.nodes,
        dir.display()
    );
    for config in &configs {
        println!(
            "node {}: public http://{}  private http://{}  data {}",
            config.id,
            config.public_addr,
            config.private_addr,
            config.data_dir.display()
        );
    }
    match &gateway_config {
        Some(g) => {
            println!(
                "{}: public http://{}  private http://{}  (relays to the nodes over QUIC)",
                g.name, g.public_addr, g.private_addr
            );
            println!("public listener: http://{}  ({})", g.public_addr, g.name);
            println!("private listener: http://{}  ({})", g.private_addr, g.name);
        }
        None => {
            println!(
                "public listener: http://{}  (node 1)",
                configs[0].public_addr
            );
            println!(
                "private listener: http://{}  (node 1)",
                configs[0].private_addr
            );
        }
    }
    println!("every node serves the chat and the workstation too; `switchboard cluster status --addr <private>` shows the leader");
    println!("demo logins (also in {}):", logins_path.display());
    for (login, password) in &logins {
        println!("  {login:<11} {password}");
    }
    println!("ready");
    // A process that dies (a kill -9 drill, a crash) is started again after 2 s: the
    // others carry on meanwhile, and a node catches up when it is back.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut down: Vec<Option<tokio::time::Instant>> = vec![None; children.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {}
        }
        for (i, child) in children.iter_mut().enumerate() {
            if let Some(since) = down[i] {
                if since.elapsed() >= std::time::Duration::from_secs(2) {
                    *child = spawn(i)?;
                    down[i] = None;
                    println!("switchboard dev: {} started again", name(i));
                }
            } else if let Ok(Some(status)) = child.try_wait() {
                println!("switchboard dev: {} exited ({status}); the others go on, and it starts again in 2 s", name(i));
                down[i] = Some(tokio::time::Instant::now());
            }
        }
    }
    println!("switchboard: stopping");
    for child in &children {
        if let Some(pid) = child.id() {
            // SAFETY: a plain kill(2) of our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    for mut child in children {
        if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    Ok(())
}

/// What a node's `/api/cluster` says it applied, per group that every node holds: its
/// one group's on a cluster of one group (keyed 0 here); on a split one the metadata
/// group's and the routing shard's (a conversation shard is held by three nodes only).
fn applied_everywhere(status: &serde_json::Value) -> std::collections::BTreeMap<u64, u64> {
    match status.get("groups").and_then(|g| g.as_array()) {
        Some(groups) => groups
            .iter()
            .filter(|g| matches!(g["part"].as_str(), Some("directory" | "routing")))
            .filter_map(|g| Some((g["group"].as_u64()?, g["last_applied"].as_u64().unwrap_or(0))))
            .collect(),
        None => std::iter::once((0, status.get("last_applied").and_then(|a| a.as_u64()).unwrap_or(0))).collect(),
    }
}

fn certs(args: CertsArgs) -> anyhow::Result<()> {
    for name in &args.names {
        let role = if args.role == "gateway" { switchboard_raft::tls::Role::Gateway } else { switchboard_raft::tls::Role::Node };
        let identity = switchboard_raft::tls::ensure_member_as(&args.dir, name, role, &args.sans).with_context(|| format!("issue {name}"))?;
        println!("{name}: {} (key {})", identity.cert.display(), identity.key.display());
    }
    println!("cluster CA: {}", args.dir.join("ca.pem").display());
    Ok(())
}

/// Every socket is a file: a node holding tens of thousands of sessions needs more than
/// the usual soft limit of 1,024 open files. The soft limit is raised to the hard one
/// (what the administrator allows, e.g. systemd's `LimitNOFILE`).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            tracing::debug!(from = before, to = limit.rlim_max, "raised the open files limit");
        }
    }
}

/// Turns transparent huge pages off for this process (and the processes it starts).
/// The allocator asks for huge pages on its arenas and hands freed memory back to the
/// kernel; each fault on such an arena then zeroed a whole 2 MiB page, which was 12% of
/// the CPU of a saturated three-node cluster on two cores (`docs/benchmarks.md`,
/// "Huge pages"). `SWITCHBOARD_HUGE_PAGES=1` leaves them to the system's setting.
fn turn_off_huge_pages() {
    if std::env::var_os("SWITCHBOARD_HUGE_PAGES").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes a flag of
    // this process; a kernel that does not know it answers EINVAL, which is harmless.
    let refused = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) } != 0;
    if refused {
        tracing::debug!("the kernel refused to turn transparent huge pages off");
    }
}

extern "C" {
    // mimalloc's option calls (the library the `mimalloc` crate builds exports them).
    #[cfg(test)]
    fn mi_option_get(option: libc::c_int) -> libc::c_long;
    fn mi_option_set_default(option: libc::c_int, value: libc::c_long);
}

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sixteenth option; the test
/// below checks the number against the option mimalloc reads from its environment).
const MI_OPTION_PURGE_DELAY: libc::c_int = 15;

/// Lets the allocator give memory that was freed back to the kernel at once rather than
/// a second later (mimalloc 3's default). A node frees in bursts (a memtable flushed,
/// an actor's mailboxes): held for a second, that memory showed in its RSS, about a
/// tenth to a fifth of it in the million-message soak, with throughput the same within
/// the runs' noise (docs/benchmarks.md, "The soak after the actors' timers"). A delay
/// the operator set in the environment (`MIMALLOC_PURGE_DELAY`) is kept.
fn purge_freed_memory_at_once() {
    // SAFETY: sets the default of one of mimalloc's integer options, which applies only
    // if its environment did not set it; mimalloc reads it at each purge.
    unsafe { mi_option_set_default(MI_OPTION_PURGE_DELAY, 0) }
}

fn main() -> anyhow::Result<()> {
    purge_freed_memory_at_once();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sled=warn,fjall=warn,lsm_tree=warn,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Cmd::ReadMail = cli.command {
        return Ok(switchboard_adapters::email::read_one_mail(std::io::stdin().lock(), std::io::stdout().lock())?);
    }
    // Each inbound mail is read by a process of its own: this binary, however it was
    // started and even if its file was replaced since (`/proc/self/exe`), else as it
    // was found at start.
    match [Ok(PathBuf::from("/proc/self/exe")), std::env::current_exe()].into_iter().flatten().find(|exe| exe.exists()) {
        Some(exe) => switchboard_gateway::smtp::read_mails_in_processes(exe),
        None => tracing::warn!("this binary's path is unknown: inbound mail is parsed in the node's own process, without a time limit"),
    }
    raise_open_files_limit();
    turn_off_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Cmd::Dev(args) => dev(args).await,
            Cmd::Node(args) => node(args).await,
            Cmd::Cluster(cmd) => cluster_cmd(cmd).await,
            Cmd::Gateway(args) => gateway(args).await,
            Cmd::Certs(args) => certs(args),
            Cmd::Bench(args) => bench::run(args).await,
            Cmd::ReadMail => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `dev --nodes` hands its nodes parses back into the very same limits.
    #[test]
    fn edge_limits_given_to_dev_reach_its_nodes_unchanged() {
        let given = ["switchboard", "dev", "--nodes", "3", "--uploads", "7", "--ping-interval-ms", "1234", "--client-messages-per-minute", "999", "--bad-hooks-per-minute", "5", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"];
        let Cmd::Dev(dev) = Cli::parse_from(given).command else { panic!("not dev") };
        let mut node = vec!["switchboard".to_string(), "node".into(), "--config".into(), "node-1.toml".into()];
        node.extend(dev.listeners.edge.to_flags());
        let Cmd::Node(parsed) = Cli::try_parse_from(&node).expect("every flag is one `node` takes").command else { panic!("not node") };
        let (a, b) = (&dev.listeners.edge, &parsed.listeners.edge);
        assert_eq!((a.uploads, a.ping_interval_ms, a.client_messages_per_minute, b.bad_hooks_per_minute), (7, 1234, 999, 5));
        assert_eq!(b.trusted_proxies, vec!["10.0.0.0/8".parse().expect("net"), "::1".parse().expect("net")]);
        assert_eq!(a.to_flags(), b.to_flags());
        let resumes = ["switchboard", "dev", "--client-resumes-per-minute", "7"];
        let Cmd::Dev(dev) = Cli::parse_from(resumes).command else { panic!("not dev") };
        assert!(dev.listeners.edge.to_flags().windows(2).any(|w| w == ["--client-resumes-per-minute", "7"]));
    }

    /// `dev --nodes` waits until every node applied as far as node 1 in the groups every
    /// node holds: a split node's directory and routing groups, not a top-level figure
    /// such a node does not give.
    #[test]
    fn a_split_node_is_caught_up_by_its_groups_every_node_holds() {
        let split = serde_json::json!({"leader": 2, "groups": [
            {"group": 0, "part": "directory", "last_applied": 40},
            {"group": 1, "part": "routing", "last_applied": 55},
            {"group": 2, "part": "conversations 0", "held": false, "last_applied": 3}]});
        assert_eq!(applied_everywhere(&split), [(0, 40), (1, 55)].into_iter().collect());
        let one_group = serde_json::json!({"leader": 1, "last_applied": 12});
        assert_eq!(applied_everywhere(&one_group), [(0, 12)].into_iter().collect());
    }
}

#[cfg(test)]
mod allocator_tests {
    /// The purge delay a test process reads after the node's start-up call, started with
    /// `MIMALLOC_PURGE_DELAY` set to `env` (or unset).
    fn delay_read(env: Option<&str>) -> String {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = std::process::Command::new(exe);
        child.env_remove("MIMALLOC_PURGE_DELAY").env_remove("MIMALLOC_RESET_DELAY").env("SWITCHBOARD_READ_PURGE_DELAY", "1");
        if let Some(value) = env {
            child.env("MIMALLOC_PURGE_DELAY", value);
        }
        let out = child.args(["--exact", "allocator_tests::purge_delay_as_read", "--nocapture", "--test-threads", "1"]).output().expect("run the test binary");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        text
    }

    /// The option number the node sets is mimalloc's purge delay (a process started with
    /// `MIMALLOC_PURGE_DELAY=123` reads 123 under it), the operator's value is kept,
    /// and without one the node's start sets it to 0.
    #[test]
    fn the_node_sets_the_purge_delay_unless_its_environment_did() {
        let set = delay_read(Some("123"));
        assert!(set.contains("purge delay 123"), "mimalloc's option {} is not the purge delay, or the environment's value was overridden: {set}", super::MI_OPTION_PURGE_DELAY);
        let unset = delay_read(None);
        assert!(unset.contains("purge delay 0"), "{unset}");
    }

    /// Run by the test above in a process of its own.
    #[test]
    fn purge_delay_as_read() {
        if std::env::var_os("SWITCHBOARD_READ_PURGE_DELAY").is_some() {
            super::purge_freed_memory_at_once();
            // SAFETY: reads one of mimalloc's integer options.
            println!("purge delay {}", unsafe { super::mi_option_get(super::MI_OPTION_PURGE_DELAY) });
        }
    }
}
