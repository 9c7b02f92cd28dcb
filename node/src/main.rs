//! `switchboard`: run a node, a local dev cluster, make certificates, or load-test.

mod bench;
mod bootstrap;
mod demo;
mod server;

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
    /// Run one node (with its gateway listeners in the same process).
    Node(NodeArgs),
    /// Run a standalone gateway (arrives with the multi-node cluster).
    Gateway(GatewayArgs),
    /// Create the cluster CA and member certificates.
    Certs(CertsArgs),
    /// Drive client and operator sessions over real sockets and report latency.
    Bench(bench::BenchArgs),
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
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    listeners: Listeners,
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
}

#[derive(Args)]
struct GatewayArgs {
    /// Node to attach to over QUIC.
    #[arg(long)]
    node: Option<SocketAddr>,
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
        client_origins: listeners.client_origins,
        staff_origins: listeners.staff_origins,
        snapshot_every: listeners.snapshot_every,
        retention_every: std::time::Duration::from_secs(listeners.retention_check_s.max(1)),
        budgets: switchboard_gateway::Budgets {
            starts_per_minute: edge.starts_per_minute,
            client_messages_per_minute: edge.client_messages_per_minute,
            conversation_messages_per_minute: edge.conversation_messages_per_minute,
            client_sockets_per_address: edge.client_sockets_per_address,
            upload_bytes_per_hour: edge.upload_bytes_per_hour,
            uploads_per_address: edge.uploads_per_address,
            uploads: edge.uploads,
        },
        connections: switchboard_gateway::listener::ConnectionLimits {
            header_timeout: ms(edge.header_timeout_ms),
            write_timeout: ms(edge.write_timeout_ms),
            max_connections: edge.max_connections,
            max_connections_per_address: edge.max_connections_per_address,
        },
        request_timeout: ms(edge.request_timeout_ms),
        ping_interval: ms(edge.ping_interval_ms),
        chaos_drills,
    }
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
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let data_dir = args.listeners.data_dir.clone();
    let node = server::start(options(args.listeners, 1, true)).await?;
    let logins = demo::ensure(&node, &data_dir).await?;
    node.gateway.set_configured();
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
    let data_dir = args.listeners.data_dir.clone();
    let node = server::start(options(args.listeners, args.node_id, args.enable_chaos_drills)).await?;
    if let Some(path) = bootstrap::ensure_admin(&node, &data_dir, &args.admin_login).await? {
        println!("first start: created admin login '{}'; its password is in {}", args.admin_login, path.display());
    }
    node.gateway.set_configured();
    println!("switchboard node {} ready", args.node_id);
    print_listeners(&node);
    println!("ready");
    run_until_signal(node).await
}

fn certs(args: CertsArgs) -> anyhow::Result<()> {
    for name in &args.names {
        let identity = switchboard_raft::tls::ensure_member(&args.dir, name, &args.sans).with_context(|| format!("issue {name}"))?;
        println!("{name}: {} (key {})", identity.cert.display(), identity.key.display());
    }
    println!("cluster CA: {}", args.dir.join("ca.pem").display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sled=warn,fjall=warn,lsm_tree=warn,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Cmd::Dev(args) => dev(args).await,
            Cmd::Node(args) => node(args).await,
            Cmd::Gateway(args) => {
                let _ = args.node;
                anyhow::bail!(
                    "a standalone gateway needs the node-to-gateway QUIC protocol of the multi-node cluster; \
                     until then `switchboard node` runs the gateway listeners in the node process"
                )
            }
            Cmd::Certs(args) => certs(args),
            Cmd::Bench(args) => bench::run(args).await,
        }
    })
}
