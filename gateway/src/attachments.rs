//! Attachments: a content store on disk for the bytes, and a Raft-committed record of
//! each file (conversation, name, type, size, digest) that decides who may use it.
//!
//! Everything that can be checked without the body is checked first (token,
//! conversation, type, declared length, the address's budget, the conversation's
//! quota), so a refused upload costs no more than its headers. The body is then
//! streamed to a temporary file, never held whole, and checked as it passes: the bytes
//! must match the declared type (a "PNG" must start like one).
//!
//! A file is written and fsynced before its record is committed, so a committed record
//! never points at missing bytes; a file whose record is refused is removed again.
//!
//! Left out for now: the store is the data folder's `attachments/` on the node that
//! received the upload. Replicating it to the other replicas of the shard comes with
//! the multi-node cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use switchboard_actors::model::{Attachment, AttachmentId, Command, ConversationId, InboundFile};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::Subject;
use crate::rest::{readable, Params, Staff};
use crate::{Gateway, GatewayError};

/// Largest attachment accepted, in bytes.
pub const MAX_ATTACHMENT_BYTES: usize = 5 * 1024 * 1024;

/// Content types accepted: images shown inline and common documents.
pub const ALLOWED_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "application/msword",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
];

/// A file being received: removed when dropped, also when the request is dropped
/// halfway (a body that timed out), unless it was renamed into place first.
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.0.display(), error = %e, "could not remove a partial upload"),
        }
    }
}

/// The SHA-256 of `bytes` in lowercase hex, as an attachment's record names it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    switchboard_adapters::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Files by id in one folder; ids are random hex, never derived from user input.
#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
    /// Writes of a file under an id already there and a stray sweep's removal, one at
    /// a time per id (by stripe): a file written again is never removed under its writer.
    writing: Arc<[tokio::sync::Mutex<()>; WRITE_STRIPES]>,
}

/// Stripes of [`BlobStore`]'s per-id locks.
const WRITE_STRIPES: usize = 64;

impl BlobStore {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Files a crash cut short were never promised by a record: gone at start.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_str().is_some_and(|name| name.ends_with(".partial")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BlobStore { dir, writing: Arc::new(std::array::from_fn(|_| tokio::sync::Mutex::new(()))) })
    }

    fn path(&self, id: &AttachmentId) -> Option<PathBuf> {
        let valid = id.0.len() == 32 && id.0.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        valid.then(|| self.dir.join(&id.0))
    }

    /// Streams a body into the store, checking it against its declared type and length
    /// as it arrives, and returns its new id and SHA-256. Nothing is kept on failure.
    pub async fn put(&self, body: Body, content_type: &str, declared: u64) -> Result<(AttachmentId, String), GatewayError> {
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| GatewayError::Internal("no randomness".into()))?;
        let id = AttachmentId(raw.iter().map(|b| format!("{b:02x}")).collect());
        let path = self.path(&id).ok_or_else(|| GatewayError::Internal("bad generated id".into()))?;
        let partial = Partial(path.with_extension("partial"));
        let sha256 = Self::write_partial(&partial.0, body, content_type, declared).await?;
        tokio::fs::rename(&partial.0, &path).await?;
        // Renamed: nothing is left at the partial path for the guard to remove.
        // The rename itself must survive a crash too.
        tokio::fs::File::open(&self.dir).await?.sync_all().await?;
        Ok((id, sha256))
    }

    async fn write_partial(partial: &std::path::Path, mut body: Body, content_type: &str, declared: u64) -> Result<String, GatewayError> {
        let mut file = tokio::fs::File::create(partial).await?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut sniff = Sniffer::new(content_type);
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| GatewayError::BadRequest(format!("the upload broke off: {e}")))?;
            let Ok(chunk) = frame.into_data() else { continue };
            size += chunk.len() as u64;
            if size > declared {
                return Err(GatewayError::BadRequest("the body is longer than its Content-Length".into()));
            }
            sniff.feed(&chunk)?;
            digest.update(&chunk);
            file.write_all(&chunk).await?;
        }
        if size != declared {
            return Err(GatewayError::BadRequest("the body is shorter than its Content-Length".into()));
        }
        sniff.finish()?;
        file.sync_all().await?;
        Ok(switchboard_adapters::hex(digest.finish().as_ref()))
    }

    /// Stores a file a peer pushed (or this node fetched), durably, under its id: written
    /// aside, synced, renamed, the folder synced. A file already there is kept.
    pub async fn put_bytes(&self, id: &AttachmentId, bytes: &[u8]) -> Result<(), GatewayError> {
        let path = self.path(id).ok_or_else(|| GatewayError::BadRequest("not an attachment id".into()))?;
        if bytes.len() > MAX_ATTACHMENT_BYTES {
            return Err(GatewayError::TooLarge(MAX_ATTACHMENT_BYTES));
        }
        let _writing = self.lock_of(id).lock().await;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            // Written again (a redelivered channel message reuses its id): its clock
            // starts over, so a stray sweep does not take it while its record commits.
            // Gone meanwhile (retention removed it): written anew below.
            let touched = path.clone();
            let touch = tokio::task::spawn_blocking(move || std::fs::File::options().append(true).open(&touched)?.set_modified(std::time::SystemTime::now()))
                .await
                .map_err(|_| GatewayError::Internal("a file's time could not be set".into()))?;
            match touch {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A push and a fetch of the same file may run at once: each writes aside under a
        // name of its own, and the second rename replaces the first with the same bytes.
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(|_| GatewayError::Internal("no randomness".into()))?;
        let partial = Partial(path.with_extension(format!("{:016x}.partial", u64::from_le_bytes(nonce))));
        let mut file = tokio::fs::File::create(&partial.0).await?;
        file.write_all(bytes).await?;
        file.sync_all().await?;
        tokio::fs::rename(&partial.0, &path).await?;
        tokio::fs::File::open(&self.dir).await?.sync_all().await?;
        Ok(())
    }

    /// The whole file, for a peer (files are at most `MAX_ATTACHMENT_BYTES`); `None` when this
    /// node does not hold it.
    pub async fn read_all(&self, id: &AttachmentId) -> Result<Option<Vec<u8>>, GatewayError> {
        let path = self.path(id).ok_or_else(|| GatewayError::BadRequest("not an attachment id".into()))?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                let mut bytes = Vec::new();
                file.take(MAX_ATTACHMENT_BYTES as u64 + 1).read_to_end(&mut bytes).await?;
                if bytes.len() > MAX_ATTACHMENT_BYTES {
                    return Err(GatewayError::TooLarge(MAX_ATTACHMENT_BYTES));
                }
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this node holds the file.
    pub async fn has(&self, id: &AttachmentId) -> bool {
        match self.path(id) {
            Some(path) => tokio::fs::try_exists(path).await.unwrap_or(false),
            None => false,
        }
    }

    /// Removes a file no committed record refers to; whether it was removed.
    pub async fn remove(&self, id: &AttachmentId) -> bool {
        let Some(path) = self.path(id) else { return false };
        match tokio::fs::remove_file(&path).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(attachment = %id.0, error = %e, "could not remove an unreferenced file");
                false
            }
        }
    }

    /// The lock a write of `id` over an existing file and a stray sweep's removal of
    /// it share.
    fn lock_of(&self, id: &AttachmentId) -> &tokio::sync::Mutex<()> {
        let stripe = id.0.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
        &self.writing[stripe % WRITE_STRIPES]
    }

    /// Removes file `id` if it was last written at least `older_than` ago, checked and
    /// removed while no write of the same id runs ([`BlobStore::put_bytes`] takes the
    /// same lock): a file written again meanwhile is younger and stays. Whether it was
    /// removed.
    pub async fn remove_if_settled(&self, id: &AttachmentId, older_than: std::time::Duration) -> bool {
        let Some(path) = self.path(id) else { return false };
        let _writing = self.lock_of(id).lock().await;
        if !self.settled(id, older_than).await {
            return false;
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(attachment = %id.0, error = %e, "could not remove a stray file");
                false
            }
        }
    }

    /// Whether file `id` is here and was last written at least `older_than` ago.
    pub async fn settled(&self, id: &AttachmentId, older_than: std::time::Duration) -> bool {
        let Some(path) = self.path(id) else { return false };
        match tokio::fs::metadata(&path).await.and_then(|m| m.modified()) {
            Ok(written) => std::time::SystemTime::now().duration_since(written).is_ok_and(|age| age >= older_than),
            Err(_) => false,
        }
    }

    /// The ids of the stored files last written at least `older_than` ago, as the
    /// folder lists them (no order); names that are not ids (a write under way) are
    /// skipped. Blocking: call it off the runtime.
    pub fn settled_ids(&self, older_than: std::time::Duration) -> std::io::Result<impl Iterator<Item = AttachmentId>> {
        let now = std::time::SystemTime::now();
        let store = self.clone();
        Ok(std::fs::read_dir(&self.dir)?.flatten().filter_map(move |entry| {
            let id = AttachmentId(entry.file_name().into_string().ok()?);
            store.path(&id)?;
            let written = entry.metadata().ok()?.modified().ok()?;
            // A clock stepped back makes a file look new: it waits, it is not taken.
            (now.duration_since(written).ok()? >= older_than).then_some(id)
        }))
    }

    /// The file as a body streamed in chunks: a download never holds the file whole.
    pub async fn get(&self, id: &AttachmentId) -> Result<Body, GatewayError> {
        let path = self.path(id).ok_or_else(|| GatewayError::NotFound("attachment".into()))?;
        let file = tokio::fs::File::open(path).await.map_err(|_| GatewayError::NotFound("attachment".into()))?;
        let chunks = futures::stream::unfold(file, |mut file| async move {
            let mut chunk = vec![0u8; 64 * 1024];
            match file.read(&mut chunk).await {
                Ok(0) => None,
                Ok(n) => {
                    chunk.truncate(n);
                    Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk)), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        Ok(Body::from_stream(chunks))
    }
}

#[derive(Deserialize)]
pub(crate) struct ClientUpload {
    token: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
pub(crate) struct StaffUpload {
    conversation: u64,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
pub(crate) struct ClientDownload {
    token: String,
}

/// Unicode's bidirectional controls: they can make `evil\u{202E}fdp.exe` read as
/// `evilexe.pdf`.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Extensions a file of each accepted type may carry; the first is added when the name
/// has none of them.
fn extensions(content_type: &str) -> &'static [&'static str] {
    match content_type {
        "image/png" => &["png"],
        "image/jpeg" => &["jpg", "jpeg"],
        "image/gif" => &["gif"],
        "image/webp" => &["webp"],
        "application/pdf" => &["pdf"],
        "text/plain" => &["txt", "log", "csv", "text"],
        "application/msword" => &["doc"],
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => &["docx"],
        _ => &[],
    }
}

/// Keeps a display name harmless: no path parts, no control or bidirectional
/// characters, bounded length, and an extension that agrees with the verified type.
fn clean_name(name: &str, content_type: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control() && !is_bidi_control(*c) && *c != '"').take(200).collect();
    let cleaned = if cleaned.trim().is_empty() { "file".to_owned() } else { cleaned };
    let allowed = extensions(content_type);
    let has_allowed = cleaned.rsplit_once('.').is_some_and(|(_, ext)| allowed.iter().any(|a| a.eq_ignore_ascii_case(ext)));
    match allowed.first() {
        Some(ext) if !has_allowed => format!("{cleaned}.{ext}"),
        _ => cleaned,
    }
}

fn content_type(headers: &HeaderMap) -> Result<String, GatewayError> {
    let raw = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let essence = raw.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if ALLOWED_TYPES.contains(&essence.as_str()) {
        Ok(essence)
    } else {
        Err(GatewayError::UnsupportedType(if essence.is_empty() { "none".into() } else { essence }))
    }
}

/// Bytes of a file's start kept to check its signature.
const SNIFF_BYTES: usize = 512;

/// Checks a body against its declared type as it streams past: the signature each
/// format starts with; text must be UTF-8 without NUL bytes throughout. Stops a script
/// served as an "image".
struct Sniffer<'a> {
    content_type: &'a str,
    head: Vec<u8>,
    /// An incomplete UTF-8 sequence at the end of the last chunk (text only).
    carry: Vec<u8>,
}

impl<'a> Sniffer<'a> {
    fn new(content_type: &'a str) -> Self {
        Sniffer { content_type, head: Vec::new(), carry: Vec::new() }
    }

    fn refuse(&self) -> GatewayError {
        GatewayError::UnsupportedType(format!("{} (the file's content is not of that type)", self.content_type))
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), GatewayError> {
        if self.head.len() < SNIFF_BYTES {
            let take = (SNIFF_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        if self.content_type == "text/plain" {
            if chunk.contains(&0) {
                return Err(self.refuse());
            }
            let mut bytes = std::mem::take(&mut self.carry);
            bytes.extend_from_slice(chunk);
            if let Err(e) = std::str::from_utf8(&bytes) {
                // Only a sequence cut by the chunk's end may wait for the next chunk.
                if e.error_len().is_some() {
                    return Err(self.refuse());
                }
                self.carry = bytes[e.valid_up_to()..].to_vec();
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), GatewayError> {
        if self.head.is_empty() {
            return Err(GatewayError::BadRequest("the file is empty".into()));
        }
        if !self.carry.is_empty() || !signature_matches(self.content_type, &self.head) {
            return Err(self.refuse());
        }
        Ok(())
    }
}

/// Whether a whole file (one that came in a mail) is of its declared type, as an
/// upload is checked.
pub(crate) fn bytes_match_type(content_type: &str, bytes: &[u8]) -> bool {
    let mut sniff = Sniffer::new(content_type);
    sniff.feed(bytes).is_ok() && sniff.finish().is_ok()
}

/// A file name made safe to show and to save: no path, no control or bidi characters,
/// an extension of its type.
pub(crate) fn safe_name(name: &str, content_type: &str) -> String {
    clean_name(name, content_type)
}

/// Whether a file's first bytes fit its declared type.
fn signature_matches(content_type: &str, head: &[u8]) -> bool {
    match content_type {
        "image/png" => head.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => head.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a"),
        "image/webp" => head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP",
        "application/pdf" => head.starts_with(b"%PDF-"),
        "application/msword" => head.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => office_open_xml(head),
        "text/plain" => true,
        _ => false,
    }
}

/// An Office Open XML package is a ZIP archive whose first entry is one of the
/// package's own parts; any ZIP (a `.jar`, a zipped script) is not enough.
fn office_open_xml(head: &[u8]) -> bool {
    if head.len() < 30 || !head.starts_with(b"PK\x03\x04") {
        return false;
    }
    let name_len = usize::from(u16::from_le_bytes([head[26], head[27]]));
    let Some(name) = head.get(30..30 + name_len) else { return false };
    name == b"[Content_Types].xml" || [&b"_rels/"[..], b"word/", b"docProps/"].iter().any(|p| name.starts_with(p))
}

/// What an upload declares before its body is read.
struct Declared {
    content_type: String,
    length: u64,
}

/// Checks the type and length an upload declares; 415, 411 or 413 before the body.
fn declared(headers: &HeaderMap) -> Result<Declared, GatewayError> {
    let content_type = content_type(headers)?;
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(GatewayError::LengthRequired)?;
    if length > MAX_ATTACHMENT_BYTES as u64 {
        return Err(GatewayError::TooLarge(MAX_ATTACHMENT_BYTES));
    }
    if length == 0 {
        return Err(GatewayError::BadRequest("the file is empty".into()));
    }
    Ok(Declared { content_type, length })
}

/// The conversation's quota, asked before any byte is read (400 `invalid` past it).
async fn check_room(gw: &Gateway, conversation: ConversationId, size: u64) -> Result<(), GatewayError> {
    gw.backend.conversation_reads(conversation).attachment_room(conversation, 1, size).await.map_err(quota_refusal)
}

/// The quota's refusal is a bad request (400 `invalid`), before the body or at commit.
fn quota_refusal(e: switchboard_actors::Error) -> GatewayError {
    match e {
        switchboard_actors::Error::Invalid(message) => GatewayError::Invalid(message),
        other => other.into(),
    }
}

/// Stores an upload's body (within `allowed`, if given: the body's deadline, not the
/// commit's), copies it to the members and commits its record. `slot` (a client
/// upload's place among the uploads in progress) is held until the commit ends.
async fn store(
    gw: &Arc<Gateway>,
    conversation: ConversationId,
    name: &str,
    declared: Declared,
    body: Body,
    by: String,
    allowed: Option<Duration>,
    slot: Option<crate::budget::Slot>,
) -> Result<Response, GatewayError> {
    let Declared { content_type, length } = declared;
    let put = gw.blobs.put(body, &content_type, length);
    let (id, sha256) = match allowed {
        Some(allowed) => tokio::time::timeout(allowed, put).await.map_err(|_| GatewayError::Timeout(allowed.as_millis() as u64))??,
        None => put.await?,
    };
    let name = clean_name(name, &content_type);
    let attachment = Attachment { id, conversation, name, content_type, size: length, sha256, uploaded_by: by };
    // From here the file is whole on disk: what follows runs to its end as a task of
    // its own, so a client that goes away (or a deadline) cannot leave a file that no
    // record names and nothing removes.
    let gw = gw.clone();
    let settled = tokio::spawn(async move {
        let _slot = slot;
        let owner = FileOwner::Conversation(conversation);
        // Whether this node holds the shard when the copies' targets are chosen: then its
        // own copy counts towards the majority and must stay.
        let held = gw.backend.keeps_files_of(&owner);
        // On a cluster's majority before the record that promises the file is
        // committed: a member that dies after the answer loses no attachment it was sent.
        if let Err(e) = gw.backend.replicate_file(gw.blobs.clone(), attachment.id.clone(), owner.clone()).await {
            gw.blobs.remove(&attachment.id).await;
            return Err(GatewayError::Core(switchboard_actors::Error::Commit(format!("the file could not be copied to enough cluster members: {e}"))));
        }
        let committed = gw.submit(Command::StoreAttachment(attachment.clone())).await;
        // A node that does not hold the shard keeps no copy, whatever the outcome: the
        // holders have theirs (their sweeps complete them) and nothing here needs it.
        let keep = held || gw.backend.keeps_files_of(&owner);
        if let Err(e) = committed {
            // Refused: nothing refers to the bytes, so do not keep them. After a commit
            // failure the record may still apply, so a holder's bytes must stay.
            if e.is_refusal() || !keep {
                gw.blobs.remove(&attachment.id).await;
            }
            // The quota, asked again at commit, is a bad request as it is before the body.
            return Err(quota_refusal(e));
        }
        if !keep {
            gw.blobs.remove(&attachment.id).await;
        }
        Ok(attachment)
    });
    let attachment = settled.await.map_err(|e| GatewayError::Internal(format!("the upload's commit stopped: {e}")))??;
    let reply = json!({"id": attachment.id.0, "name": attachment.name, "content_type": attachment.content_type, "size": attachment.size});
    Ok((StatusCode::CREATED, Json(reply)).into_response())
}

/// `POST /attachments?token=&name=` on the public listener.
pub(crate) async fn client_upload(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Params(query): Params<ClientUpload>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let conversation = match gw.tokens.verify(&query.token)? {
        Subject::Client { conversation } => conversation,
        Subject::Staff { .. } => return Err(GatewayError::Forbidden("staff upload on the private listener")),
        Subject::Visitor { .. } => return Err(GatewayError::Forbidden("a visitor token is not a conversation token")),
    };
    let open = {
        let shard = gw.backend.conversation_reads(conversation);
        match shard.open_conversation(conversation).await? {
            // The hot state holds every open conversation: one it lacks is closed or unknown.
            Some(open) => Ok(open),
            None => Err(shard.conversation(conversation).await?.is_some()),
        }
    };
    let open = match open {
        Ok(open) => open,
        Err(true) => return Err(GatewayError::Core(switchboard_actors::Error::Closed(conversation))),
        Err(false) => return Err(GatewayError::NotFound(format!("conversation {}", conversation.0))),
    };
    // A customer blocked since they started takes no more messages into their open
    // conversation (the core refuses each in the log), so no more files either: each
    // would be fsynced, copied to the members and kept with the conversation although
    // no message of theirs can ever name it. Their visitor rules, as for a message.
    if let Some(message) = visitor_refused(&gw, &open.channel, open.visitor.id.as_deref()) {
        return Err(GatewayError::Core(switchboard_actors::Error::Blocked(message)));
    }
    let declared = declared(&headers)?;
    let budgets = gw.config.budgets;
    let address = crate::budget::client_address(peer.ip());
    let slot = match gw.usage.uploads.acquire(address, budgets.uploads_per_address, budgets.uploads) {
        Ok(slot) => slot,
        Err(crate::budget::Refused::Address) => return Err(GatewayError::Budget("too many uploads in progress from your address")),
        Err(crate::budget::Refused::Total) => return Err(GatewayError::Busy("too many uploads in progress; try again shortly")),
    };
    check_room(&gw, conversation, declared.length).await?;
    // Every upload costs at least `MIN_UPLOAD_CHARGE`: tiny declared lengths cannot buy
    // an hour of attempts that each hold a slot.
    let charge = declared.length.max(MIN_UPLOAD_CHARGE) as f64;
    if !gw.usage.upload_bytes.take(address, charge, budgets.upload_bytes_per_hour as f64) {
        gw.metrics.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(GatewayError::Budget("your address has uploaded its share of files for this hour"));
    }
    // The body must keep coming: a small upload that stalls gives its slot back in
    // seconds, not at the request deadline.
    let allowed = UPLOAD_GRACE + Duration::from_secs_f64(declared.length as f64 / MIN_UPLOAD_BYTES_PER_SECOND);
    store(&gw, conversation, &query.name, declared, body, "client".into(), Some(allowed), Some(slot)).await
}

/// The least an upload is charged against its address's hourly bytes.
pub const MIN_UPLOAD_CHARGE: u64 = 256 * 1024;
/// A client upload's body may take this long, plus its length at the minimum rate.
const UPLOAD_GRACE: Duration = Duration::from_secs(5);
/// The slowest a client upload's body may arrive, in bytes per second.
const MIN_UPLOAD_BYTES_PER_SECOND: f64 = 32.0 * 1024.0;

/// `POST /api/attachments?conversation=&name=` on the private listener.
pub(crate) async fn staff_upload(
    State(gw): State<Arc<Gateway>>,
    staff: Staff,
    Params(query): Params<StaffUpload>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let conversation = ConversationId(query.conversation);
    let operator = staff.operator.clone().ok_or(GatewayError::Forbidden("only operators send attachments"))?;
    {
        let conv = gw.backend.conversation_reads(conversation).open_conversation(conversation).await?;
        let conv = conv.ok_or_else(|| GatewayError::NotFound(format!("conversation {}", conversation.0)))?;
        if conv.assigned() != Some(&operator) {
            return Err(GatewayError::Forbidden("you do not hold this conversation"));
        }
    }
    // And as routing decides it now: the conversation shard's copy of the holder may not
    // have heard of a reassignment yet.
    if let Some(barrier) = gw.backend.holder_barrier() {
        barrier.await.map_err(|e| GatewayError::Core(switchboard_actors::Error::Unreachable(e)))?;
        if gw.backend.shard().read().conversations.get(&conversation).and_then(|c| c.assigned()) != Some(&operator) {
            return Err(GatewayError::Forbidden("you do not hold this conversation"));
        }
    }
    let declared = declared(&headers)?;
    check_room(&gw, conversation, declared.length).await?;
    store(&gw, conversation, &query.name, declared, body, operator.0, None, None).await
}

/// A `Content-Disposition` value naming `name` (RFC 6266): `filename="…"` as it is when
/// it is printable ASCII; otherwise that with `_` for each other character, followed by
/// `filename*=UTF-8''…`, the name percent-encoded, which browsers prefer (before, a
/// name such as `счёт.pdf` made no valid header, and the download went without a name).
fn disposition(inline: bool, name: &str) -> String {
    let kind = if inline { "inline" } else { "attachment" };
    let plain = |c: char| (' '..='~').contains(&c) && c != '"' && c != '\\';
    if name.chars().all(plain) {
        return format!("{kind}; filename=\"{name}\"");
    }
    let fallback: String = name.chars().map(|c| if plain(c) { c } else { '_' }).collect();
    let mut encoded = String::with_capacity(name.len() * 3);
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("{kind}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

fn serve(attachment: &Attachment, body: Body) -> Response {
    let inline = attachment.content_type.starts_with("image/") || attachment.content_type == "application/pdf";
    let disposition = disposition(inline, &attachment.name);
    let mut response = body.into_response();
    let headers = response.headers_mut();
    if let Ok(v) = attachment.content_type.parse() {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = disposition.parse() {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("private, max-age=3600"));
    // A customer's download link carries their conversation token in its query.
    headers.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    response
}

async fn lookup(gw: &Gateway, id: &str) -> Result<Attachment, GatewayError> {
    let id = AttachmentId(id.to_string());
    let readers = gw.backend.conversation_readers();
    // One shard out of reach does not take every other shard's files with it.
    crate::found_by_any(futures::future::join_all(readers.iter().map(|r| r.attachment(&id))).await)?.ok_or_else(|| GatewayError::NotFound("attachment".into()))
}

/// `GET /attachments/{id}?token=` on the public listener.
pub(crate) async fn client_download(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    Params(query): Params<ClientDownload>,
) -> Result<Response, GatewayError> {
    let conversation = match gw.tokens.verify(&query.token)? {
        Subject::Client { conversation } => conversation,
        Subject::Staff { .. } => return Err(GatewayError::Forbidden("staff download on the private listener")),
        Subject::Visitor { .. } => return Err(GatewayError::Forbidden("a visitor token is not a conversation token")),
    };
    // Only the token's conversation's shard is asked: a client's download of an id that
    // is not its conversation's costs one read, not one per shard.
    let attachment = gw.backend.conversation_reads(conversation).attachment(&AttachmentId(id)).await?.filter(|a| a.conversation == conversation);
    let Some(attachment) = attachment else {
        return Err(GatewayError::NotFound("attachment".into()));
    };
    let body = fetched(&gw, &attachment).await?;
    Ok(serve(&attachment, body))
}

/// The file's body; one this member does not hold (it was down when the file was
/// copied, or it does not hold the conversation's shard) is fetched from another
/// member first and checked against the record's SHA-256; it is kept only by a holder
/// of the shard (`Backend::keeps_files_of`).
async fn fetched(gw: &Gateway, attachment: &Attachment) -> Result<Body, GatewayError> {
    // A copy here that goes before it is opened (a stray sweep took it) is fetched.
    if gw.blobs.has(&attachment.id).await {
        match gw.blobs.get(&attachment.id).await {
            Err(GatewayError::NotFound(_)) => {}
            answer => return answer,
        }
    }
    {
        let Ok(_fetching) = gw.fetches.clone().try_acquire_owned() else {
            return Err(GatewayError::Busy("too many files are being fetched from other members; try again shortly"));
        };
        if let Some(bytes) = gw.backend.fetch_file(attachment.id.0.clone()).await {
            let digest = sha256_hex(&bytes);
            if digest != attachment.sha256 {
                tracing::warn!(attachment = %attachment.id.0, "a member sent a file that does not match its record; not kept");
            } else if gw.backend.keeps_files_of(&FileOwner::Conversation(attachment.conversation)) {
                gw.blobs.put_bytes(&attachment.id, &bytes).await?;
            } else {
                // Served from memory by a task that holds the bytes and the fetch slot:
                // at most `REMOTE_FETCHES` such files (5 MiB each at most) at once, each
                // for at most `REMOTE_DOWNLOAD_GRACE` plus its size at
                // `MIN_DOWNLOAD_BYTES_PER_SECOND`. A reader slower than that has its
                // download cut off (the connection fails: never a file cut short that
                // looks whole), and the bytes and the slot go back then, however slowly
                // it reads.
                let deadline = tokio::time::Instant::now() + REMOTE_DOWNLOAD_GRACE + Duration::from_secs_f64(bytes.len() as f64 / MIN_DOWNLOAD_BYTES_PER_SECOND);
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
                let bytes_len = bytes.len();
                let slot = _fetching;
                tokio::spawn(async move {
                    let _slot = slot;
                    for chunk in bytes.chunks(64 * 1024) {
                        match tokio::time::timeout_at(deadline, tx.send(Ok(axum::body::Bytes::copy_from_slice(chunk)))).await {
                            Ok(Ok(())) => {}
                            // The reader went away.
                            Ok(Err(_)) => return,
                            Err(_) => {
                                let _ = tx.try_send(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the download was read too slowly")));
                                return;
                            }
                        }
                    }
                });
                // The body ends with an error, never early: a download the task gave up
                // on (its deadline passed while the channel was full) fails, so no
                // reader takes what it got for the whole file.
                let stream = futures::stream::unfold((rx, bytes_len, false), |(mut rx, left, ended)| async move {
                    if ended {
                        return None;
                    }
                    match rx.recv().await {
                        Some(Ok(chunk)) => {
                            let left = left.saturating_sub(chunk.len());
                            Some((Ok(chunk), (rx, left, false)))
                        }
                        Some(Err(e)) => Some((Err(e), (rx, left, true))),
                        None if left > 0 => Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the download was read too slowly")), (rx, left, true))),
                        None => None,
                    }
                });
                return Ok(Body::from_stream(stream));
            }
        }
    }
    gw.blobs.get(&attachment.id).await
}

/// A download served from memory (a file fetched from another member) may take this
/// long, plus its size at [`MIN_DOWNLOAD_BYTES_PER_SECOND`].
const REMOTE_DOWNLOAD_GRACE: Duration = Duration::from_secs(5);
const MIN_DOWNLOAD_BYTES_PER_SECOND: f64 = 32.0 * 1024.0;

/// Whose a file is, for where its copies go (`Backend::replicate_file`): a
/// conversation's (an upload, or a mail that replies in a conversation's thread), or a
/// channel message's before it is decided (its conversation is not known yet, but the
/// shard that will decide it is: the one its channel and sender hash to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileOwner {
    Conversation(ConversationId),
    Sender { channel: switchboard_actors::model::ChannelId, sender: String },
}

/// Keeps file `index` of a customer's channel message (its inbound key `key`) before
/// the message is proposed: stored under an id made from both (a redelivery writes the
/// same file; another message never names it), copied to a majority of the members as
/// uploads are, and described for `ChannelInboundRich`.
pub(crate) async fn keep_inbound_file(gw: &Gateway, owner: &FileOwner, key: &str, index: usize, name: String, content_type: String, bytes: &[u8]) -> Result<InboundFile, GatewayError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("inbound\0{key}\0{index}").as_bytes());
    let id = AttachmentId(digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect());
    gw.blobs.put_bytes(&id, bytes).await?;
    if let Err(e) = gw.backend.replicate_file(gw.blobs.clone(), id.clone(), owner.clone()).await {
        return Err(GatewayError::Core(switchboard_actors::Error::Commit(format!("the file could not be copied to enough cluster members: {e}"))));
    }
    let sha256 = sha256_hex(bytes);
    Ok(InboundFile { id, name, content_type, size: bytes.len() as u64, sha256 })
}

/// Whether the channel's access rules refuse this sender (as the core will at commit):
/// their message's files are then not fetched, stored or copied at all, since the
/// copies made on other members would outlive the refusal.
pub(crate) fn sender_blocked(gw: &Gateway, channel: &switchboard_actors::model::ChannelId, sender: &str) -> bool {
    sender_refused(gw, channel, sender).is_some()
}

/// What the channel's access rules tell this sender when they refuse them, as
/// [`sender_blocked`] decides it: a block rule. A channel's allow list (routing rules
/// 15) is the core's to apply, which knows whether the sender starts a conversation (an
/// allow list decides only that) and decides with the rules of the sender's shard; a
/// sender it refuses so has the files fetched for the message removed.
pub(crate) fn sender_refused(gw: &Gateway, channel: &switchboard_actors::model::ChannelId, sender: &str) -> Option<String> {
    visitor_refused(gw, channel, Some(&format!("{channel}:{sender}")))
}

/// What the block rules tell `visitor` when they refuse them anything more in an open
/// conversation on `channel` (the check the core makes of each of their messages).
fn visitor_refused(gw: &Gateway, channel: &switchboard_actors::model::ChannelId, visitor: Option<&str>) -> Option<String> {
    let directory = gw.backend.directory_shard();
    let state = directory.read();
    switchboard_actors::access::check_open(&state, channel, switchboard_actors::access::Customer { ip: None, visitor }).err()
}

/// Removes the files of a refused channel message: nothing refers to them (their ids
/// are the message's own, so no other message's record names them).
pub(crate) async fn forget_inbound_files(gw: &Gateway, files: &[InboundFile]) {
    for file in files {
        gw.blobs.remove(&file.id).await;
    }
}

/// A file's bytes for the outbox (files are at most `MAX_ATTACHMENT_BYTES`), fetched
/// from another member when this one does not hold it; `None` when none does.
pub async fn file_bytes(gw: &Gateway, attachment: &Attachment) -> Option<Vec<u8>> {
    if let Ok(Some(bytes)) = gw.blobs.read_all(&attachment.id).await {
        return Some(bytes);
    }
    let bytes = gw.backend.fetch_file(attachment.id.0.clone()).await?;
    let digest = sha256_hex(&bytes);
    if digest != attachment.sha256 {
        tracing::warn!(attachment = %attachment.id.0, "a member sent a file that does not match its record; not kept");
        return None;
    }
    if gw.backend.keeps_files_of(&FileOwner::Conversation(attachment.conversation)) {
        let _ = gw.blobs.put_bytes(&attachment.id, &bytes).await;
    }
    Some(bytes)
}

/// `GET /api/channel-api/{channel}/files/{id}` (the channel's token checked by the
/// caller): a file staff sent in a conversation on `channel`; any other (another
/// channel's, or one the customer sent: the adapter had it first, and a token must not
/// turn the node into a reader of whatever its adapter's origin serves) is not found.
/// A file whose bytes no reachable member holds now is `503`, to be asked again.
pub(crate) async fn channel_download(gw: &Gateway, channel: &switchboard_actors::model::ChannelId, id: &str) -> Result<Response, GatewayError> {
    if id.is_empty() || id.len() > 64 {
        return Err(GatewayError::NotFound("attachment".into()));
    }
    let attachment = lookup(gw, id).await?;
    if attachment.uploaded_by == "client" {
        return Err(GatewayError::NotFound("attachment".into()));
    }
    let conversation = gw.backend.conversation_reads(attachment.conversation).conversation(attachment.conversation).await?;
    if !conversation.is_some_and(|c| c.channel == *channel) {
        return Err(GatewayError::NotFound("attachment".into()));
    }
    match fetched(gw, &attachment).await {
        Ok(body) => Ok(serve(&attachment, body)),
        Err(GatewayError::NotFound(_)) => Err(GatewayError::Busy("no member that holds the file can be reached now; ask again shortly")),
        Err(e) => Err(e),
    }
}

/// `GET /api/attachments/{id}` on the private listener.
pub(crate) async fn staff_download(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Response, GatewayError> {
    let attachment = lookup(&gw, &id).await?;
    readable(&gw, &staff, attachment.conversation).await?;
    let body = fetched(&gw, &attachment).await?;
    Ok(serve(&attachment, body))
}

/// Cross-origin access for the widget embedded on a customer's site: uploads and
/// downloads answer preflights and carry `Access-Control-Allow-Origin` for the allowed
/// client origins only.
pub(crate) async fn cors(
    State(gw): State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let allowed = origin.filter(|o| gw.config.client_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o)));
    if request.method() == axum::http::Method::OPTIONS {
        let Some(origin) = allowed else {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        };
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        if let Ok(v) = origin.parse() {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET, POST"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, header::HeaderValue::from_static("content-type"));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
        headers.insert(header::VARY, header::HeaderValue::from_static("origin"));
        return response;
    }
    let mut response = next.run(request).await;
    if let Some(Ok(v)) = allowed.map(|o| o.parse()) {
        response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        response.headers_mut().insert(header::VARY, header::HeaderValue::from_static("origin"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

    #[test]
    fn names_lose_paths_control_and_bidi_characters_and_match_their_type() {
        assert_eq!(clean_name("../../etc/passwd", "text/plain"), "passwd.txt");
        assert_eq!(clean_name("C:\\docs\\a\"b.pdf", "application/pdf"), "ab.pdf");
        assert_eq!(clean_name("line\nbreak.txt", "text/plain"), "linebreak.txt");
        assert_eq!(clean_name("", "image/png"), "file.png");
        assert_eq!(clean_name("invoice\u{202E}fdp.exe", "application/pdf"), "invoicefdp.exe.pdf");
        assert_eq!(clean_name("photo.JPEG", "image/jpeg"), "photo.JPEG");
    }

    /// A ZIP local file header naming `name`, as the first entry of an archive.
    fn zip_with_first_entry(name: &str) -> Vec<u8> {
        let mut out = b"PK\x03\x04".to_vec();
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(name.as_bytes());
        out
    }

    #[test]
    fn a_docx_must_be_an_office_package_not_any_zip() {
        assert!(signature_matches(DOCX, &zip_with_first_entry("[Content_Types].xml")));
        assert!(signature_matches(DOCX, &zip_with_first_entry("_rels/.rels")));
        assert!(!signature_matches(DOCX, &zip_with_first_entry("evil.js")));
        assert!(!signature_matches(DOCX, b"PK\x03\x04"));
    }

    #[test]
    fn text_is_checked_across_chunk_boundaries() {
        let text = "привет".as_bytes();
        let mut sniff = Sniffer::new("text/plain");
        sniff.feed(&text[..3]).unwrap();
        sniff.feed(&text[3..]).unwrap();
        assert!(sniff.finish().is_ok(), "a character split between chunks is fine");
        let mut sniff = Sniffer::new("text/plain");
        sniff.feed(&text[..3]).unwrap();
        assert!(sniff.finish().is_err(), "a cut character at the end is not text");
        let mut sniff = Sniffer::new("text/plain");
        assert!(sniff.feed(b"a\0b").is_err());
    }

    #[tokio::test]
    async fn blobs_stream_in_and_out_and_refuse_foreign_ids() {
        let dir = tempfile_dir("ok");
        let store = BlobStore::open(dir.clone()).unwrap();
        let (id, sha) = store.put(Body::from("hello"), "text/plain", 5).await.unwrap();
        assert_eq!(sha, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        let body = store.get(&id).await.unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
        assert!(store.get(&AttachmentId("../../etc/passwd".into())).await.is_err());
        // A body that is not what it claims leaves nothing behind.
        assert!(store.put(Body::from("<script>"), "image/png", 8).await.is_err());
        assert!(store.put(Body::from("short"), "text/plain", 9).await.is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only the stored file remains");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn settled_ids_are_the_stored_files_old_enough() {
        let dir = tempfile_dir("settled");
        let store = BlobStore::open(dir.clone()).unwrap();
        let (id, _) = store.put(Body::from("hello"), "text/plain", 5).await.unwrap();
        // A write under way and a stranger's file are not ids.
        std::fs::write(dir.join(format!("{}.0011223344556677.partial", id.0)), b"half").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not ours").unwrap();
        let listed: Vec<AttachmentId> = store.settled_ids(std::time::Duration::ZERO).unwrap().collect();
        assert_eq!(listed, vec![id.clone()]);
        let young: Vec<AttachmentId> = store.settled_ids(std::time::Duration::from_secs(3600)).unwrap().collect();
        assert!(young.is_empty(), "a file written just now is not settled for an hour: {young:?}");
        // Old, and then written again: its clock starts over.
        let path = dir.join(&id.0);
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options().append(true).open(&path).unwrap().set_modified(hour_ago).unwrap();
        assert!(store.settled(&id, std::time::Duration::from_secs(3600)).await);
        store.put_bytes(&id, b"hello").await.unwrap();
        assert!(!store.settled(&id, std::time::Duration::from_secs(3600)).await, "a file put again is new");
        assert!(!store.remove_if_settled(&id, std::time::Duration::from_secs(3600)).await, "a file just put again stays");
        assert!(dir.join(&id.0).exists());
        std::fs::File::options().append(true).open(&path).unwrap().set_modified(hour_ago).unwrap();
        // While a write of the same id runs, the removal waits for it, and then finds
        // the file young again.
        let writing = store.lock_of(&id).lock().await;
        let removal = tokio::spawn({
            let (store, id) = (store.clone(), id.clone());
            async move { store.remove_if_settled(&id, std::time::Duration::from_secs(3600)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!removal.is_finished(), "the removal waits for the write");
        std::fs::File::options().append(true).open(&path).unwrap().set_modified(std::time::SystemTime::now()).unwrap();
        drop(writing);
        assert!(!removal.await.unwrap(), "a file written meanwhile stays");
        std::fs::File::options().append(true).open(&path).unwrap().set_modified(hour_ago).unwrap();
        assert!(store.remove_if_settled(&id, std::time::Duration::from_secs(3600)).await, "an old file goes");
        assert!(!dir.join(&id.0).exists());
        // Put again after it went: written anew, not an error.
        store.put_bytes(&id, b"hello").await.unwrap();
        assert!(store.remove(&id).await && !store.remove(&id).await, "removed once");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("sb-blobs-{tag}-{}", std::process::id()))
    }
}
