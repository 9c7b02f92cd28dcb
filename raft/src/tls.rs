//! The cluster CA and node certificates, and the rustls configurations built on them.
//!
//! Every node-to-node and gateway-to-node connection is mutual TLS 1.3: each side shows
//! a certificate signed by the cluster CA. rustls always gets the ring provider
//! explicitly, so a second provider elsewhere in the build can never be picked by accident.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::files::write_private;
use crate::Error;

/// The DNS name every node certificate carries, and clients verify.
pub const NODE_SERVER_NAME: &str = "switchboard-node";
/// The DNS name a gateway's certificate carries instead: it may forward client work
/// to nodes, never take part in Raft.
pub const GATEWAY_NAME: &str = "switchboard-gateway";

/// What a member's certificate lets it do, written into the certificate as a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A node: Raft traffic (votes, entries, snapshots, membership) and client work.
    Node,
    /// A gateway: client work only (forwarded commands, reads, files).
    Gateway,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Node => NODE_SERVER_NAME,
            Role::Gateway => GATEWAY_NAME,
        }
    }

    /// The role a peer's certificate (already verified against the cluster CA during
    /// the handshake) carries; `None` when it names neither.
    pub fn of_peer(connection: &quinn::Connection) -> Option<Role> {
        let identity = connection.peer_identity()?;
        let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
        let cert = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
        Role::of_certificate(&cert)
    }

    /// The role a certificate carries as a name: the node's first.
    fn of_certificate(cert: &webpki::EndEntityCert) -> Option<Role> {
        [Role::Node, Role::Gateway].into_iter().find(|role| {
            rustls::pki_types::ServerName::try_from(role.name()).is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
        })
    }
}

/// The role the certificate in a PEM file carries, as a peer would see it (the node's
/// name first, as [`Role::of_peer`] reads it).
fn role_of_certificate(path: &Path) -> Result<Option<Role>, Error> {
    let cert = CertificateDer::from_pem_file(path).map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    let cert = webpki::EndEntityCert::try_from(&cert).map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    Ok(Role::of_certificate(&cert))
}

/// The node ids a peer's certificate (already verified against the cluster CA) is
/// issued to: each name of the form `node-<id>` it carries, as every node's certificate
/// does (`switchboard certs --name node-3`, `cluster init`). A node speaks in Raft only
/// under one of these ids, so a node's certificate cannot vote or lead as another node.
pub fn node_ids_of_peer(connection: &quinn::Connection) -> Vec<u64> {
    let Some(identity) = connection.peer_identity() else { return Vec::new() };
    let Some(chain) = identity.downcast_ref::<Vec<CertificateDer<'static>>>() else { return Vec::new() };
    let Some(cert) = chain.first().and_then(|c| webpki::EndEntityCert::try_from(c).ok()) else { return Vec::new() };
    let mut ids: Vec<u64> = cert.valid_dns_names().filter_map(node_id_of_name).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The id in a name `node-<id>` (decimal digits only, no sign, no leading zero).
fn node_id_of_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("node-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod names {
    #[test]
    fn a_node_id_is_read_only_from_an_exact_node_name() {
        assert_eq!(super::node_id_of_name("node-3"), Some(3));
        assert_eq!(super::node_id_of_name("node-12"), Some(12));
        for other in ["node-", "node-03", "node-+3", "node-3.example", "xnode-3", "node-3a", "switchboard-node", "node-99999999999999999999"] {
            assert_eq!(super::node_id_of_name(other), None, "{other}");
        }
    }
}
#[cfg(test)]
mod roles {
    use super::Role;

    /// A gateway's certificate never makes a node of its holder: not through a name a
    /// node speaks under, nor by reusing a node's certificate of the same name.
    #[test]
    fn a_gateway_certificate_carries_no_node_name_and_a_node_certificate_is_not_reused_as_one() {
        let dir = tempfile::tempdir().expect("dir");
        for (name, extra) in [("gateway-1", "node-2"), ("gateway-1", "Switchboard-Node"), ("node-7", "gw.example")] {
            let refused = super::ensure_member_as(dir.path(), name, Role::Gateway, &[extra.to_string()]).expect_err("a node's name");
            assert!(refused.to_string().contains("would let the gateway act as a node"), "{refused}");
        }
        super::ensure_member(dir.path(), "edge-a", &[]).expect("a node's certificate");
        let refused = super::ensure_member_as(dir.path(), "edge-a", Role::Gateway, &[]).expect_err("issued as a node");
        assert!(refused.to_string().contains("was issued for another role (switchboard-node)"), "{refused}");
        let gateway = super::ensure_member_as(dir.path(), "gateway-1", Role::Gateway, &["gw.example".into()]).expect("a gateway's certificate");
        assert_eq!(super::role_of_certificate(&gateway.cert).expect("read"), Some(Role::Gateway));
        let again = super::ensure_member_as(dir.path(), "gateway-1", Role::Gateway, &[]).expect("used as it is");
        assert_eq!(again.cert, gateway.cert);
        assert!(super::ensure_member(dir.path(), "gateway-1", &[]).is_err(), "nor a gateway's as a node's");
    }
}
#[cfg(test)]
mod kept_ca {
    /// A folder whose CA key was taken off the machine (as the deployment guide says)
    /// keeps its CA: its member's certificate is used as it is, and a new certificate is
    /// refused with what to do, never issued by a new CA that nobody trusts.
    #[test]
    fn a_ca_certificate_without_its_key_is_never_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let first = super::ensure_member(dir.path(), "node-1", &[]).expect("issued");
        std::fs::remove_file(dir.path().join(super::CA_KEY)).expect("key taken away");
        let ca = std::fs::read(&first.ca).expect("ca");
        let again = super::ensure_member(dir.path(), "node-1", &[]).expect("the node starts as before");
        assert_eq!(again.cert, first.cert);
        let refused = super::ensure_member(dir.path(), "node-2", &[]).expect_err("no key to issue with");
        assert!(refused.to_string().contains("issue them where the CA key is kept"), "{refused}");
        assert_eq!(std::fs::read(&first.ca).expect("ca"), ca, "the CA is the same");
        assert!(!dir.path().join(super::CA_KEY).exists(), "no new CA key was made");
    }
}

/// ALPN of the node protocol.
pub const ALPN: &[u8] = b"switchboard/1";

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

fn ca_params() -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Switchboard cluster CA");
    dn.push(DnType::OrganizationName, "Switchboard");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Creates the cluster CA in `dir` unless one is already there.
pub fn ensure_ca(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    if dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists() {
        return Ok(());
    }
    // A CA certificate without its key is one kept off this machine on purpose (the key
    // is needed only to issue certificates): it is never replaced by a new CA, which
    // no other member would trust.
    if dir.join(CA_CERT).exists() {
        return Err(Error::Tls(format!(
            "{} has no {CA_KEY} beside it: this folder's CA issues no new certificates here; issue them where the CA key is kept (`switchboard certs --dir <that folder> --name <name>`) and copy them in",
            dir.join(CA_CERT).display()
        )));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    // Certificates go through the same durable writer as keys: a certificate cut short
    // by a crash would be taken as present on the next start and break every handshake.
    write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
    write_private(&dir.join(CA_CERT), cert.pem().as_bytes())?;
    Ok(())
}

/// Paths of one member's certificate and key.
#[derive(Clone, Debug)]
pub struct Identity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Issues a certificate for `name` (a node or gateway) signed by the CA in `dir`,
/// unless it already exists. Returns where it is.
pub fn ensure_member(dir: &Path, name: &str, extra_names: &[String]) -> Result<Identity, Error> {
    ensure_member_as(dir, name, Role::Node, extra_names)
}

/// As [`ensure_member`], for a member of the given role.
pub fn ensure_member_as(dir: &Path, name: &str, role: Role, extra_names: &[String]) -> Result<Identity, Error> {
    let identity = Identity {
        ca: dir.join(CA_CERT),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    // A gateway's certificate never carries a name that makes a node of its holder (the
    // node role's name, or `node-<id>`, under which a node speaks in Raft).
    if role == Role::Gateway {
        if let Some(reserved) = std::iter::once(name).chain(extra_names.iter().map(String::as_str)).find(|n| n.eq_ignore_ascii_case(NODE_SERVER_NAME) || node_id_of_name(&n.to_ascii_lowercase()).is_some()) {
            return Err(Error::Tls(format!("a gateway's certificate cannot carry the name {reserved:?}: it would let the gateway act as a node")));
        }
    }
    // Issued already (with the CA's key kept elsewhere or not): used as it is, if it was
    // issued for this role.
    if identity.cert.exists() && identity.key.exists() {
        let held = role_of_certificate(&identity.cert)?;
        if held != Some(role) {
            return Err(Error::Tls(format!(
                "{} was issued for another role ({}), not as a {}: give this member another name, or remove that certificate first",
                identity.cert.display(),
                held.map_or("none", Role::name),
                role.name()
            )));
        }
    }
    if identity.ca.exists() && identity.cert.exists() && identity.key.exists() {
        return Ok(identity);
    }
    ensure_ca(dir)?;
    if identity.cert.exists() && identity.key.exists() {
        return Ok(identity);
    }
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(dir.join(CA_KEY))?)?;
    // Re-created from the same parameters and key: the issuer name and key identifier
    // match the stored CA certificate, which is all a signature needs.
    let ca = ca_params()?.self_signed(&ca_key)?;
    let mut names = vec![role.name().to_string(), "localhost".to_string(), name.to_string()];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_private(&identity.key, key.serialize_pem().as_bytes())?;
    write_private(&identity.cert, cert.pem().as_bytes())?;
    Ok(identity)
}

/// The identity of `name` in `dir`, which must already hold the cluster CA's certificate
/// and the member's certificate and key (made by `switchboard cluster init` or
/// `switchboard certs`). A member of a cluster never makes a CA of its own: it could not
/// talk to the others.
pub fn existing_member(dir: &Path, name: &str) -> Result<Identity, Error> {
    let identity = Identity {
        ca: dir.join(CA_CERT),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    for path in [&identity.ca, &identity.cert, &identity.key] {
        if !path.exists() {
            return Err(Error::Tls(format!(
                "{} is missing: copy it from the folder `switchboard cluster init` made, or issue it with `switchboard certs --dir {} --name {name}`",
                path.display(),
                dir.display()
            )));
        }
    }
    Ok(identity)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Loaded {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(identity: &Identity) -> Result<Loaded, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&identity.ca).map_err(|e| Error::Tls(format!("{}: {e}", identity.ca.display())))? {
        let cert = cert.map_err(|e| Error::Tls(e.to_string()))?;
        roots.add(cert).map_err(|e| Error::Tls(e.to_string()))?;
    }
    let chain = CertificateDer::pem_file_iter(&identity.cert)
        .map_err(|e| Error::Tls(format!("{}: {e}", identity.cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&identity.key).map_err(|e| Error::Tls(format!("{}: {e}", identity.key.display())))?;
    Ok(Loaded { roots: Arc::new(roots), chain, key })
}

/// What a peer may send on one stream before the member reads it (QUIC's stream
/// window, on the member's side of every connection: a gateway's relayed sockets, and
/// the nodes' Raft and read streams, which it paces and does not stop).
pub const MEMBER_STREAM_WINDOW: u32 = 256 * 1024;

/// Server side: requires a client certificate from the cluster CA.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, Error> {
    let loaded = load(identity)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(loaded.roots, provider())
        .build()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(loaded.chain, loaded.key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Every socket a gateway relays holds a stream for its life: a gateway may relay
    // this many to one member over its one connection (only peers with a certificate
    // from the cluster CA get a connection; a stream's buffers grow only with its data).
    transport.max_concurrent_bidi_streams(MAX_STREAMS_PER_PEER.into());
    // What a peer may send ahead on one stream before this member reads it (quinn's
    // default is 1.25 MB): a socket a gateway relays is a stream, and a member busy
    // with the socket's last frame (a commit waits up to 10 s in an election) holds at
    // most this much of what the client sent meanwhile (docs/security.md).
    transport.stream_receive_window(MEMBER_STREAM_WINDOW.into());
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(idle_timeout()));
    transport.initial_rtt(INITIAL_RTT);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Client side: verifies the peer against the cluster CA and shows our certificate.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, Error> {
    client_config_with(identity, None)
}

/// What a member may send on one stream of a gateway's connection before the gateway
/// reads it (QUIC's stream window; quinn's default is 1.25 MB). Each socket a gateway
/// relays is a stream: a client that does not read makes the gateway hold at most this
/// much from the member on its behalf (docs/security.md).
pub const GATEWAY_STREAM_WINDOW: u32 = 256 * 1024;

/// [`client_config`], with `stream_window` as each stream's receive window.
fn client_config_with(identity: &Identity, stream_window: Option<u32>) -> Result<quinn::ClientConfig, Error> {
    let loaded = load(identity)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(loaded.roots)
        .with_client_auth_cert(loaded.chain, loaded.key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    if let Some(window) = stream_window {
        transport.stream_receive_window(window.into());
    }
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(idle_timeout()));
    transport.initial_rtt(INITIAL_RTT);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The round trip assumed before a connection has measured one. QUIC resends a
/// handshake packet that got no answer after about three of these, then twice as long
/// each time: with quinn's default (333 ms) a node dialled while it was down (killed,
/// restarting) answered the dial's next resend only 1-3 s after it was back, and until
/// then its peers' votes could not reach it, which made an election after the next
/// kill take over a second (docs/benchmarks.md, "Members that come back"). Nodes
/// and gateways share a LAN: 50 ms is ample there, and a longer real round trip only
/// costs a resent handshake packet.
const INITIAL_RTT: std::time::Duration = std::time::Duration::from_millis(50);

/// Streams open at once on one peer's connection: RPCs, and the sockets and requests a
/// gateway relays.
pub const MAX_STREAMS_PER_PEER: u32 = 262_144;

/// Both sides ping a quiet connection this often...
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);
/// ...and give it up after this long without a packet: a dead peer's connection is
/// redialled within seconds, not quinn's default 30 s.
const IDLE_TIMEOUT_MS: u32 = 5000;

fn idle_timeout() -> quinn::IdleTimeout {
    quinn::IdleTimeout::from(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS))
}

/// A QUIC endpoint that serves and dials with the member's identity.
pub fn endpoint(identity: &Identity, bind: std::net::SocketAddr) -> Result<quinn::Endpoint, Error> {
    let mut endpoint = bound(identity, bind, Some(server_config(identity)?))?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// A QUIC endpoint that only dials (a gateway), with the member's identity.
pub fn client_endpoint(identity: &Identity, bind: std::net::SocketAddr) -> Result<quinn::Endpoint, Error> {
    let mut endpoint = bound(identity, bind, None)?;
    endpoint.set_default_client_config(client_config_with(identity, Some(GATEWAY_STREAM_WINDOW))?);
    Ok(endpoint)
}

fn bound(identity: &Identity, bind: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint, Error> {
    let socket = if bind.is_ipv6() {
        // An IPv6 socket that reaches IPv4 peers too, as quinn's own endpoints make it.
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        let _ = socket.set_only_v6(false);
        socket.bind(&bind.into())?;
        socket.into()
    } else {
        std::net::UdpSocket::bind(bind)?
    };
    let runtime = quinn::default_runtime().ok_or_else(|| Error::Tls("no async runtime for the QUIC endpoint".into()))?;
    let key = std::fs::read(&identity.key).map_err(|e| Error::Tls(format!("read {}: {e}", identity.key.display())))?;
    let mut config = quinn::EndpointConfig::new(reset_key(&key));
    let cids = cid_key(&key);
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cids)));
    Ok(quinn::Endpoint::new(config, server, socket, runtime)?)
}

/// A digest of the member's private key under `label`: the same for every process of
/// that member, and telling nothing about the key.
fn derived(key: &[u8], label: &[u8]) -> ring::digest::Digest {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(label);
    context.update(key);
    context.finish()
}

/// The key this member's QUIC stateless resets are made with, and the one its connection
/// ids are signed with, both derived from its private key, so the same after a restart.
/// A peer still holding a connection to the process that died sends its next packet to
/// the new one, which recognises the connection id as its own and answers with a reset
/// that the peer can verify (the old process announced tokens made with the same key):
/// the peer closes that connection and dials again at once. With random keys per process
/// (quinn's default) the packet is dropped as foreign, and the peer kept writing into the
/// dead connection until a second of silence closed it (measured: an election after a
/// leader kill took 2 s because the survivors' votes went into such connections).
fn reset_key(key: &[u8]) -> Arc<dyn quinn::crypto::HmacKey> {
    let seed = derived(key, b"switchboard: QUIC stateless reset key, v1\0");
    Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_ref()))
}

fn cid_key(key: &[u8]) -> u64 {
    let seed = derived(key, b"switchboard: QUIC connection id key, v1\0");
    let mut first = [0u8; 8];
    first.copy_from_slice(&seed.as_ref()[..8]);
    u64::from_le_bytes(first)
}
