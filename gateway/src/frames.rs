//! The JSON frames of the client and operator WebSockets (see `docs/protocol.md`).
//!
//! Inbound frames are parsed into closed enums; unknown fields are ignored, an unknown
//! `type` is an error. Outbound frames are rendered from committed state with explicit
//! conversions, so the wire format never changes because a domain type did.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::model::{Attachment, Closer, Presence, TransferTarget, WithdrawReason};
use switchboard_actors::state::{FeedEntry, FeedItem, HistoryEntry, HistoryItem};

/// Protocol version announced in `hello`/`started` frames.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientIn {
    Start {
        #[serde(default)]
        channel: Option<String>,
        #[serde(default)]
        group: Option<String>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        attributes: BTreeMap<String, String>,
        /// Unverifiable id a client made up; kept only as an attribute.
        #[serde(default)]
        visitor_id: Option<String>,
        /// The signed visitor token from an earlier `started`: links conversations.
        #[serde(default)]
        visitor_token: Option<String>,
        /// The customer's identity as the site signed it (a JWT; `identity.rs`).
        #[serde(default)]
        identity: Option<String>,
        /// The client's random key for this start: sent again with it (by the same
        /// visitor, within 24 hours), the start gets the conversation the first one opened.
        #[serde(default)]
        key: Option<String>,
    },
    Resume {
        token: String,
        #[serde(default)]
        last_seq: u64,
    },
    Send {
        key: String,
        #[serde(default)]
        text: String,
        #[serde(default)]
        attachments: Vec<String>,
    },
    Typing,
    Read {
        upto: u64,
    },
    Close,
    Rate {
        score: u8,
        #[serde(default)]
        comment: String,
    },
    Ping,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OperatorIn {
    Presence {
        status: Presence,
        /// With `break`: one of the configured pause reasons.
        #[serde(default)]
        reason: Option<String>,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    Accept {
        offer: u64,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
        /// When the accept reached a standalone gateway (ms since the epoch), set by the
        /// gateway on a socket it relays; ignored on any other socket, whatever its type.
        #[serde(default)]
        received_at: Option<Value>,
    },
    Decline {
        offer: u64,
        #[serde(default)]
        reason: String,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    Send {
        conversation: u64,
        key: String,
        #[serde(default)]
        text: String,
        #[serde(default)]
        attachments: Vec<String>,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    Typing {
        conversation: u64,
    },
    Read {
        conversation: u64,
        upto: u64,
    },
    Transfer {
        conversation: u64,
        #[serde(default)]
        to_operator: Option<String>,
        #[serde(default)]
        to_group: Option<String>,
        #[serde(default)]
        comment: String,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    Close {
        conversation: u64,
        #[serde(default)]
        resolution: String,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    /// Ends the operator's wrap-up now.
    Ready {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    History {
        conversation: u64,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    Ping,
}

impl OperatorIn {
    /// The frame's `type`, which an error without a `ref` names in `for`.
    pub fn kind(&self) -> &'static str {
        match self {
            OperatorIn::Presence { .. } => "presence",
            OperatorIn::Accept { .. } => "accept",
            OperatorIn::Decline { .. } => "decline",
            OperatorIn::Send { .. } => "send",
            OperatorIn::Typing { .. } => "typing",
            OperatorIn::Read { .. } => "read",
            OperatorIn::Transfer { .. } => "transfer",
            OperatorIn::Close { .. } => "close",
            OperatorIn::Ready { .. } => "ready",
            OperatorIn::History { .. } => "history",
            OperatorIn::Ping => "ping",
        }
    }
}

pub fn error(code: &str, message: &str, reference: Option<&Value>) -> Value {
    // What a client sent comes back only bounded: a message quoting its frame is cut to
    // MAX_ERROR_MESSAGE_CHARS characters and MAX_ERROR_MESSAGE_BYTES bytes of JSON text
    // (escapes counted: a character is 1 to 4 bytes, a control character escaped 6), and
    // a `ref` longer than MAX_ECHOED_REF_BYTES (as JSON) is not echoed. Else a client
    // that never reads could have each of its frames answered by an error frame several
    // times its size, and its socket's queue of 64 frames hold megabytes
    // (docs/security.md).
    let mut json_bytes = 0;
    let kept = message.char_indices().enumerate().find_map(|(n, (at, c))| {
        json_bytes += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        (n >= MAX_ERROR_MESSAGE_CHARS || json_bytes > MAX_ERROR_MESSAGE_BYTES).then_some(at)
    });
    let message: std::borrow::Cow<'_, str> = match kept {
        Some(at) => format!("{}…", &message[..at]).into(),
        None => message.into(),
    };
    let mut frame = json!({"type": "error", "code": code, "message": message});
    if let Some(r) = reference.filter(|r| serde_json::to_string(r).is_ok_and(|t| t.len() <= MAX_ECHOED_REF_BYTES)) {
        frame["ref"] = r.clone();
    }
    frame
}

/// The longest error message, in characters (longer ones are cut, with "…").
pub const MAX_ERROR_MESSAGE_CHARS: usize = 300;
/// The longest error message, in bytes of its JSON text without the quotes (longer
/// ones are cut at a character, with "…").
pub const MAX_ERROR_MESSAGE_BYTES: usize = 400;
/// The longest `ref` an answer echoes, in bytes of its JSON text.
pub const MAX_ECHOED_REF_BYTES: usize = 256;

fn presence_name(p: Presence) -> &'static str {
    match p {
        Presence::Online => "online",
        Presence::Away => "away",
        Presence::Offline => "offline",
        Presence::Break => "break",
    }
}

fn withdraw_name(r: WithdrawReason) -> &'static str {
    match r {
        WithdrawReason::Declined => "declined",
        WithdrawReason::Expired => "expired",
        WithdrawReason::ConversationClosed => "conversation_closed",
        WithdrawReason::OperatorUnavailable => "operator_unavailable",
        WithdrawReason::Reassigned => "reassigned",
    }
}

/// Who reads a history entry: clients never see internal transfer comments or ids.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Client,
    Staff,
}

/// One conversation history entry as a JSON object (without the frame envelope).
pub fn history_entry(entry: &HistoryEntry, audience: Audience) -> Value {
    let mut v = match &entry.item {
        HistoryItem::Started { channel, visitor } => {
            let mut v = json!({"kind": "started", "channel": channel.as_str()});
            if audience == Audience::Staff {
                v["visitor"] = json!({"name": visitor.name, "attributes": visitor.attributes.iter().cloned().collect::<BTreeMap<_, _>>()});
            }
            v
        }
        HistoryItem::Queued { group } => json!({"kind": "queued", "group": group.as_str()}),
        HistoryItem::ClientMessage { key, text, attachments } => {
            json!({"kind": "message", "from": "client", "key": key, "text": text, "attachments": attachment_list(attachments)})
        }
        HistoryItem::OperatorMessage { operator, name, key, text, attachments } => {
            let mut v = json!({"kind": "message", "from": "operator", "name": name, "text": text, "attachments": attachment_list(attachments)});
            if audience == Audience::Staff {
                v["operator"] = json!(operator.as_str());
                v["key"] = json!(key);
            }
            v
        }
        HistoryItem::Assigned { operator, name } => {
            let mut v = json!({"kind": "assigned", "name": name});
            if audience == Audience::Staff {
                v["operator"] = json!(operator.as_str());
            }
            v
        }
        HistoryItem::Transferred { from, to, comment } => {
            let mut v = json!({"kind": "transferred"});
            if audience == Audience::Staff {
                v["from"] = json!(from.as_str());
                v["comment"] = json!(comment);
                match to {
                    TransferTarget::Operator(op) => v["to_operator"] = json!(op.as_str()),
                    TransferTarget::Group(g) => v["to_group"] = json!(g.as_str()),
                }
            }
            v
        }
        HistoryItem::Closed { by, resolution, tags } => {
            let by = match by {
                Closer::Client => "client",
                Closer::Operator => "operator",
                Closer::System => "system",
            };
            let mut v = json!({"kind": "closed", "by": by});
            if audience == Audience::Staff {
                v["resolution"] = json!(resolution);
                v["tags"] = json!(tags);
            }
            v
        }
        HistoryItem::Rated { score, comment } => json!({"kind": "rated", "score": score, "comment": comment}),
        HistoryItem::Notice { text } => json!({"kind": "notice", "text": text}),
        HistoryItem::WithBot => json!({"kind": "with_bot"}),
        HistoryItem::BotMessage { key, text, buttons } => {
            let mut v = json!({"kind": "message", "from": "bot", "text": text, "buttons": buttons, "attachments": []});
            if audience == Audience::Staff {
                v["key"] = json!(key);
            }
            v
        }
        HistoryItem::Handoff { group, reason, context } => {
            let mut v = json!({"kind": "handoff"});
            if audience == Audience::Staff {
                v["group"] = json!(group.as_str());
                v["reason"] = json!(reason);
                v["context"] = json!(context.iter().cloned().collect::<BTreeMap<_, _>>());
            }
            v
        }
        // Never sent to a client (`for_client`); its text is for staff only.
        HistoryItem::Note { author, name, key, text } => {
            let mut v = json!({"kind": "note"});
            if audience == Audience::Staff {
                v["author"] = json!(author);
                v["name"] = json!(name);
                v["key"] = json!(key);
                v["text"] = json!(text);
            }
            v
        }
    };
    v["seq"] = json!(entry.seq);
    v["at"] = json!(entry.at.0);
    v
}

fn attachment_list(attachments: &[Attachment]) -> Value {
    Value::Array(
        attachments
            .iter()
            .map(|a| json!({"id": a.id.0, "name": a.name, "content_type": a.content_type, "size": a.size}))
            .collect(),
    )
}

/// Whether a client sees this entry at all: internal notes are for staff only, so a
/// client's stream skips their `seq`.
pub fn for_client(entry: &HistoryEntry) -> bool {
    !matches!(entry.item, HistoryItem::Note { .. })
}

/// A client-stream event frame.
pub fn client_event(entry: &HistoryEntry) -> Value {
    let mut v = history_entry(entry, Audience::Client);
    v["type"] = json!("event");
    v
}

/// An operator-feed event frame. `history` is filled in for `assigned` items.
pub fn operator_event(entry: &FeedEntry, history: Option<Vec<Value>>) -> Value {
    let mut v = match &entry.item {
        FeedItem::Offered { offer, conversation, group, deadline, visitor } => json!({
            "kind": "offer", "offer": offer.0, "conversation": conversation.0, "group": group.as_str(),
            "deadline": deadline.0, "visitor": visitor,
        }),
        FeedItem::OfferWithdrawn { offer, conversation, reason } => json!({
            "kind": "offer_withdrawn", "offer": offer.0, "conversation": conversation.0, "reason": withdraw_name(*reason),
        }),
        FeedItem::Assigned { conversation, history_upto } => json!({
            "kind": "assigned", "conversation": conversation.0, "history_upto": history_upto,
            "history": history.unwrap_or_default(),
        }),
        FeedItem::Conversation { conversation, entry } => json!({
            "kind": "conversation", "conversation": conversation.0, "entry": history_entry(entry, Audience::Staff),
        }),
        FeedItem::Released { conversation } => json!({"kind": "released", "conversation": conversation.0}),
        FeedItem::PresenceChanged { presence } => json!({"kind": "presence", "status": presence_name(*presence)}),
        FeedItem::PresenceSet { presence, reason } => json!({"kind": "presence", "status": presence_name(*presence), "reason": reason}),
        FeedItem::WrapUp { until } => json!({"kind": "wrap_up", "until": until.map(|t| t.0)}),
        FeedItem::Configured { name, capacity, groups } => json!({
            "kind": "configured", "name": name, "capacity": capacity, "groups": groups.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
        }),
        FeedItem::Delivery { conversation, seq, status, reason } => json!({
            "kind": "delivery", "conversation": conversation.0, "entry_seq": seq, "status": status, "reason": reason,
        }),
    };
    v["type"] = json!("event");
    v["seq"] = json!(entry.seq);
    v["at"] = json!(entry.at.0);
    v
}

pub fn presence_str(p: Presence) -> &'static str {
    presence_name(p)
}

/// An error answering a frame that takes no `ref` (`typing`, `read`) names that frame's
/// type in `for`, so that a gateway relaying the socket does not take it for the answer
/// to an earlier request without a name (a visitor's `close`).
pub(crate) fn answering(mut error: Value, kind: Option<&str>) -> Value {
    if let Some(kind) = kind {
        if error.get("ref").is_none() {
            error["for"] = json!(kind);
        }
    }
    error
}
