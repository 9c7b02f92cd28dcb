//! Local stand-ins for messenger providers, speaking their public HTTP contracts as
//! documented, for tests and the bench. Nothing here reaches the internet.
//!
//! [`FakeTelegram`] serves the Bot API's `sendMessage`
//! (`POST /bot<token>/sendMessage`, JSON `chat_id` and `text`), answering
//! `{"ok":true,"result":{"message_id":N,…}}`, or, while a failure is scripted, the API's
//! error shape: `{"ok":false,"error_code":429,"description":"Too Many Requests: retry
//! after S","parameters":{"retry_after":S}}` or a 500. It refuses a wrong token with
//! 401 `Unauthorized` as the API does, and keeps every message it accepted.
//!
//! [`FakeWhatsApp`] serves WhatsApp Cloud API's send endpoint; [`meta_signature`] signs
//! webhooks as Meta does.
//!
//! [`FakeAdapter`] is an adapter of the open Channel API's outbound half: it checks the
//! signature, deduplicates on the delivery id, and keeps what it received.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// Serves `app` on a free loopback port until the returned sender is dropped (with the
/// fake that holds it).
async fn serve(app: Router) -> anyhow::Result<(SocketAddr, Arc<tokio::sync::oneshot::Sender<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((addr, Arc::new(stop)))
}

/// The parts of a `multipart/form-data` body: (field name, file name, bytes).
pub fn multipart(headers: &HeaderMap, body: &[u8]) -> Option<Vec<(String, Option<String>, Vec<u8>)>> {
    let content_type = headers.get("content-type")?.to_str().ok()?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delimiter = format!("\r\n--{boundary}");
    // The body starts with the delimiter without its CRLF.
    let mut rest = [b"\r\n".as_slice(), body].concat();
    let mut parts = Vec::new();
    loop {
        let at = find(&rest, delimiter.as_bytes())?;
        rest.drain(..at + delimiter.len());
        if rest.starts_with(b"--") {
            return Some(parts);
        }
        let head_end = find(&rest, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        rest.drain(..head_end + 4);
        let end = find(&rest, delimiter.as_bytes())?;
        let disposition = head.lines().find(|l| l.to_ascii_lowercase().starts_with("content-disposition:")).unwrap_or_default().to_owned();
        let param = |key: &str| disposition.split(';').map(str::trim).find_map(|p| p.strip_prefix(key)).map(|v| v.trim_matches('"').to_owned());
        let name = param("name=")?;
        parts.push((name, param("filename="), rest[..end].to_vec()));
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One scripted answer instead of a success.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// 429 with `retry_after` seconds.
    TooMany(u64),
    /// 500 Internal Server Error.
    ServerError,
    /// The message is taken (the customer gets it) but the answer comes only after
    /// this long: a sender killed meanwhile never learns what happened.
    Hang(std::time::Duration),
}

#[derive(Default)]
struct TelegramState {
    token: String,
    /// Files customers sent, by file_id: (file_path, bytes).
    files: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Messages with files accepted: (method, chat_id, caption, [(file name, bytes)]).
    sent_files: Vec<(String, String, String, Vec<(String, Vec<u8>)>)>,
    faults: VecDeque<Fault>,
    /// Accepted messages: (chat_id as sent, text, message_id).
    sent: Vec<(Value, String, i64)>,
    /// Every call, accepted or not, with the time it came.
    calls: Vec<std::time::Instant>,
    /// `getFile` calls, by file id.
    file_lookups: Vec<String>,
    /// The next this many `getFile` calls answer 500.
    failing_lookups: u32,
    next_id: i64,
}

#[derive(Clone)]
pub struct FakeTelegram {
    pub addr: SocketAddr,
    state: Arc<Mutex<TelegramState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeTelegram {
    /// Serves on a free loopback port; `token` is the only bot token it accepts.
    pub async fn start(token: &str) -> anyhow::Result<FakeTelegram> {
        let state = Arc::new(Mutex::new(TelegramState { token: token.to_owned(), next_id: 1000, ..Default::default() }));
        let app = Router::new()
            .route("/{bot}/sendMessage", post(send_message))
            .route("/{bot}/getFile", post(telegram_get_file))
            .route("/{bot}/sendPhoto", post(telegram_send_files))
            .route("/{bot}/sendDocument", post(telegram_send_files))
            .route("/{bot}/sendMediaGroup", post(telegram_send_files))
            .route("/file/{bot}/{*path}", axum::routing::get(telegram_file))
            .with_state(state.clone());
        let (addr, stop) = serve(app).await?;
        Ok(FakeTelegram { addr, state, _stop: stop })
    }

    /// Messages with files it accepted: (method, chat_id, caption, [(file name, bytes)]).
    pub fn sent_files(&self) -> Vec<(String, String, String, Vec<(String, Vec<u8>)>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent_files.clone()
    }

    /// A file a customer sent, for `getFile` and the download that follows.
    pub fn add_file(&self, file_id: &str, bytes: &[u8]) {
        let path = format!("documents/{file_id}");
        self.state.lock().unwrap_or_else(|p| p.into_inner()).files.insert(file_id.to_owned(), (path, bytes.to_vec()));
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next calls get these answers, in order, before successes resume.
    pub fn script(&self, faults: &[Fault]) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).faults.extend(faults.iter().copied());
    }

    /// Accepted messages: (chat_id, text).
    pub fn sent(&self) -> Vec<(Value, String)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent.iter().map(|(c, t, _)| (c.clone(), t.clone())).collect()
    }

    pub fn calls(&self) -> Vec<std::time::Instant> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).calls.clone()
    }

    /// The next `n` `getFile` calls answer 500 (Telegram's servers in trouble).
    pub fn fail_file_lookups(&self, n: u32) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failing_lookups = n;
    }

    /// The file ids `getFile` was asked for, in order.
    pub fn file_lookups(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).file_lookups.clone()
    }
}

/// `getFile`: `{"ok":true,"result":{"file_id","file_size","file_path"}}`, or 400 with
/// `Bad Request: invalid file_id`.
async fn telegram_get_file(State(state): State<Arc<Mutex<TelegramState>>>, Path(bot): Path<String>, body: axum::body::Bytes) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if bot.strip_prefix("bot") != Some(s.token.as_str()) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"}))).into_response();
    }
    let file_id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["file_id"].as_str().map(str::to_owned)).unwrap_or_default();
    s.file_lookups.push(file_id.clone());
    if s.failing_lookups > 0 {
        s.failing_lookups -= 1;
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}))).into_response();
    }
    match s.files.get(&file_id) {
        Some((path, bytes)) => Json(json!({"ok": true, "result": {"file_id": file_id, "file_unique_id": "u", "file_size": bytes.len(), "file_path": path}})).into_response(),
        None => (StatusCode::BAD_REQUEST, Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: invalid file_id"}))).into_response(),
    }
}

/// `sendPhoto`, `sendDocument` (a `photo` or `document` file part and a `caption`) and
/// `sendMediaGroup` (a `media` JSON array naming `attach://<part>` files, the first
/// with the caption), as `multipart/form-data`.
async fn telegram_send_files(State(state): State<Arc<Mutex<TelegramState>>>, Path(bot): Path<String>, uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let (answer, hang) = answer_send_files(&state, &bot, &uri, &headers, &body);
    if let Some(hang) = hang {
        tokio::time::sleep(hang).await;
    }
    answer
}

fn answer_send_files(state: &Mutex<TelegramState>, bot: &str, uri: &axum::http::Uri, headers: &HeaderMap, body: &[u8]) -> (Response, Option<std::time::Duration>) {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if bot.strip_prefix("bot") != Some(s.token.as_str()) {
        return ((StatusCode::UNAUTHORIZED, Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"}))).into_response(), None);
    }
    let bad = |d: &str| ((StatusCode::BAD_REQUEST, Json(json!({"ok": false, "error_code": 400, "description": format!("Bad Request: {d}")}))).into_response(), None);
    let Some(parts) = multipart(headers, body) else { return bad("not multipart/form-data") };
    let field = |name: &str| parts.iter().find(|(n, _, _)| n == name).map(|(_, f, b)| (f.clone(), b.clone()));
    let method = uri.path().rsplit('/').next().unwrap_or_default().to_owned();
    let Some((_, chat_id)) = field("chat_id") else { return bad("chat_id is required") };
    let chat_id = String::from_utf8_lossy(&chat_id).into_owned();
    let (caption, files) = if method == "sendMediaGroup" {
        let Some(media) = field("media").and_then(|(_, b)| serde_json::from_slice::<Vec<Value>>(&b).ok()) else { return bad("media is required") };
        let mut files = Vec::new();
        for item in &media {
            let Some(file) = item["media"].as_str().and_then(|m| m.strip_prefix("attach://")).and_then(|n| field(n)) else { return bad("a media item names no attached file") };
            files.push((file.0.unwrap_or_default(), file.1));
        }
        if !(2..=10).contains(&files.len()) {
            return bad("an album has 2-10 items");
        }
        (media[0]["caption"].as_str().unwrap_or_default().to_owned(), files)
    } else {
        let part = if method == "sendPhoto" { "photo" } else { "document" };
        let Some((name, bytes)) = field(part) else { return bad(&format!("{part} is required")) };
        let caption = field("caption").map(|(_, b)| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        (caption, vec![(name.unwrap_or_default(), bytes)])
    };
    if caption.chars().count() > 1024 {
        return bad("message caption is too long");
    }
    s.next_id += 1;
    let id = s.next_id;
    s.sent_files.push((method, chat_id, caption, files));
    // A scripted hang holds the upload's answer (the files are taken, as a provider
    // that received them but has not answered yet); other faults are for `sendMessage`.
    let hang = match s.faults.front() {
        Some(Fault::Hang(d)) => Some(*d),
        _ => None,
    };
    if hang.is_some() {
        s.faults.pop_front();
    }
    (Json(json!({"ok": true, "result": {"message_id": id, "date": 0, "chat": {"id": 0, "type": "private"}}})).into_response(), hang)
}

/// `GET /file/bot<token>/<file_path>`: the file's bytes.
async fn telegram_file(State(state): State<Arc<Mutex<TelegramState>>>, Path((bot, path)): Path<(String, String)>) -> Response {
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    if bot.strip_prefix("bot") != Some(s.token.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match s.files.values().find(|(p, _)| *p == path) {
        Some((_, bytes)) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn send_message(State(state): State<Arc<Mutex<TelegramState>>>, Path(bot): Path<String>, body: axum::body::Bytes) -> Response {
    let (answer, hang) = answer_send(&state, &bot, &body);
    if let Some(hang) = hang {
        tokio::time::sleep(hang).await;
    }
    answer
}

fn answer_send(state: &Mutex<TelegramState>, bot: &str, body: &[u8]) -> (Response, Option<std::time::Duration>) {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.calls.push(std::time::Instant::now());
    if bot.strip_prefix("bot") != Some(s.token.as_str()) {
        return ((StatusCode::UNAUTHORIZED, Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"}))).into_response(), None);
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return ((StatusCode::BAD_REQUEST, Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: can't parse JSON"}))).into_response(), None);
    };
    let (Some(chat_id), Some(text)) = (request.get("chat_id").cloned(), request.get("text").and_then(Value::as_str)) else {
        return ((StatusCode::BAD_REQUEST, Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: chat_id and text are required"}))).into_response(), None);
    };
    if text.is_empty() {
        return ((StatusCode::BAD_REQUEST, Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: message text is empty"}))).into_response(), None);
    }
    let mut hang = None;
    match s.faults.pop_front() {
        Some(Fault::TooMany(after)) => {
            let body = json!({"ok": false, "error_code": 429, "description": format!("Too Many Requests: retry after {after}"), "parameters": {"retry_after": after}});
            return ((StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response(), None);
        }
        Some(Fault::ServerError) => {
            return ((StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}))).into_response(), None);
        }
        Some(Fault::Hang(d)) => hang = Some(d),
        None => {}
    }
    s.next_id += 1;
    let id = s.next_id;
    s.sent.push((chat_id.clone(), text.to_owned(), id));
    (Json(json!({"ok": true, "result": {"message_id": id, "date": 0, "chat": {"id": chat_id, "type": "private"}, "text": text}})).into_response(), hang)
}

#[derive(Default)]
struct AdapterState {
    secret: String,
    seen: HashSet<String>,
    received: Vec<Value>,
    duplicates: u64,
    bad_signatures: u64,
    /// The next delivery is taken but answered only after this long.
    hang_next: Option<std::time::Duration>,
    /// The next delivery is refused `429` with `Retry-After` of this many seconds.
    too_many_next: Option<u64>,
    /// When each delivery arrived (signed or not), in order.
    calls: Vec<std::time::Instant>,
    /// Files it serves at `/media/{name}`: (type, bytes); fetches answered with one.
    files: std::collections::HashMap<String, (String, Vec<u8>)>,
    fetches: u64,
    addr: Option<SocketAddr>,
}

/// An adapter's outbound endpoint for the Channel API.
#[derive(Clone)]
pub struct FakeAdapter {
    pub addr: SocketAddr,
    state: Arc<Mutex<AdapterState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeAdapter {
    pub async fn start() -> anyhow::Result<FakeAdapter> {
        let state = Arc::new(Mutex::new(AdapterState::default()));
        let app = Router::new().route("/outbound", post(outbound)).route("/media/{name}", axum::routing::get(media)).with_state(state.clone());
        let (addr, stop) = serve(app).await?;
        state.lock().unwrap_or_else(|p| p.into_inner()).addr = Some(addr);
        Ok(FakeAdapter { addr, state, _stop: stop })
    }

    /// Serves `bytes` as `content_type` at `/media/{name}` (to fetches signed with the
    /// channel's secret), and answers its URL.
    pub fn add_file(&self, name: &str, content_type: &str, bytes: &[u8]) -> String {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).files.insert(name.to_owned(), (content_type.to_owned(), bytes.to_vec()));
        format!("http://{}/media/{name}", self.addr)
    }

    /// How many file fetches were answered with a file.
    pub fn fetches(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).fetches
    }

    pub fn url(&self) -> String {
        format!("http://{}/outbound", self.addr)
    }

    /// The signing secret the channel's settings answered with.
    pub fn set_secret(&self, secret: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).secret = secret.to_owned();
    }

    pub fn received(&self) -> Vec<Value> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).received.clone()
    }

    /// The next delivery is taken, and answered only after `d`.
    pub fn hang_next(&self, d: std::time::Duration) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).hang_next = Some(d);
    }

    /// The next delivery is refused `429 Too Many Requests` with `Retry-After: secs`.
    pub fn too_many_next(&self, secs: u64) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).too_many_next = Some(secs);
    }

    /// When each delivery arrived, in order.
    pub fn calls(&self) -> Vec<std::time::Instant> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).calls.clone()
    }

    /// (duplicates dropped, bad signatures refused).
    pub fn refused(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.duplicates, s.bad_signatures)
    }
}

async fn outbound(State(state): State<Arc<Mutex<AdapterState>>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let (answer, hang) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.calls.push(std::time::Instant::now());
        if let Some(secs) = s.too_many_next.take() {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", secs.to_string())], "slow down").into_response();
        }
        let answer = take_outbound(&mut s, &headers, &body);
        (answer, s.hang_next.take())
    };
    if let Some(hang) = hang {
        tokio::time::sleep(hang).await;
    }
    answer
}

fn take_outbound(s: &mut AdapterState, headers: &HeaderMap, body: &[u8]) -> Response {
    let signature = headers.get("x-switchboard-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let t = signature.split(',').find_map(|p| p.strip_prefix("t=")).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    if s.secret.is_empty() || signature != switchboard_adapters_signature(&s.secret, t, body) {
        s.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let id = value["delivery_id"].as_str().unwrap_or_default().to_owned();
    if !s.seen.insert(id.clone()) {
        s.duplicates += 1;
    } else {
        s.received.push(value);
    }
    Json(json!({"provider_message_id": format!("fake-{id}")})).into_response()
}

/// A file the adapter serves: only to a GET signed over its full URL; a name starting
/// with `busy-` is answered 503.
async fn media(State(state): State<Arc<Mutex<AdapterState>>>, Path(name): Path<String>, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let url = format!("http://{}{}", s.addr.map(|a| a.to_string()).unwrap_or_default(), uri.path_and_query().map(|p| p.as_str()).unwrap_or_default());
    let signature = headers.get("x-switchboard-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let t = signature.split(',').find_map(|p| p.strip_prefix("t=")).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    if s.secret.is_empty() || signature != switchboard_adapters_signature(&s.secret, t, url.as_bytes()) {
        s.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    if name.starts_with("busy-") {
        return (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response();
    }
    let Some((content_type, bytes)) = s.files.get(&name).cloned() else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    s.fetches += 1;
    ([(axum::http::header::CONTENT_TYPE, content_type)], bytes).into_response()
}

/// The Channel API's signature, computed here independently of the server's code:
/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn switchboard_adapters_signature(secret: &str, t: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = t.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &signed);
    format!("t={t},v1={}", tag.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[derive(Default)]
struct WhatsAppState {
    token: String,
    faults: VecDeque<Fault>,
    /// Accepted messages: (to, text, wamid).
    sent: Vec<(String, String, String)>,
    next_id: u64,
    /// Media customers sent, by media id: (MIME type, bytes).
    media: std::collections::HashMap<String, (String, Vec<u8>)>,
    addr: Option<SocketAddr>,
    /// Files uploaded with `POST /<phone>/media`, by the id given: (file name, bytes).
    uploads: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Messages with a file accepted: (to, type, caption, file name, bytes).
    sent_files: Vec<(String, String, String, String, Vec<u8>)>,
}

/// WhatsApp Cloud API's send endpoint, `POST /<version>/<phone number id>/messages`
/// with a bearer access token, answering `{"messaging_product":"whatsapp","contacts":
/// […],"messages":[{"id":"wamid.…"}]}`, or the Graph API's error shape
/// `{"error":{"message","type","code","fbtrace_id"}}`: code 130429 (throughput limit)
/// with HTTP 429 for [`Fault::TooMany`], code 1 with HTTP 500 for
/// [`Fault::ServerError`], 190 with 401 for a wrong token.
#[derive(Clone)]
pub struct FakeWhatsApp {
    pub addr: SocketAddr,
    state: Arc<Mutex<WhatsAppState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeWhatsApp {
    pub async fn start(token: &str) -> anyhow::Result<FakeWhatsApp> {
        let state = Arc::new(Mutex::new(WhatsAppState { token: token.to_owned(), ..Default::default() }));
        let app = Router::new()
            .route("/{version}/{phone}/messages", post(whatsapp_send))
            .route("/{version}/{phone}/media", post(whatsapp_upload))
            .route("/{version}/{media}", axum::routing::get(whatsapp_media_info))
            .route("/download/{media}", axum::routing::get(whatsapp_media_download))
            .with_state(state.clone());
        let (addr, stop) = serve(app).await?;
        state.lock().unwrap_or_else(|p| p.into_inner()).addr = Some(addr);
        Ok(FakeWhatsApp { addr, state, _stop: stop })
    }

    /// Messages with a file it accepted: (to, type, caption, file name, bytes).
    pub fn sent_files(&self) -> Vec<(String, String, String, String, Vec<u8>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent_files.clone()
    }

    /// Media a customer sent: `GET /<version>/<id>` describes it, its URL serves it,
    /// both with the access token.
    pub fn add_media(&self, id: &str, mime_type: &str, bytes: &[u8]) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).media.insert(id.to_owned(), (mime_type.to_owned(), bytes.to_vec()));
    }

    /// The `api_base` to configure: this server and a Graph API version.
    pub fn api_base(&self) -> String {
        format!("http://{}/v21.0", self.addr)
    }

    pub fn script(&self, faults: &[Fault]) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).faults.extend(faults.iter().copied());
    }

    /// Accepted messages: (to, text, wamid).
    pub fn sent(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent.clone()
    }
}

/// `POST /<version>/<phone number id>/media`: `messaging_product`, `type` and a `file`
/// part, answering `{"id": …}`.
async fn whatsapp_upload(State(state): State<Arc<Mutex<WhatsAppState>>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if bearer != s.token {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    let Some(parts) = multipart(&headers, &body) else { return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter") };
    let product = parts.iter().any(|(n, _, b)| n == "messaging_product" && b == b"whatsapp");
    let file = parts.into_iter().find(|(n, _, _)| n == "file");
    let (true, Some((_, name, bytes))) = (product, file) else { return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter") };
    s.next_id += 1;
    let id = format!("UPLOADED{}", s.next_id);
    s.uploads.insert(id.clone(), (name.unwrap_or_default(), bytes));
    Json(json!({"id": id})).into_response()
}

async fn whatsapp_media_info(State(state): State<Arc<Mutex<WhatsAppState>>>, Path((_version, id)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if bearer != s.token {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    match (s.media.get(&id), s.addr) {
        (Some((mime, bytes)), Some(addr)) => Json(json!({"messaging_product": "whatsapp", "url": format!("http://{addr}/download/{id}"), "mime_type": mime, "sha256": "x", "file_size": bytes.len(), "id": id})).into_response(),
        _ => graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter"),
    }
}

async fn whatsapp_media_download(State(state): State<Arc<Mutex<WhatsAppState>>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if bearer != s.token {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match s.media.get(&id) {
        Some((mime, bytes)) => ([(axum::http::header::CONTENT_TYPE, mime.clone())], bytes.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn graph_error(status: StatusCode, code: i64, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbCdEf"}}))).into_response()
}

async fn whatsapp_send(State(state): State<Arc<Mutex<WhatsAppState>>>, Path((_version, _phone)): Path<(String, String)>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if bearer != s.token {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    };
    if request["messaging_product"] != "whatsapp" {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    }
    let kind = request["type"].as_str().unwrap_or_default().to_owned();
    if kind == "image" || kind == "document" {
        let media = &request[kind.as_str()];
        let (Some(to), Some((name, bytes))) = (request["to"].as_str(), media["id"].as_str().and_then(|id| s.uploads.get(id)).cloned()) else {
            return graph_error(StatusCode::BAD_REQUEST, 131053, "Media upload error");
        };
        s.next_id += 1;
        let id = format!("wamid.FAKE{}", s.next_id);
        let caption = media["caption"].as_str().unwrap_or_default().to_owned();
        s.sent_files.push((to.to_owned(), kind, caption, media["filename"].as_str().map(str::to_owned).unwrap_or(name), bytes));
        return Json(json!({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}], "messages": [{"id": id}]})).into_response();
    }
    let (Some(to), Some(text)) = (request["to"].as_str(), request["text"]["body"].as_str()) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    };
    if kind != "text" {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    }
    match s.faults.pop_front() {
        Some(Fault::TooMany(_)) => return graph_error(StatusCode::TOO_MANY_REQUESTS, 130429, "(#130429) Rate limit hit"),
        Some(Fault::ServerError) => return graph_error(StatusCode::INTERNAL_SERVER_ERROR, 1, "An unknown error occurred"),
        Some(Fault::Hang(_)) | None => {}
    }
    s.next_id += 1;
    let id = format!("wamid.FAKE{}", s.next_id);
    s.sent.push((to.to_owned(), text.to_owned(), id.clone()));
    Json(json!({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}], "messages": [{"id": id}]})).into_response()
}

/// Signs a WhatsApp webhook body as Meta does: `sha256=<hex HMAC-SHA256(app secret, body)>`.
pub fn meta_signature(app_secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app_secret.as_bytes());
    format!("sha256={}", ring::hmac::sign(&key, body).as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[derive(Default)]
struct VkState {
    token: String,
    /// Accepted messages: (peer_id, message, random_id, VK's message id).
    sent: Vec<(String, String, String, i64)>,
    calls: u64,
    hang_next: Option<std::time::Duration>,
    /// Files served as VK's storage does: (content type, bytes) by name.
    cdn: std::collections::HashMap<String, (String, Vec<u8>)>,
    addr: Option<SocketAddr>,
    /// Uploaded files not saved yet, by the handle the upload answered: (name, bytes).
    uploads: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Saved photos and documents, by `photo-77_5` / `doc-77_6`: (name, bytes).
    saved: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Messages sent with attachments: (peer_id, text, [(name, bytes)]).
    sent_files: Vec<(String, String, Vec<(String, Vec<u8>)>)>,
}

/// VK's `POST /method/messages.send` (form fields `access_token`, `v`, `peer_id`,
/// `message`, `random_id`), answering `{"response": <message id>}` or VK's error shape
/// `{"error":{"error_code","error_msg","request_params"}}` (5 for a wrong token). As VK
/// does, a `random_id` it has seen is not sent again: the first message's id is
/// answered.
#[derive(Clone)]
pub struct FakeVk {
    pub addr: SocketAddr,
    state: Arc<Mutex<VkState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeVk {
    pub async fn start(token: &str) -> anyhow::Result<FakeVk> {
        let state = Arc::new(Mutex::new(VkState { token: token.to_owned(), ..Default::default() }));
        let app = Router::new()
            .route("/method/messages.send", post(vk_send))
            .route("/method/photos.getMessagesUploadServer", post(vk_upload_server))
            .route("/method/docs.getMessagesUploadServer", post(vk_upload_server))
            .route("/upload/{kind}", post(vk_upload))
            .route("/method/photos.saveMessagesPhoto", post(vk_save))
            .route("/method/docs.save", post(vk_save))
            .route("/cdn/{name}", axum::routing::get(vk_cdn))
            .with_state(state.clone());
        let (addr, stop) = serve(app).await?;
        state.lock().unwrap_or_else(|p| p.into_inner()).addr = Some(addr);
        Ok(FakeVk { addr, state, _stop: stop })
    }

    /// Messages sent with attachments: (peer_id, text, [(file name, bytes)]).
    pub fn sent_files(&self) -> Vec<(String, String, Vec<(String, Vec<u8>)>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent_files.clone()
    }

    /// Serves a file a customer sent at the URL returned (the callback carries it).
    pub fn add_file(&self, name: &str, content_type: &str, bytes: &[u8]) -> String {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).cdn.insert(name.to_owned(), (content_type.to_owned(), bytes.to_vec()));
        format!("http://{}/cdn/{name}", self.addr)
    }

    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next call is taken, and answered only after `d`.
    pub fn hang_next(&self, d: std::time::Duration) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).hang_next = Some(d);
    }

    /// Messages the community's customers got: (peer_id, text).
    pub fn sent(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent.iter().map(|(p, m, _, _)| (p.clone(), m.clone())).collect()
    }

    pub fn calls(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).calls
    }
}

fn form_fields(body: &[u8]) -> std::collections::HashMap<String, String> {
    fn unescape(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            out.push(b);
                            i += 3;
                            continue;
                        }
                        None => out.push(b'%'),
                    }
                }
                b'+' => out.push(b' '),
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body).split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (unescape(k), unescape(v))).collect()
}

fn vk_error(code: i64, message: &str) -> Response {
    Json(json!({"error": {"error_code": code, "error_msg": message, "request_params": []}})).into_response()
}

/// `photos.getMessagesUploadServer` / `docs.getMessagesUploadServer`: where to upload.
async fn vk_upload_server(State(state): State<Arc<Mutex<VkState>>>, uri: axum::http::Uri, body: axum::body::Bytes) -> Response {
    let fields = form_fields(&body);
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    if fields.get("access_token") != Some(&s.token) {
        return vk_error(5, "User authorization failed: invalid access_token (4).");
    }
    if fields.get("peer_id").is_none_or(|p| p.is_empty()) {
        return vk_error(100, "One of the parameters specified was missing or invalid: peer_id");
    }
    let kind = if uri.path().contains("photos.") { "photo" } else { "doc" };
    let addr = s.addr.map(|a| a.to_string()).unwrap_or_default();
    Json(json!({"response": {"upload_url": format!("http://{addr}/upload/{kind}"), "album_id": -3, "group_id": 77}})).into_response()
}

/// The upload server: a `photo` part answers `{"server","photo","hash"}`, a `file`
/// part `{"file"}`.
async fn vk_upload(State(state): State<Arc<Mutex<VkState>>>, Path(kind): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let part = if kind == "photo" { "photo" } else { "file" };
    let Some((_, name, bytes)) = multipart(&headers, &body).and_then(|parts| parts.into_iter().find(|(n, _, _)| n == part)) else {
        return Json(json!({"error": "no file"})).into_response();
    };
    let handle = format!("h{}", s.uploads.len() + 1);
    s.uploads.insert(handle.clone(), (name.unwrap_or_default(), bytes));
    if kind == "photo" {
        Json(json!({"server": 1, "photo": handle, "hash": "hash-".to_owned() + &handle})).into_response()
    } else {
        Json(json!({"file": handle})).into_response()
    }
}

/// `photos.saveMessagesPhoto` (`server`, `photo`, `hash`) and `docs.save` (`file`).
async fn vk_save(State(state): State<Arc<Mutex<VkState>>>, uri: axum::http::Uri, body: axum::body::Bytes) -> Response {
    let fields = form_fields(&body);
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if fields.get("access_token") != Some(&s.token) {
        return vk_error(5, "User authorization failed: invalid access_token (4).");
    }
    let photo = uri.path().contains("photos.");
    let handle = fields.get(if photo { "photo" } else { "file" }).cloned().unwrap_or_default();
    if photo && fields.get("hash").map(String::as_str) != Some(&format!("hash-{handle}")) {
        return vk_error(100, "One of the parameters specified was missing or invalid: hash");
    }
    let Some(file) = s.uploads.remove(&handle) else { return vk_error(100, "One of the parameters specified was missing or invalid: file") };
    let id = 500 + s.saved.len() as i64;
    s.saved.insert(format!("{}-77_{id}", if photo { "photo" } else { "doc" }), file);
    if photo {
        Json(json!({"response": [{"id": id, "owner_id": -77, "album_id": -3}]})).into_response()
    } else {
        Json(json!({"response": {"type": "doc", "doc": {"id": id, "owner_id": -77, "title": fields.get("title")}}})).into_response()
    }
}

async fn vk_send(State(state): State<Arc<Mutex<VkState>>>, body: axum::body::Bytes) -> Response {
    let fields = form_fields(&body);
    let (answer, hang) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.calls += 1;
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        if get("access_token") != s.token {
            let answer = Json(json!({"error": {"error_code": 5, "error_msg": "User authorization failed: invalid access_token (4).", "request_params": []}})).into_response();
            (answer, None)
        } else if get("peer_id").is_empty() || (get("message").is_empty() && get("attachment").is_empty()) || get("random_id").is_empty() {
            (Json(json!({"error": {"error_code": 100, "error_msg": "One of the parameters specified was missing or invalid", "request_params": []}})).into_response(), None)
        } else {
            let random_id = get("random_id");
            let id = match s.sent.iter().find(|(_, _, r, _)| *r == random_id) {
                Some((_, _, _, id)) => *id,
                None => {
                    let id = 700 + s.sent.len() as i64;
                    s.sent.push((get("peer_id"), get("message"), random_id, id));
                    let attachment = get("attachment");
                    if !attachment.is_empty() {
                        let files = attachment.split(',').map(|a| s.saved.get(a).cloned().unwrap_or_default()).collect();
                        s.sent_files.push((get("peer_id"), get("message"), files));
                    }
                    id
                }
            };
            (Json(json!({"response": id})).into_response(), s.hang_next.take())
        }
    };
    if let Some(hang) = hang {
        tokio::time::sleep(hang).await;
    }
    answer
}

#[derive(Default)]
struct MessengerState {
    token: String,
    /// Accepted messages: (recipient PSID, text, mid).
    sent: Vec<(String, String, String)>,
    /// Files served as a CDN does: (content type, bytes) by name.
    cdn: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Attachments sent: (recipient PSID, type, file name, bytes).
    files: Vec<(String, String, String, Vec<u8>)>,
}

/// The Send API, `POST /<version>/me/messages?access_token=…`, answering
/// `{"recipient_id","message_id"}`, or the Graph API's error shape (190 with 400 for a
/// wrong page token).
#[derive(Clone)]
pub struct FakeMessenger {
    pub addr: SocketAddr,
    state: Arc<Mutex<MessengerState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeMessenger {
    pub async fn start(token: &str) -> anyhow::Result<FakeMessenger> {
        let state = Arc::new(Mutex::new(MessengerState { token: token.to_owned(), ..Default::default() }));
        let app = Router::new()
            .route("/{version}/me/messages", post(messenger_send))
            .route("/cdn/{name}", axum::routing::get(messenger_cdn))
            .with_state(state.clone());
        let (addr, stop) = serve(app).await?;
        Ok(FakeMessenger { addr, state, _stop: stop })
    }

    /// Serves a file a customer sent at the URL returned (the webhook carries it).
    pub fn add_file(&self, name: &str, content_type: &str, bytes: &[u8]) -> String {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).cdn.insert(name.to_owned(), (content_type.to_owned(), bytes.to_vec()));
        format!("http://{}/cdn/{name}", self.addr)
    }

    /// Attachments sent: (recipient PSID, type, file name, bytes).
    pub fn sent_files(&self) -> Vec<(String, String, String, Vec<u8>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).files.clone()
    }

    pub fn api_base(&self) -> String {
        format!("http://{}/v21.0", self.addr)
    }

    pub fn sent(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent.clone()
    }
}

/// A file a fake's storage serves by name, with its type.
fn cdn_file(files: &std::collections::HashMap<String, (String, Vec<u8>)>, name: &str) -> Response {
    match files.get(name) {
        Some((content_type, bytes)) => ([(axum::http::header::CONTENT_TYPE, content_type.clone())], bytes.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn vk_cdn(State(state): State<Arc<Mutex<VkState>>>, Path(name): Path<String>) -> Response {
    cdn_file(&state.lock().unwrap_or_else(|p| p.into_inner()).cdn, &name)
}

async fn messenger_cdn(State(state): State<Arc<Mutex<MessengerState>>>, Path(name): Path<String>) -> Response {
    cdn_file(&state.lock().unwrap_or_else(|p| p.into_inner()).cdn, &name)
}

async fn messenger_send(State(state): State<Arc<Mutex<MessengerState>>>, axum::extract::RawQuery(query): axum::extract::RawQuery, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let token = form_fields(query.unwrap_or_default().as_bytes()).remove("access_token").unwrap_or_default();
    if token != s.token {
        return graph_error(StatusCode::BAD_REQUEST, 190, "Invalid OAuth access token.");
    }
    // An attachment uploaded with the send: `recipient`, `message` (JSON) and `filedata`.
    if let Some(parts) = multipart(&headers, &body) {
        let field = |name: &str| parts.iter().find(|(n, _, _)| n == name).map(|(_, f, b)| (f.clone(), b.clone()));
        let recipient = field("recipient").and_then(|(_, b)| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| v["id"].as_str().map(str::to_owned));
        let kind = field("message").and_then(|(_, b)| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| v["attachment"]["type"].as_str().map(str::to_owned));
        let (Some(to), Some(kind), Some((Some(name), bytes))) = (recipient, kind, field("filedata")) else {
            return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
        };
        let mid = format!("m_FAKE{}", s.sent.len() + s.files.len() + 1);
        s.files.push((to.clone(), kind, name, bytes));
        return Json(json!({"recipient_id": to, "message_id": mid})).into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    };
    let (Some(to), Some(text)) = (request["recipient"]["id"].as_str(), request["message"]["text"].as_str()) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    };
    // The Send API's limit on a text message.
    if text.chars().count() > 2000 {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Length of param message[text] must be less than or equal to 2000");
    }
    let mid = format!("m_FAKE{}", s.sent.len() + 1);
    s.sent.push((to.to_owned(), text.to_owned(), mid.clone()));
    Json(json!({"recipient_id": to, "message_id": mid})).into_response()
}

#[derive(Default)]
struct ViberState {
    token: String,
    /// Accepted messages: (receiver, text, message_token).
    sent: Vec<(String, String, u64)>,
}

/// Viber's `POST /pa/send_message` with `X-Viber-Auth-Token`, answering
/// `{"status":0,"status_message":"ok","message_token":N,"chat_hostname":…}`, or status 2
/// `invalidAuthToken` for a wrong token.
#[derive(Clone)]
pub struct FakeViber {
    pub addr: SocketAddr,
    state: Arc<Mutex<ViberState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeViber {
    pub async fn start(token: &str) -> anyhow::Result<FakeViber> {
        let state = Arc::new(Mutex::new(ViberState { token: token.to_owned(), ..Default::default() }));
        let app = Router::new().route("/pa/send_message", post(viber_send)).with_state(state.clone());
        let (addr, stop) = serve(app).await?;
        Ok(FakeViber { addr, state, _stop: stop })
    }

    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn sent(&self) -> Vec<(String, String, u64)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sent.clone()
    }
}

async fn viber_send(State(state): State<Arc<Mutex<ViberState>>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if headers.get("x-viber-auth-token").and_then(|v| v.to_str().ok()) != Some(s.token.as_str()) {
        return Json(json!({"status": 2, "status_message": "invalidAuthToken"})).into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return Json(json!({"status": 3, "status_message": "badData"})).into_response();
    };
    let (Some(receiver), Some(text), Some(_name)) = (request["receiver"].as_str(), request["text"].as_str(), request["sender"]["name"].as_str()) else {
        return Json(json!({"status": 3, "status_message": "badData"})).into_response();
    };
    let token = 5_741_311_803_571_721_000 + s.sent.len() as u64;
    s.sent.push((receiver.to_owned(), text.to_owned(), token));
    Json(json!({"status": 0, "status_message": "ok", "message_token": token, "chat_hostname": "SN-CHAT-05_"})).into_response()
}

/// Signs a Viber callback body: hex HMAC-SHA256 keyed with the bot's auth token.
pub fn viber_signature(auth_token: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, auth_token.as_bytes());
    ring::hmac::sign(&key, body).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A mail relay for email channels' replies: it speaks the server side of SMTP
/// (RFC 5321: `EHLO`, `AUTH PLAIN`, `MAIL`, `RCPT`, `DATA` with dot-stuffing, `QUIT`),
/// keeps each mail it took, and answers the end of `DATA` with scripted replies
/// (`451`, `554`) while there are any, as a real relay does when it defers or refuses.
pub struct FakeRelay {
    pub addr: SocketAddr,
    state: Arc<Mutex<RelayState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
struct RelayState {
    credentials: Option<(String, String)>,
    /// Replies to the end of `DATA` instead of `250`, in order.
    data_replies: VecDeque<String>,
    /// (MAIL FROM, RCPT TO, the mail as sent, unstuffed).
    mails: Vec<(String, String, Vec<u8>)>,
    /// Ends of `DATA` seen, taken or not.
    attempts: u64,
}

impl FakeRelay {
    /// A relay that takes mail from anyone, or only after `AUTH PLAIN` with `credentials`.
    pub async fn start(credentials: Option<(&str, &str)>) -> anyhow::Result<FakeRelay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(RelayState { credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())), ..Default::default() }));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = shared.clone();
                        tokio::spawn(async move {
                            let _ = relay_session(stream, state).await;
                        });
                    }
                    _ = &mut stopped => return,
                }
            }
        });
        Ok(FakeRelay { addr, state, _stop: Arc::new(stop) })
    }

    /// Answers the next ends of `DATA` with these replies (`"451 4.3.0 try later"`).
    pub fn script(&self, replies: &[&str]) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).data_replies.extend(replies.iter().map(|r| (*r).to_owned()));
    }

    /// The mails taken: (MAIL FROM, RCPT TO, the mail).
    pub fn mails(&self) -> Vec<(String, String, Vec<u8>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).mails.clone()
    }

    pub fn attempts(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).attempts
    }
}

async fn relay_session(stream: tokio::net::TcpStream, state: Arc<Mutex<RelayState>>) -> std::io::Result<()> {
    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read);
    write.write_all(b"220 fake-relay ESMTP\r\n").await?;
    let needs_auth = state.lock().unwrap_or_else(|p| p.into_inner()).credentials.is_some();
    let (mut authed, mut from, mut to) = (!needs_auth, String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            "250-fake-relay\r\n250-AUTH PLAIN\r\n250 8BITMIME".into()
        } else if let Some(plain) = command.strip_prefix("AUTH PLAIN ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(plain.trim()).unwrap_or_default();
            let parts: Vec<String> = decoded.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
            let expected = state.lock().unwrap_or_else(|p| p.into_inner()).credentials.clone();
            if parts.len() == 3 && expected == Some((parts[1].clone(), parts[2].clone())) {
                authed = true;
                "235 2.7.0 Authentication successful".into()
            } else {
                "535 5.7.8 Authentication credentials invalid".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            if authed {
                from = command[10..].trim().trim_matches(['<', '>']).to_owned();
                "250 2.1.0 OK".into()
            } else {
                "530 5.7.0 Authentication required".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            to = command[8..].trim().trim_matches(['<', '>']).to_owned();
            "250 2.1.5 OK".into()
        } else if upper == "DATA" {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut mail = Vec::new();
            loop {
                let mut data = String::new();
                if lines.read_line(&mut data).await? == 0 {
                    return Ok(());
                }
                if data == ".\r\n" {
                    break;
                }
                mail.extend_from_slice(data.strip_prefix('.').unwrap_or(&data).as_bytes());
            }
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.attempts += 1;
            match s.data_replies.pop_front() {
                Some(scripted) => scripted,
                None => {
                    s.mails.push((from.clone(), to.clone(), mail));
                    "250 2.0.0 queued".into()
                }
            }
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.1 not here".into()
        };
        write.write_all(format!("{reply}\r\n").as_bytes()).await?;
    }
}
