//! Attachments: a content store on disk for the bytes, and a Raft-committed record of
//! each file (conversation, name, type, size, digest) that decides who may use it.
//!
//! A file is written and fsynced before its record is committed, so a committed record
//! never points at missing bytes; a file whose record is refused is removed again. The
//! declared type must match the bytes (a "PNG" must start like one), and each
//! conversation has a quota of files and bytes.
//!
//! Left out for now: the store is the data folder's `attachments/` on the node that
//! received the upload. Replicating it to the other replicas of the shard comes with
//! the multi-node cluster.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use switchboard_actors::model::{Attachment, AttachmentId, Command, ConversationId};
use tokio::io::AsyncWriteExt;

use crate::auth::Subject;
use crate::rest::{check_read, Params, Staff};
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

/// Files by id in one folder; ids are random hex, never derived from user input.
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(BlobStore { dir })
    }

    fn path(&self, id: &AttachmentId) -> Option<PathBuf> {
        let valid = id.0.len() == 32 && id.0.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        valid.then(|| self.dir.join(&id.0))
    }

    /// Stores bytes durably and returns their new id and SHA-256.
    pub async fn put(&self, bytes: &[u8]) -> Result<(AttachmentId, String), GatewayError> {
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| GatewayError::Internal("no randomness".into()))?;
        let id = AttachmentId(raw.iter().map(|b| format!("{b:02x}")).collect());
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let sha256: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let path = self.path(&id).ok_or_else(|| GatewayError::Internal("bad generated id".into()))?;
        let partial = path.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial).await?;
        file.write_all(bytes).await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&partial, &path).await?;
        // The rename itself must survive a crash too.
        tokio::fs::File::open(&self.dir).await?.sync_all().await?;
        Ok((id, sha256))
    }

    /// Removes a file no committed record refers to.
    pub async fn remove(&self, id: &AttachmentId) {
        if let Some(path) = self.path(id) {
            if let Err(e) = tokio::fs::remove_file(&path).await {
                tracing::warn!(attachment = %id.0, error = %e, "could not remove an unreferenced file");
            }
        }
    }

    pub async fn get(&self, id: &AttachmentId) -> Result<Vec<u8>, GatewayError> {
        let path = self.path(id).ok_or_else(|| GatewayError::NotFound("attachment".into()))?;
        tokio::fs::read(path).await.map_err(|_| GatewayError::NotFound("attachment".into()))
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

/// Keeps a display name harmless: no path parts, no control characters, bounded length.
fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control() && *c != '"').take(200).collect();
    if cleaned.trim().is_empty() {
        "file".into()
    } else {
        cleaned
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

/// Whether the bytes look like the declared type, by the signature each format starts
/// with; text must be UTF-8 without NUL bytes. Stops a script served as an "image".
fn content_matches(content_type: &str, bytes: &[u8]) -> bool {
    match content_type {
        "image/png" => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => bytes.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a"),
        "image/webp" => bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP",
        "application/pdf" => bytes.starts_with(b"%PDF-"),
        "application/msword" => bytes.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => bytes.starts_with(b"PK\x03\x04"),
        "text/plain" => !bytes.contains(&0) && std::str::from_utf8(bytes).is_ok(),
        _ => false,
    }
}

fn body(bytes: Result<Bytes, BytesRejection>) -> Result<Bytes, GatewayError> {
    let bytes = bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::TooLarge(MAX_ATTACHMENT_BYTES)
        } else {
            GatewayError::BadRequest(e.body_text())
        }
    })?;
    if bytes.len() > MAX_ATTACHMENT_BYTES {
        return Err(GatewayError::TooLarge(MAX_ATTACHMENT_BYTES));
    }
    if bytes.is_empty() {
        return Err(GatewayError::BadRequest("the file is empty".into()));
    }
    Ok(bytes)
}

async fn store(gw: &Gateway, conversation: ConversationId, name: &str, content_type: String, bytes: &[u8], by: String) -> Result<Response, GatewayError> {
    if !content_matches(&content_type, bytes) {
        return Err(GatewayError::UnsupportedType(format!("{content_type} (the file's content is not of that type)")));
    }
    {
        let shard = gw.backend.shard();
        let state = shard.read();
        switchboard_actors::core::attachment_room(&state, conversation, bytes.len() as u64)?;
    }
    let (id, sha256) = gw.blobs.put(bytes).await?;
    let attachment =
        Attachment { id, conversation, name: clean_name(name), content_type, size: bytes.len() as u64, sha256, uploaded_by: by };
    if let Err(e) = gw.submit(Command::StoreAttachment(attachment.clone())).await {
        // Refused: nothing refers to the bytes, so do not keep them. After a commit
        // failure the record may still apply, so the bytes must stay.
        if e.is_refusal() {
            gw.blobs.remove(&attachment.id).await;
        }
        return Err(e.into());
    }
    let reply = json!({"id": attachment.id.0, "name": attachment.name, "content_type": attachment.content_type, "size": attachment.size});
    Ok((StatusCode::CREATED, Json(reply)).into_response())
}

/// `POST /attachments?token=&name=` on the public listener.
pub(crate) async fn client_upload(
    State(gw): State<Arc<Gateway>>,
    Params(query): Params<ClientUpload>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, GatewayError> {
    let conversation = match gw.tokens.verify(&query.token)? {
        Subject::Client { conversation } => conversation,
        Subject::Staff { .. } => return Err(GatewayError::Forbidden("staff upload on the private listener")),
        Subject::Visitor { .. } => return Err(GatewayError::Forbidden("a visitor token is not a conversation token")),
    };
    let content_type = content_type(&headers)?;
    let bytes = body(bytes)?;
    let open = {
        let shard = gw.backend.shard();
        let state = shard.read();
        state.conversations.get(&conversation).map(|c| c.status != switchboard_actors::state::ConversationStatus::Closed)
    };
    match open {
        Some(true) => {}
        Some(false) => return Err(GatewayError::Core(switchboard_actors::Error::Closed(conversation))),
        None => return Err(GatewayError::NotFound(format!("conversation {}", conversation.0))),
    }
    store(&gw, conversation, &query.name, content_type, &bytes, "client".into()).await
}

/// `POST /api/attachments?conversation=&name=` on the private listener.
pub(crate) async fn staff_upload(
    State(gw): State<Arc<Gateway>>,
    staff: Staff,
    Params(query): Params<StaffUpload>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, GatewayError> {
    let conversation = ConversationId(query.conversation);
    let operator = staff.operator.clone().ok_or(GatewayError::Forbidden("only operators send attachments"))?;
    {
        let shard = gw.backend.shard();
        let state = shard.read();
        let conv = state.conversations.get(&conversation).ok_or_else(|| GatewayError::NotFound(format!("conversation {}", conversation.0)))?;
        if conv.assigned() != Some(&operator) {
            return Err(GatewayError::Forbidden("you do not hold this conversation"));
        }
    }
    let content_type = content_type(&headers)?;
    let bytes = body(bytes)?;
    store(&gw, conversation, &query.name, content_type, &bytes, operator.0).await
}

fn serve(attachment: &Attachment, bytes: Vec<u8>) -> Response {
    let inline = attachment.content_type.starts_with("image/") || attachment.content_type == "application/pdf";
    let disposition = format!("{}; filename=\"{}\"", if inline { "inline" } else { "attachment" }, attachment.name.replace(['\r', '\n'], " "));
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    if let Ok(v) = attachment.content_type.parse() {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = disposition.parse() {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("private, max-age=3600"));
    response
}

fn lookup(gw: &Gateway, id: &str) -> Result<Attachment, GatewayError> {
    let shard = gw.backend.shard();
    let state = shard.read();
    state.attachments.get(&AttachmentId(id.to_string())).cloned().ok_or_else(|| GatewayError::NotFound("attachment".into()))
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
    let attachment = lookup(&gw, &id)?;
    if attachment.conversation != conversation {
        return Err(GatewayError::NotFound("attachment".into()));
    }
    let bytes = gw.blobs.get(&attachment.id).await?;
    Ok(serve(&attachment, bytes))
}

/// `GET /api/attachments/{id}` on the private listener.
pub(crate) async fn staff_download(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Response, GatewayError> {
    let attachment = lookup(&gw, &id)?;
    {
        let shard = gw.backend.shard();
        let state = shard.read();
        check_read(&staff, &state, attachment.conversation)?;
    }
    let bytes = gw.blobs.get(&attachment.id).await?;
    Ok(serve(&attachment, bytes))
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

    #[test]
    fn names_lose_paths_and_control_characters() {
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("C:\\docs\\a\"b.pdf"), "ab.pdf");
        assert_eq!(clean_name("line\nbreak.txt"), "linebreak.txt");
        assert_eq!(clean_name(""), "file");
    }

    #[tokio::test]
    async fn blobs_round_trip_and_refuse_foreign_ids() {
        let dir = std::env::temp_dir().join(format!("sb-blobs-{}", std::process::id()));
        let store = BlobStore::open(dir.clone()).unwrap();
        let (id, sha) = store.put(b"hello").await.unwrap();
        assert_eq!(sha, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(store.get(&id).await.unwrap(), b"hello");
        assert!(store.get(&AttachmentId("../../etc/passwd".into())).await.is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
