//! The client WebSocket of the web chat (public listener).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fastwebsockets::upgrade::IncomingUpgrade;
use serde_json::{json, Value};
use switchboard_actors::core::Reply;
use switchboard_actors::model::{AttachmentId, ChannelId, Command, ConversationId, Reader, SkillGroupId, Visitor};
use switchboard_actors::shard::StreamKey;

use crate::auth::{new_visitor_id, Subject, CLIENT_TOKEN_TTL, VISITOR_TOKEN_TTL};
use crate::frames::{self, ClientIn};
use crate::ws::{self, close, Flow, Follow, Outbox, Session, Surface};
use crate::Gateway;

const MAX_NAME_CHARS: usize = 100;
const MAX_ATTRIBUTES: usize = 20;
const MAX_ATTRIBUTE_CHARS: usize = 200;

pub(crate) async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    upgrade: IncomingUpgrade,
) -> Response {
    if let Err(refusal) = ws::admit(&gw, &headers, Surface::Client, None) {
        return refusal;
    }
    let session = ClientSession { gw: gw.clone(), conversation: None, peer: peer.ip() };
    ws::accept(gw, upgrade, Surface::Client, None, session)
}

struct ClientSession {
    gw: Arc<Gateway>,
    conversation: Option<ConversationId>,
    peer: std::net::IpAddr,
}

/// Parses a frame, telling bad JSON, an unknown type and a malformed frame apart.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(text: &str, known: &[&str]) -> Result<T, Value> {
    let value: Value = serde_json::from_str(text).map_err(|e| frames::error("bad_json", &format!("not valid JSON: {e}"), None))?;
    let reference = value.get("ref").cloned();
    let kind = value.get("type").and_then(Value::as_str).map(str::to_owned);
    match kind {
        None => Err(frames::error("bad_frame", "frame has no string \"type\" field", reference.as_ref())),
        Some(kind) if !known.contains(&kind.as_str()) => {
            Err(frames::error("unknown_type", &format!("unknown frame type {kind:?}"), reference.as_ref()))
        }
        Some(_) => serde_json::from_value(value).map_err(|e| frames::error("bad_frame", &e.to_string(), reference.as_ref())),
    }
}

const CLIENT_TYPES: &[&str] = &["start", "resume", "send", "typing", "read", "close", "rate", "ping"];

impl ClientSession {
    async fn follow(&mut self, conversation: ConversationId, after_seq: u64, out: &Outbox) -> Result<(), Value> {
        let wake = self
            .gw
            .backend
            .subscribe(StreamKey::Conversation(conversation))
            .await
            .map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
        let shard = self.gw.backend.shard();
        let mut last = after_seq;
        let pull = Box::new(move || {
            let state = shard.read();
            let Some(conv) = state.conversations.get(&conversation) else { return vec![] };
            let start = conv.history.partition_point(|e| e.seq <= last);
            let frames: Vec<Value> = conv.history[start..].iter().map(frames::client_event).collect();
            last = conv.last_seq().max(last);
            frames
        });
        let signals = Some(self.gw.signals.conversation(conversation));
        self.conversation = Some(conversation);
        out.follow(Follow { wake, pull, signals, min_interval: None }).await;
        Ok(())
    }

    /// Forwards an ephemeral signal to the operator holding the conversation, if any.
    fn signal_operator(&self, conversation: ConversationId, signal: Value) {
        let operator = {
            let shard = self.gw.backend.shard();
            let state = shard.read();
            state.conversations.get(&conversation).and_then(|c| c.assigned().cloned())
        };
        if let Some(operator) = operator {
            self.gw.signals.to_operator(&operator, signal);
        }
    }

    fn require_conversation(&self) -> Result<ConversationId, Value> {
        self.conversation.ok_or_else(|| frames::error("no_conversation", "send \"start\" or \"resume\" first", None))
    }

    async fn handle(&mut self, frame: ClientIn, out: &Outbox) -> Result<Flow, Value> {
        match frame {
            ClientIn::Start { channel, group, name, attributes, visitor_id, visitor_token } => {
                if self.conversation.is_some() {
                    return Err(frames::error("already_started", "this socket already follows a conversation", None));
                }
                if !self.gw.starts.allow(self.peer, self.gw.config.starts_per_minute) {
                    self.gw.metrics.rate_limited.fetch_add(1, Relaxed);
                    return Err(frames::error("rate_limited", "too many conversations started from your address; try again later", None));
                }
                let name = name.unwrap_or_default();
                if name.chars().count() > MAX_NAME_CHARS {
                    return Err(frames::error("too_long", &format!("name is limited to {MAX_NAME_CHARS} characters"), None));
                }
                if attributes.len() + usize::from(visitor_id.is_some()) > MAX_ATTRIBUTES
                    || attributes.iter().any(|(k, v)| k.chars().count() > MAX_ATTRIBUTE_CHARS || v.chars().count() > MAX_ATTRIBUTE_CHARS)
                {
                    return Err(frames::error("too_long", "too many or too long attributes", None));
                }
                if visitor_id.as_ref().is_some_and(|v| v.is_empty() || v.chars().count() > 64) {
                    return Err(frames::error("invalid", "visitor_id must be 1 to 64 characters", None));
                }
                let mut attributes: Vec<(String, String)> = attributes.into_iter().collect();
                if let Some(claimed) = visitor_id {
                    // Anyone can type any id: it is shown, never used to link conversations.
                    attributes.push(("claimed_visitor_id".into(), claimed));
                }
                // A returning visitor proves who they are with the token we signed; a
                // missing, forged or expired one just makes a new visitor.
                let visitor = match visitor_token.as_deref().map(|t| self.gw.tokens.verify(t)) {
                    Some(Ok(Subject::Visitor { visitor })) => visitor,
                    _ => new_visitor_id().map_err(|e| frames::error("internal", &e.to_string(), None))?,
                };
                let command = Command::StartConversation {
                    channel: ChannelId::new(channel.unwrap_or_else(|| self.gw.config.web_channel.clone())),
                    group: group.map(SkillGroupId::new),
                    visitor: Visitor { id: Some(visitor.clone()), name, attributes },
                };
                let conversation = match self.gw.submit(command).await {
                    Ok(Reply::Started { conversation }) => conversation,
                    Ok(_) => return Err(frames::error("internal", "unexpected reply", None)),
                    Err(e) => return Err(frames::error(e.code(), &e.to_string(), None)),
                };
                let token = self.gw.tokens.issue(Subject::Client { conversation }, CLIENT_TOKEN_TTL);
                let visitor_token = self.gw.tokens.issue(Subject::Visitor { visitor }, VISITOR_TOKEN_TTL);
                out.json(json!({
                    "type": "started", "protocol": frames::PROTOCOL_VERSION, "conversation": conversation.0,
                    "token": token, "visitor_token": visitor_token,
                }))
                .await;
                self.follow(conversation, 0, out).await?;
            }
            ClientIn::Resume { token, last_seq } => {
                let conversation = match self.gw.tokens.verify(&token) {
                    Ok(Subject::Client { conversation }) => conversation,
                    Ok(_) | Err(_) => {
                        self.gw.metrics.auth_failures.fetch_add(1, Relaxed);
                        out.error("unauthorized", "token is not a valid client token", None).await;
                        return Ok(Flow::Close(close::UNAUTHORIZED, "unauthorized".into()));
                    }
                };
                let (last, operator_read_upto) = {
                    let shard = self.gw.backend.shard();
                    let state = shard.read();
                    match state.conversations.get(&conversation) {
                        Some(c) => (c.last_seq(), c.operator_read_upto),
                        None => return Err(frames::error("not_found", "conversation not found", None)),
                    }
                };
                if last_seq > last {
                    return Err(frames::error("invalid", &format!("last_seq {last_seq} is ahead of the conversation ({last})"), None));
                }
                out.json(json!({
                    "type": "resumed", "protocol": frames::PROTOCOL_VERSION, "conversation": conversation.0, "last_seq": last,
                    "operator_read_upto": operator_read_upto,
                }))
                .await;
                self.follow(conversation, last_seq, out).await?;
            }
            ClientIn::Send { key, text, attachments } => {
                let conversation = self.require_conversation()?;
                let reference = json!(key.clone());
                let attachments = attachments.into_iter().map(AttachmentId).collect();
                match self.gw.submit(Command::PostClientMessage { conversation, key: key.clone(), text, attachments }).await {
                    Ok(Reply::Message { seq, duplicate }) => {
                        out.json(json!({"type": "ack", "key": key, "seq": seq, "duplicate": duplicate})).await;
                    }
                    Ok(_) => return Err(frames::error("internal", "unexpected reply", Some(&reference))),
                    Err(e) => return Err(frames::error(e.code(), &e.to_string(), Some(&reference))),
                }
            }
            ClientIn::Typing => {
                let conversation = self.require_conversation()?;
                self.signal_operator(conversation, json!({"type": "typing", "conversation": conversation.0, "from": "client"}));
            }
            ClientIn::Read { upto } => {
                let conversation = self.require_conversation()?;
                // Committed, so the operator sees it after a reconnect too; then relayed live.
                self.gw
                    .submit(Command::MarkRead { conversation, reader: Reader::Client, upto })
                    .await
                    .map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
                let upto = self.gw.read_mark(conversation, upto);
                self.signal_operator(conversation, json!({"type": "read", "conversation": conversation.0, "by": "client", "upto": upto}));
            }
            ClientIn::Close => {
                let conversation = self.require_conversation()?;
                self.gw.submit(Command::CloseByClient { conversation }).await.map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
            }
            ClientIn::Rate { score, comment } => {
                let conversation = self.require_conversation()?;
                self.gw
                    .submit(Command::Rate { conversation, score, comment })
                    .await
                    .map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
            }
            ClientIn::Ping => out.json(json!({"type": "pong"})).await,
        }
        Ok(Flow::Continue)
    }
}

impl Session for ClientSession {
    async fn on_text(&mut self, text: &str, out: &Outbox) -> Flow {
        let result = match parse::<ClientIn>(text, CLIENT_TYPES) {
            Ok(frame) => self.handle(frame, out).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(flow) => flow,
            Err(error) => {
                self.gw.metrics.error_frames.fetch_add(1, Relaxed);
                out.json(error).await;
                Flow::Continue
            }
        }
    }

    fn on_end(&mut self) {
        if let Some(conversation) = self.conversation {
            self.gw.signals.release_conversation(conversation);
        }
    }
}
