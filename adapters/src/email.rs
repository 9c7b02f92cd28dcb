//! Email (ADR 0009, "Email"): mail comes in through the node's SMTP listener (the
//! gateway's `smtp` module parses it with [`parse`]); replies go out through the
//! channel's SMTP relay ([`deliver`]), composed by [`compose`].
//!
//! Threading: each reply's Message-ID is `sb.{conversation}.{seq}.{tag}@{domain}`,
//! the tag an HMAC of the conversation and sequence number under the channel's
//! `thread_secret` ([`message_id`]). A customer's answer names it in `In-Reply-To` or
//! `References`; [`thread_of`] finds the conversation again, and a forged id (any other
//! tag) names none. Replies carry `In-Reply-To` the customer's latest message and
//! `References` the thread's first one, so mail clients keep the thread together.
//!
//! SMTP has no idempotency key: a reply whose final `.` got no answer is `unknown`, not
//! sent again (the relay may have queued it).

use std::time::Duration;

use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};
use switchboard_actors::model::ConversationId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{clip, hex, AdapterError, SendOutcome};

/// The conversation attributes an email's first mail sets: its subject and Message-ID.
pub const ATTR_SUBJECT: &str = "email.subject";
pub const ATTR_MESSAGE_ID: &str = "email.message_id";

/// Replies a second one channel hands its relay (relays commonly throttle senders).
pub const MESSAGES_PER_SECOND: u32 = 10;
/// Longest subject kept, in characters.
pub const MAX_SUBJECT_CHARS: usize = 200;
/// Time for one whole SMTP session with the relay (a reply may carry 25 MiB of files).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest SMTP reply read from a relay, in bytes.
const MAX_REPLY_BYTES: usize = 16 * 1024;
/// Message-IDs a mail's `In-Reply-To` and `References` may name that are looked at.
const MAX_REFERENCES: usize = 50;
/// `--` (counted without overlaps) a mail may hold. Every MIME part delimiter begins
/// with it, wherever the parser finds one and whatever boundary it read, so this bounds
/// the parts the parser can build (each holds many times the bytes of an empty one)
/// without reading the mail the way the parser does. Dash rules and signatures of real
/// mail stay far below it.
pub const MAX_DASH_PAIRS: usize = 100_000;
/// RFC 2047 encoded words (`=?`) a mail may hold: the parser tries to decode each one
/// in a header, and a try that fails may have read to the end of its field.
pub const MAX_ENCODED_WORDS: usize = 1_000;
/// Files of a mail read out of the parser: past them, nothing is kept anyway (a message
/// takes 5 files).
const MAX_FILES_READ: usize = 50;
/// Lines of a mail's text looked through for a quoted earlier mail; a text of more is
/// kept as it is.
const MAX_QUOTE_SCAN_LINES: usize = 20_000;

/// A customer's mail as it matters to a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mail {
    /// The `From` address, lowercase: the sender, where answers go.
    pub from: String,
    pub from_name: String,
    pub subject: String,
    /// The mail's Message-ID without angle brackets, or `sha256:<hex>` of the whole
    /// mail when it has none (a relay's retry sends the same bytes).
    pub message_id: String,
    /// The ids `In-Reply-To` and `References` name, in order.
    pub references: Vec<String>,
    /// The text without the quoted earlier mail under it.
    pub text: String,
    pub files: Vec<MailFile>,
    /// Sent by a machine, not a person (RFC 3834 `Auto-Submitted` other than `no`,
    /// `Precedence: bulk` or `junk`, or a delivery report, `multipart/report`): an
    /// out-of-office answer, a bounce, a mass mailing. Such a mail starts no
    /// conversation, so no automatic answer of ours goes back to it (a mail loop).
    pub automatic: bool,
}

/// A file attached to a mail, either way.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailFile {
    pub name: String,
    /// The MIME type, lowercase, without parameters.
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// Reads a mail (RFC 5322 with MIME): sender, subject, ids, text and files. A mail
/// with no usable sender address is refused.
pub fn parse(raw: &[u8]) -> Result<Mail, AdapterError> {
    // A parser that panics on a mail would fail it again on every delivery: the mail is
    // refused for good, not deferred.
    std::panic::catch_unwind(|| parse_mail(raw)).unwrap_or_else(|_| Err(AdapterError::Malformed("the mail could not be parsed (the parser failed on it)".into())))
}

fn parse_mail(raw: &[u8]) -> Result<Mail, AdapterError> {
    if occurrences(raw, b"--", MAX_DASH_PAIRS) > MAX_DASH_PAIRS {
        return Err(AdapterError::Malformed(format!("the mail holds more than {MAX_DASH_PAIRS} MIME part delimiters (--)")));
    }
    if occurrences(raw, b"=?", MAX_ENCODED_WORDS) > MAX_ENCODED_WORDS {
        return Err(AdapterError::Malformed(format!("the mail holds more than {MAX_ENCODED_WORDS} encoded words (=?)")));
    }
    if let Some(encoding) = encoded_forwarded_message(raw) {
        return Err(AdapterError::Malformed(format!(
            "a message forwarded inside the mail is encoded ({encoding}), which RFC 2046 5.2.1 does not allow; forward it as an attachment of its own type"
        )));
    }
    let message = MessageParser::default().parse(raw).ok_or_else(|| AdapterError::Malformed("not a mail message".into()))?;
    // `From`, not `Reply-To`: it is the address the company's mail server checks (SPF,
    // DKIM, DMARC), and the conversation's identity; answers go back to it.
    let from = message.from().and_then(|a| a.first());
    let from_name = from.and_then(|a| a.name.as_deref()).unwrap_or("").trim().to_owned();
    let address = from
        .and_then(|a| a.address.as_deref())
        .map(|a| a.trim().to_ascii_lowercase())
        .filter(|a| switchboard_actors::core::is_email_address(a) && a.len() <= switchboard_actors::core::MAX_SENDER_BYTES)
        .ok_or_else(|| AdapterError::Malformed(format!("the mail has no usable From address (at most {} bytes)", switchboard_actors::core::MAX_SENDER_BYTES)))?;
    let subject = clip(message.subject().unwrap_or("").trim(), MAX_SUBJECT_CHARS);
    let message_id = match message.message_id().map(str::trim).filter(|id| !id.is_empty() && id.len() <= 250) {
        Some(id) => id.to_owned(),
        None => format!("sha256:{}", hex(ring::digest::digest(&ring::digest::SHA256, raw).as_ref())),
    };
    let mut references = Vec::new();
    for header in [message.in_reply_to(), message.references()] {
        if let Some(list) = header.as_text_list() {
            references.extend(list.iter().map(|id| id.trim().to_owned()));
        } else if let Some(id) = header.as_text() {
            references.push(id.trim().to_owned());
        }
    }
    references.retain(|id| !id.is_empty() && id.len() <= 250);
    references.truncate(MAX_REFERENCES);
    let text = strip_quoted(&message.body_text(0).unwrap_or_default().replace("\r\n", "\n"));
    let files = message
        .attachments()
        .take(MAX_FILES_READ)
        .map(|part| {
            let content_type = part
                .content_type()
                .map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{}", ct.ctype(), sub),
                    None => ct.ctype().to_owned(),
                })
                .unwrap_or_else(|| "application/octet-stream".into())
                .to_ascii_lowercase();
            let name = part.attachment_name().map(str::trim).filter(|n| !n.is_empty()).unwrap_or("attachment").to_owned();
            MailFile { name, content_type, bytes: part.contents().to_vec() }
        })
        .collect();
    let automatic = automatic(&message);
    Ok(Mail { from: address, from_name, subject, message_id, references, text, files, automatic })
}

/// Whether a parsed mail says a machine sent it (see [`Mail::automatic`]).
fn automatic(message: &mail_parser::Message) -> bool {
    let header = |name: &str| message.header_raw(name).map(|v| v.trim().to_ascii_lowercase());
    // The keyword before any parameter or comment: `no (a person wrote it)` is `no`.
    let keyword = |v: &str| v.split([';', '(']).next().unwrap_or("").trim().to_owned();
    let auto_submitted = header("Auto-Submitted").is_some_and(|v| !keyword(&v).is_empty() && keyword(&v) != "no");
    // Not `list`: a support address run as a group or list (Google Groups, Mailman)
    // marks every customer's mail so.
    let precedence = header("Precedence").is_some_and(|v| matches!(keyword(&v).as_str(), "bulk" | "junk"));
    let report = message.content_type().is_some_and(|ct| ct.ctype().eq_ignore_ascii_case("multipart") && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("report")));
    auto_submitted || precedence || report
}

/// Bytes of a mail a reading process ([`read_one_mail`]) takes.
pub const MAX_READ_BYTES: u64 = 32 * 1024 * 1024;

/// Memory (address space) a reading process may map, and the CPU seconds it may use:
/// past either the kernel stops it (a failed allocation aborts it; past the CPU time it
/// gets `SIGXCPU`, and `SIGKILL` a second later).
pub const READER_ADDRESS_SPACE: u64 = 2 * 1024 * 1024 * 1024;
pub const READER_CPU_SECONDS: u64 = 5;

/// What a process started to read one mail does (`switchboard read-mail`, which the
/// SMTP listener starts for each mail): limits itself (address space, CPU), reads the
/// raw mail from `input`, parses it ([`parse`]) and writes the outcome to `output`
/// (bincode: `Result<Mail, String>`). A mail the parser takes very long or much memory
/// over (one nested in an encoded part hides its contents from the counts [`parse`]
/// makes first) then costs a process its caller can stop, not the node.
pub fn read_one_mail(input: impl std::io::Read, mut output: impl std::io::Write) -> std::io::Result<()> {
    // No core file of a stopped reader; the others within what the process may set (a
    // lower hard limit it was started under stays).
    for (resource, soft, hard) in [(libc::RLIMIT_CORE, 0, 0), (libc::RLIMIT_AS, READER_ADDRESS_SPACE, READER_ADDRESS_SPACE), (libc::RLIMIT_CPU, READER_CPU_SECONDS, READER_CPU_SECONDS + 1)] {
        let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit read or fill the struct they are given and
        // concern only this process.
        if unsafe { libc::getrlimit(resource, &mut now) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let limit = libc::rlimit { rlim_cur: soft.min(now.rlim_max), rlim_max: hard.min(now.rlim_max) };
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut input.take(MAX_READ_BYTES + 1), &mut raw)?;
    let outcome: Result<Mail, String> = if raw.len() as u64 > MAX_READ_BYTES {
        Err(format!("the mail is larger than {MAX_READ_BYTES} bytes"))
    } else {
        parse(&raw).map_err(|e| e.to_string())
    };
    let bytes = bincode::serde::encode_to_vec(&outcome, bincode::config::standard()).map_err(std::io::Error::other)?;
    output.write_all(&bytes)?;
    output.flush()
}

/// The outcome a reading process wrote ([`read_one_mail`]), decoded within
/// [`MAX_READ_BYTES`] (a mail's text and files are never more than the mail).
pub fn read_outcome(bytes: &[u8]) -> Result<Result<Mail, String>, String> {
    let config = bincode::config::standard().with_limit::<{ MAX_READ_BYTES as usize }>();
    bincode::serde::decode_from_slice(bytes, config).map(|(outcome, _)| outcome).map_err(|e| e.to_string())
}

/// The transfer encoding of a forwarded message (`message/rfc822` or `message/global`,
/// or a part of a `multipart/digest`, whose parts are messages unless they say
/// otherwise) declared `base64` or `quoted-printable`, if the mail holds one: the parser
/// decodes such a part and parses what it decodes as a mail of its own, whose
/// delimiters and encoded words the counts made on the raw mail never saw, and which
/// can hold the parser for minutes.
///
/// Every header block the parser could read is looked at, and read at least as widely
/// as the parser reads it: the mail's own; the one after each line holding `--` (a
/// part's headers follow its delimiter, on the delimiter's own line too; a line that
/// only looks like one costs a look); and the one that opens a forwarded message sent as
/// it is. A block ends only at an empty line (one of spaces continues a field); a
/// field's name may follow colons; its value is read without comments (escapes
/// honoured), spaces and quotes. Every `Content-Type` and every encoding of a block
/// counts, and a field too long to read whole counts as the worst it could be: a doubt
/// refuses the mail rather than lets it through. One pass over the mail.
fn encoded_forwarded_message(raw: &[u8]) -> Option<&'static str> {
    /// Bytes of a field kept (spaces and tabs are not kept): past them it is suspect.
    const FIELD_BYTES: usize = 1024;
    /// A field's value without comments, spaces and quotes, lowercased.
    fn bare(value: &[u8]) -> Vec<u8> {
        let (mut depth, mut escaped) = (0usize, false);
        let mut out = Vec::with_capacity(value.len());
        for &b in value {
            if escaped {
                escaped = false;
                if depth == 0 {
                    out.push(b.to_ascii_lowercase());
                }
                continue;
            }
            match b {
                b'\\' => escaped = true,
                b'(' => depth += 1,
                b')' => depth = depth.saturating_sub(1),
                _ if depth > 0 || b.is_ascii_whitespace() || b == b'"' => {}
                _ => out.push(b.to_ascii_lowercase()),
            }
        }
        out
    }
    #[derive(Default)]
    struct Block {
        typed: bool,
        forwarded: bool,
        encoding: Option<&'static str>,
        // The field being unfolded, without spaces and tabs, and whether it was cut.
        field: Vec<u8>,
        cut: bool,
    }
    impl Block {
        fn add(&mut self, bytes: &[u8]) {
            for &b in bytes.iter().filter(|b| **b != b' ' && **b != b'\t') {
                if self.field.len() >= FIELD_BYTES {
                    self.cut = true;
                    return;
                }
                self.field.push(b);
            }
        }

        fn end_field(&mut self, digest: &mut bool) {
            let (field, cut) = (std::mem::take(&mut self.field), std::mem::take(&mut self.cut));
            let start = field.iter().position(|&b| b != b':').unwrap_or(field.len());
            let field = &field[start..];
            let Some(colon) = field.iter().position(|&b| b == b':') else { return };
            let (name, value) = (bare(&field[..colon]), bare(&field[colon + 1..]));
            if name == b"content-type" {
                self.typed = true;
                let kind = value.split(|&b| b == b';').next().unwrap_or_default();
                *digest |= kind == b"multipart/digest";
                self.forwarded |= cut || kind == b"message/rfc822" || kind == b"message/global" || kind.windows(2).any(|w| w == b"=?");
            } else if name == b"content-transfer-encoding" {
                if value == b"base64" || cut {
                    self.encoding = Some("base64");
                } else if value == b"quoted-printable" || value.windows(2).any(|w| w == b"=?") {
                    self.encoding = Some("quoted-printable");
                }
            } else if cut && (name.starts_with(b"content-t") || name.is_empty()) {
                // Cut before its name could be read whole.
                self.forwarded = true;
                self.encoding = Some("base64");
            }
        }

        /// At the block's end: the encoding, if it is an encoded forwarded message.
        fn end(&mut self, digest: &mut bool) -> Option<&'static str> {
            self.end_field(digest);
            let forwarded = self.forwarded || (*digest && !self.typed);
            forwarded.then_some(self.encoding).flatten()
        }
    }
    // A part's headers may begin on its delimiter's line, right after the delimiter
    // (whose length is not known here): the line from the first of the two field names
    // found after its first `--`, if any.
    fn after_delimiter(line: &[u8]) -> Option<&[u8]> {
        let dashes = memchr::memmem::find(line, b"--")?;
        let lower: Vec<u8> = line[dashes + 2..].iter().map(u8::to_ascii_lowercase).collect();
        let at = [&b"content-type"[..], &b"content-transfer-encoding"[..]].iter().filter_map(|name| memchr::memmem::find(&lower, name)).min()?;
        Some(&line[dashes + 2 + at..])
    }
    let mut digest = false;
    let mut block = Some(Block::default());
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match block.as_mut() {
            Some(current) if line.is_empty() => {
                if let Some(encoding) = current.end(&mut digest) {
                    return Some(encoding);
                }
                // A forwarded message sent as it is opens with headers of its own.
                let forwarded = current.forwarded || (digest && !current.typed);
                block = forwarded.then(Block::default);
            }
            // A folded field goes on.
            Some(current) if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') => current.add(line),
            Some(current) => {
                current.end_field(&mut digest);
                current.add(after_delimiter(line).unwrap_or(line));
            }
            None => {
                if memchr::memmem::find(line, b"--").is_some() {
                    let mut next = Block::default();
                    if let Some(field) = after_delimiter(line) {
                        next.add(field);
                    }
                    block = Some(next);
                }
            }
        }
    }
    block.as_mut().and_then(|b| b.end(&mut digest))
}

/// Occurrences of `needle` in `raw` without overlaps, counted up to `max + 1`.
fn occurrences(raw: &[u8], needle: &[u8], max: usize) -> usize {
    memchr::memmem::find_iter(raw, needle).take(max + 1).count()
}

/// The text of a reply without the earlier mail its client quoted under it: a trailing
/// block of `>` lines with the attribution line before it ("On … wrote:"), or all from
/// Outlook's "-----Original Message-----" or underscore rule. Text that is only a
/// quote is kept whole.
pub fn strip_quoted(text: &str) -> String {
    if text.bytes().filter(|b| *b == b'\n').count() >= MAX_QUOTE_SCAN_LINES {
        return text.to_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut end = lines
        .iter()
        .position(|l| {
            let t = l.trim();
            t.eq_ignore_ascii_case("-----Original Message-----") || (t.len() >= 20 && t.bytes().all(|b| b == b'_'))
        })
        .unwrap_or(lines.len());
    let mut start_of_quote = end;
    while start_of_quote > 0 && (lines[start_of_quote - 1].trim().is_empty() || lines[start_of_quote - 1].trim_start().starts_with('>')) {
        start_of_quote -= 1;
    }
    if lines[start_of_quote..end].iter().any(|l| l.trim_start().starts_with('>')) {
        end = start_of_quote;
        while end > 0 && lines[end - 1].trim().is_empty() {
            end -= 1;
        }
        if end > 0 && lines[end - 1].trim_end().ends_with(':') {
            end -= 1;
            // An attribution wrapped over two lines: "On Tue, … Ann <ann@example.com>" / "wrote:".
            if end > 0 && lines[end].trim().split_whitespace().count() <= 2 && !lines[end - 1].trim().is_empty() {
                end -= 1;
            }
        }
    }
    let kept = lines[..end].join("\n").trim().to_owned();
    if kept.is_empty() { text.trim().to_owned() } else { kept }
}

fn tag(secret: &str, conversation: ConversationId, seq: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mac = ring::hmac::sign(&key, format!("{}.{seq}", conversation.0).as_bytes());
    hex(&mac.as_ref()[..10])
}

/// Our Message-ID for history entry `seq` of `conversation` (without angle brackets).
pub fn message_id(conversation: ConversationId, seq: u64, secret: &str, domain: &str) -> String {
    format!("sb.{}.{seq}.{}@{domain}", conversation.0, tag(secret, conversation, seq))
}

/// The conversation one of our Message-IDs among `references` belongs to, checked
/// against its tag; the last one named wins (the message answered).
pub fn thread_of(references: &[String], secret: &str) -> Option<ConversationId> {
    references.iter().rev().find_map(|id| {
        let local = id.strip_prefix("sb.")?.split('@').next()?;
        let mut parts = local.split('.');
        let conversation = ConversationId(parts.next()?.parse().ok()?);
        let seq: u64 = parts.next()?.parse().ok()?;
        let given = parts.next()?;
        (parts.next().is_none() && crate::same_secret(given.as_bytes(), tag(secret, conversation, seq).as_bytes())).then_some(conversation)
    })
}

/// A reply to a customer, as [`compose`] writes it.
pub struct Reply<'a> {
    pub from: &'a str,
    pub from_name: &'a str,
    pub to: &'a str,
    pub subject: &'a str,
    /// Without angle brackets.
    pub message_id: &'a str,
    pub in_reply_to: Option<&'a str>,
    pub references: &'a [String],
    pub text: &'a str,
    pub files: &'a [MailFile],
    /// Milliseconds since the Unix epoch.
    pub date_ms: u64,
    /// Written by no person (a notice: after hours, a queue's greeting): marked so
    /// (`Auto-Submitted: auto-replied`), so that an out-of-office or a helpdesk does not
    /// answer it (RFC 3834).
    pub automatic: bool,
}

/// The reply as an RFC 5322 message with CRLF line ends: text as UTF-8 in base64 and
/// each file as a base64 attachment (multipart/mixed when there are files).
pub fn compose(reply: &Reply<'_>) -> Vec<u8> {
    let mut out = String::new();
    let mut header = |name: &str, value: &str| {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    };
    header("Date", &rfc5322_date(reply.date_ms));
    header("From", &mailbox(reply.from_name, reply.from));
    header("To", &format!("<{}>", reply.to));
    header("Subject", &encode_words(reply.subject));
    header("Message-ID", &format!("<{}>", reply.message_id));
    // The customer's ids go back only as they may be written: printable ASCII without
    // spaces or angle brackets, so none can end the header or start another.
    let safe = |id: &&str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>');
    if let Some(id) = reply.in_reply_to.filter(safe) {
        header("In-Reply-To", &format!("<{id}>"));
    }
    let references: Vec<String> = reply.references.iter().map(String::as_str).filter(safe).map(|id| format!("<{id}>")).collect();
    if !references.is_empty() {
        header("References", &references.join("\r\n "));
    }
    header("MIME-Version", "1.0");
    if reply.automatic {
        header("Auto-Submitted", "auto-replied");
        // What Exchange and Outlook look at instead.
        header("X-Auto-Response-Suppress", "All");
    } else {
        header("Auto-Submitted", "no");
    }
    let text_part = format!("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}", base64_lines(reply.text.as_bytes()));
    if reply.files.is_empty() {
        out.push_str(&text_part);
        return out.into_bytes();
    }
    let boundary = format!("sb-{}", hex(&ring::digest::digest(&ring::digest::SHA256, reply.message_id.as_bytes()).as_ref()[..12]));
    out.push_str(&format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"));
    out.push_str(&format!("--{boundary}\r\n{text_part}"));
    for file in reply.files {
        // A header line stays well under 998 bytes: a long name keeps its end (the
        // extension) and loses its middle.
        let chars: Vec<char> = file.name.chars().collect();
        let short: String = if chars.len() > 60 { chars[..40].iter().chain(['…'].iter()).chain(chars[chars.len() - 19..].iter()).collect() } else { file.name.clone() };
        let ascii = short.chars().all(|c| c.is_ascii_graphic() || c == ' ') && !short.contains(['"', '\\']);
        let name = if ascii { format!("filename=\"{short}\"") } else { format!("filename*=UTF-8''{}", percent(&short)) };
        out.push_str(&format!(
            "--{boundary}\r\nContent-Type: {}\r\nContent-Disposition: attachment; {name}\r\nContent-Transfer-Encoding: base64\r\n\r\n{}",
            file.content_type,
            base64_lines(&file.bytes)
        ));
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    out.into_bytes()
}

fn base64_lines(bytes: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 76 * 2 + 2);
    for chunk in encoded.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push_str("\r\n");
    }
    out
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// `Name <address>`, the name quoted or as encoded words when it is not plain ASCII.
fn mailbox(name: &str, address: &str) -> String {
    let name: String = name.chars().filter(|c| !c.is_control()).collect();
    if name.is_empty() {
        format!("<{address}>")
    } else if name.is_ascii() {
        format!("\"{}\" <{address}>", name.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        format!("{} <{address}>", encode_words(&name))
    }
}

/// Header text as RFC 2047 encoded words (UTF-8, base64) when it is not plain ASCII,
/// each word under 76 characters, folded.
fn encode_words(text: &str) -> String {
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.bytes().all(|b| (32..127).contains(&b)) {
        return text;
    }
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in text.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    words.push(chunk);
    words.iter().map(|w| format!("=?UTF-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(w))).collect::<Vec<_>>().join("\r\n ")
}

/// An RFC 5322 date in UTC: `Thu, 03 Dec 2026 09:56:22 +0000`.
pub fn rfc5322_date(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
    format!("{weekday}, {day:02} {} {year} {h:02}:{m:02}:{s:02} +0000", MONTHS[(month - 1) as usize])
}

/// Where a channel's replies are handed over.
pub struct Relay<'a> {
    pub host: &'a str,
    pub port: u16,
    /// `tls` (TLS from the first byte), `starttls` (required) or `none`.
    pub security: &'a str,
    pub username: &'a str,
    pub password: &'a str,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Session {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

/// Why a session ended without the relay taking the mail.
struct Stop {
    /// The final `.` was written: the relay may hold the mail.
    after_data: bool,
    /// A 5xx answer: the relay refused for good.
    permanent: bool,
    reason: String,
}

impl Session {
    /// One reply (all its lines): its code and its text.
    async fn reply(&mut self, after_data: bool) -> Result<(u16, String), Stop> {
        let mut text = String::new();
        loop {
            let line = loop {
                if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=at).collect();
                    break String::from_utf8_lossy(&line).trim_end().to_owned();
                }
                if self.buf.len() > MAX_REPLY_BYTES {
                    return Err(Stop { after_data, permanent: false, reason: "the relay's answer is too long".into() });
                }
                let mut chunk = [0u8; 2048];
                match self.io.read(&mut chunk).await {
                    Ok(0) => return Err(Stop { after_data, permanent: false, reason: "the relay closed the connection".into() }),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(Stop { after_data, permanent: false, reason: format!("reading from the relay: {e}") }),
                }
            };
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok()).ok_or_else(|| Stop { after_data, permanent: false, reason: format!("not an SMTP answer: {}", clip(&line, 80)) })?;
            text.push_str(line.get(4..).unwrap_or("").trim());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, text));
            }
            text.push('\n');
            if text.len() > MAX_REPLY_BYTES {
                return Err(Stop { after_data, permanent: false, reason: "the relay's answer is too long".into() });
            }
        }
    }

    async fn send(&mut self, bytes: &[u8], after_data: bool) -> Result<(), Stop> {
        self.io.write_all(bytes).await.map_err(|e| Stop { after_data, permanent: false, reason: format!("writing to the relay: {e}") })?;
        self.io.flush().await.map_err(|e| Stop { after_data, permanent: false, reason: format!("writing to the relay: {e}") })
    }

    /// Sends a command line and wants an answer with code `want` (any 2xx for 250).
    async fn command(&mut self, line: &str, want: u16, what: &str) -> Result<String, Stop> {
        self.send(format!("{line}\r\n").as_bytes(), false).await?;
        let (code, text) = self.reply(false).await?;
        if code == want || (want == 250 && (200..300).contains(&code)) {
            return Ok(text);
        }
        Err(Stop { after_data: false, permanent: code >= 500, reason: format!("{what}: {code} {}", clip(&text, 300)) })
    }
}

/// Hands one mail to the relay: `MAIL FROM`, `RCPT TO`, `DATA`. Within `timeout`
/// altogether; a session broken before the final `.` delivered nothing and is retried.
pub async fn deliver(tls: &tokio_rustls::TlsConnector, timeout: Duration, relay: &Relay<'_>, from: &str, to: &str, data: &[u8]) -> SendOutcome {
    let dot_sent = std::sync::atomic::AtomicBool::new(false);
    let outcome = tokio::time::timeout(timeout, session(tls, relay, from, to, data, &dot_sent)).await;
    let stop = match outcome {
        Ok(Ok(_)) => return SendOutcome::Sent { provider_id: String::new() },
        Ok(Err(stop)) => stop,
        // Out of time after the final `.`: the relay may hold the mail.
        Err(_) if dot_sent.load(std::sync::atomic::Ordering::Acquire) => {
            return SendOutcome::Unknown { reason: format!("the relay did not answer the end of the mail within {} s", timeout.as_secs()) }
        }
        Err(_) => return SendOutcome::Retry { reason: format!("the relay did not finish within {} s", timeout.as_secs()), after: None },
    };
    match stop {
        Stop { after_data: true, reason, .. } => SendOutcome::Unknown { reason },
        Stop { permanent: true, reason, .. } => SendOutcome::Failed { reason },
        Stop { reason, .. } => SendOutcome::Retry { reason, after: None },
    }
}

async fn session(tls: &tokio_rustls::TlsConnector, relay: &Relay<'_>, from: &str, to: &str, data: &[u8], dot_sent: &std::sync::atomic::AtomicBool) -> Result<(), Stop> {
    let fail = |reason: String| Stop { after_data: false, permanent: false, reason };
    let tcp = tokio::net::TcpStream::connect((relay.host, relay.port)).await.map_err(|e| fail(format!("connecting to {}:{}: {e}", relay.host, relay.port)))?;
    let _ = tcp.set_nodelay(true);
    let server_name = rustls::pki_types::ServerName::try_from(relay.host.to_owned()).map_err(|e| Stop { after_data: false, permanent: true, reason: format!("{}: {e}", relay.host) })?;
    let io: Box<dyn Io> = if relay.security == "tls" {
        Box::new(tls.connect(server_name.clone(), tcp).await.map_err(|e| fail(format!("TLS with {}: {e}", relay.host)))?)
    } else {
        Box::new(tcp)
    };
    let mut s = Session { io, buf: Vec::new() };
    let (code, text) = s.reply(false).await?;
    if code != 220 {
        return Err(Stop { after_data: false, permanent: code >= 500, reason: format!("greeting: {code} {}", clip(&text, 300)) });
    }
    let helo = from.rsplit_once('@').map_or("localhost", |(_, d)| d).to_owned();
    let mut features = s.command(&format!("EHLO {helo}"), 250, "EHLO").await?;
    if relay.security == "starttls" {
        if !features.lines().any(|l| l.trim().eq_ignore_ascii_case("STARTTLS")) {
            // A relay that does not offer it is set up differently: no retry mends that.
            return Err(Stop { after_data: false, permanent: true, reason: format!("{} does not offer STARTTLS", relay.host) });
        }
        s.command("STARTTLS", 220, "STARTTLS").await?;
        // Nothing the relay sent before the handshake counts after it.
        s.buf.clear();
        let io = std::mem::replace(&mut s.io, Box::new(tokio::io::duplex(1).0));
        s.io = Box::new(tls.connect(server_name, io).await.map_err(|e| fail(format!("TLS with {}: {e}", relay.host)))?);
        features = s.command(&format!("EHLO {helo}"), 250, "EHLO").await?;
    }
    if !relay.username.is_empty() {
        let _ = features;
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", relay.username, relay.password));
        s.send(format!("AUTH PLAIN {plain}\r\n").as_bytes(), false).await?;
        let (code, text) = s.reply(false).await?;
        if code != 235 {
            // 535: the credentials are wrong, which no retry mends.
            return Err(Stop { after_data: false, permanent: code >= 500, reason: format!("AUTH: {code} {}", clip(&text, 300)) });
        }
    }
    s.command(&format!("MAIL FROM:<{from}>"), 250, "MAIL FROM").await?;
    s.command(&format!("RCPT TO:<{to}>"), 250, "RCPT TO").await?;
    s.command("DATA", 354, "DATA").await?;
    s.send(&dot_stuffed(data), false).await?;
    // From here the relay may hold the mail whatever happens to the connection.
    dot_sent.store(true, std::sync::atomic::Ordering::Release);
    s.send(b".\r\n", true).await?;
    let (code, text) = s.reply(true).await?;
    if !(200..300).contains(&code) {
        return Err(Stop { after_data: false, permanent: code >= 500, reason: format!("the relay refused the mail: {code} {}", clip(&text, 300)) });
    }
    let _ = s.send(b"QUIT\r\n", true).await;
    Ok(())
}

/// The mail with CRLF line ends, each line that starts with `.` doubled (RFC 5321
/// 4.5.2), ending in CRLF.
fn dot_stuffed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    // `split` yields an empty last piece after a final newline: one CRLF too many.
    if data.ends_with(b"\n") {
        out.truncate(out.len() - 2);
    }
    out
}

/// Sends one outbox entry as a reply mail; the provider id is its Message-ID.
pub async fn send(client: &crate::http::Client, relay: &Relay<'_>, from: &str, from_name: &str, thread_secret: &str, message: &crate::Outgoing) -> SendOutcome {
    if !switchboard_actors::core::is_email_address(&message.recipient) {
        return SendOutcome::Failed { reason: format!("{} is not an email address", clip(&message.recipient, 80)) };
    }
    let id = message_id(message.conversation, message.seq, thread_secret, domain_of(from));
    let thread = message.thread.clone().unwrap_or_default();
    let mut references = thread.references.clone();
    references.dedup();
    let data = compose(&Reply {
        from,
        from_name,
        to: &message.recipient,
        subject: &if thread.in_reply_to.is_some() { reply_subject(&thread.subject) } else { thread.subject.clone() },
        message_id: &id,
        in_reply_to: thread.in_reply_to.as_deref(),
        references: &references,
        text: &message.text,
        files: &message.files,
        date_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        automatic: message.automatic,
    });
    match deliver(&client.tls(), SESSION_TIMEOUT, relay, from, &message.recipient, &data).await {
        SendOutcome::Sent { .. } => SendOutcome::Sent { provider_id: id },
        other => other,
    }
}

/// An address's domain, for Message-IDs.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("localhost", |(_, d)| d)
}

/// A subject for replies: the customer's with one `Re: `.
pub fn reply_subject(subject: &str) -> String {
    let trimmed = subject.trim();
    let bare = trimmed.get(..3).filter(|p| p.eq_ignore_ascii_case("re:")).map_or(trimmed, |_| trimmed[3..].trim_start());
    if bare.is_empty() { "Re: your message".into() } else { format!("Re: {bare}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_names_its_conversation_and_a_forged_tag_names_none() {
        let id = message_id(ConversationId(42), 7, "0123456789abcdef", "support.example.com");
        assert!(id.starts_with("sb.42.7.") && id.ends_with("@support.example.com"), "{id}");
        assert_eq!(thread_of(&["other@x".into(), id.clone()], "0123456789abcdef"), Some(ConversationId(42)));
        assert_eq!(thread_of(&[id.clone()], "another-secret-16"), None);
        let forged = id.replace("sb.42.", "sb.43.");
        assert_eq!(thread_of(&[forged], "0123456789abcdef"), None);
    }

    #[test]
    fn an_encoded_forwarded_message_is_refused_before_it_is_parsed_and_a_plain_one_is_read() {
        let head = "From: a@example.com\r\nTo: support@example.com\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n";
        let inner = "From: b@example.org\r\nSubject: inner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n";
        let refused = [
            // The whole mail, and a part, each however its fields are written.
            format!("{head}Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nRnJvbTogYkBleGFtcGxlLm9yZw0KDQpoaQ==\r\n"),
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\ncontent-transfer-encoding: Quoted-Printable\r\nCONTENT-TYPE: message/rfc822; x=y\r\n\r\nFrom: b@example.org=0D=0A\r\n--b--\r\n"),
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\nX--b\r\nContent-Type: (note) Message/ (a) RFC822\r\nContent-Transfer-Encoding:\r\n base64\r\n\r\nQQ==\r\n--b--\r\n"),
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/global\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n--b--\r\n"),
            // Inside a forwarded message sent as it is.
            format!("{head}Content-Type: message/rfc822\r\n\r\nFrom: b@example.org\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n"),
            // A digest's part is a message unless it says otherwise.
            format!("{head}Content-Type: multipart/digest; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n--b--\r\n"),
            // Headers on the delimiter's line; after colons; past a line of spaces.
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--bContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n--b--\r\n"),
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n:Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n--b--\r\n"),
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX: a\r\n \r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n--b--\r\n"),
            // Spaces past any length; an escaped parenthesis in a comment; a field too
            // long to read whole.
            format!("{head}Content-Type:{}message/rfc822\r\nContent-Transfer-Encoding:{}base64\r\n\r\nQQ==\r\n", " ".repeat(5000), "\t".repeat(5000)),
            format!("{head}Content-Type: (\\() message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n"),
            format!("{head}Content-Type: {}\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n", "x".repeat(5000)),
        ];
        for mail in &refused {
            let outcome = parse(mail.as_bytes());
            assert!(matches!(&outcome, Err(AdapterError::Malformed(why)) if why.contains("RFC 2046 5.2.1")), "{mail}: {:?}", outcome.map(|m| m.text));
        }
        // Taken: a forwarded message sent as it is (its own text may be encoded), a file
        // named like a message, a bounce's report.
        let read = [
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n{inner}--b--\r\n"),
            format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nthe file\r\n--b\r\nContent-Type: text/plain; name=\"message.txt\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n"),
            format!("{head}Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nnot delivered\r\n--b\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\n--b--\r\n"),
            format!("{head}Content-Type: multipart/digest; boundary=b\r\n\r\n--b\r\n\r\n{inner}--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n"),
        ];
        for mail in &read {
            assert!(parse(mail.as_bytes()).is_ok(), "{mail}");
        }
    }

    #[test]
    fn a_mail_of_too_many_parts_is_refused_before_it_is_parsed() {
        let head = "From: a@example.com\r\nTo: support@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n";
        let part = "--b\r\nContent-Type: image/png\r\n\r\n\r\n";
        let many = format!("{head}{}--b--\r\n", part.repeat(MAX_DASH_PAIRS));
        let refused = parse(many.as_bytes());
        assert!(matches!(&refused, Err(AdapterError::Malformed(why)) if why.contains("delimiters")), "{:?}", refused.map(|m| m.files.len()));
        // Whatever the boundary and however it is declared or placed: every delimiter
        // begins with `--`.
        for declared in ["boundary= b", "BOUNDARY=(note)b", "boundary*=us-ascii''%62", "boundary==?us-ascii?q?b?="] {
            let sneaky = format!("From: a@example.com\r\n\x0cContent-Type: multipart/mixed; {declared}\r\n\r\n{}--b--\r\n", "X--b\r\n\r\n".repeat(MAX_DASH_PAIRS));
            assert!(parse(sneaky.as_bytes()).is_err(), "{declared}");
        }
        let few = format!("{head}{}--b--\r\n", part.repeat(3));
        assert!(parse(few.as_bytes()).is_ok());
        // A signature's `--` and rules of dashes of a real mail stay far below it.
        let signed = format!("{head}{}--b\r\nContent-Type: text/plain\r\n\r\nThanks\r\n-- \r\nAnn\r\n{}\r\n--b--\r\n", part.repeat(3), "-----Original Message-----\r\n".repeat(500));
        assert!(parse(signed.as_bytes()).is_ok());
        // Encoded words the parser would try one after another are bounded too.
        let words = format!("From: a@example.com\r\nContent-Type: a/b; x= {}\r\n\r\nx", "=?ab?q? ".repeat(MAX_ENCODED_WORDS + 1));
        assert!(matches!(parse(words.as_bytes()), Err(AdapterError::Malformed(why)) if why.contains("encoded words")));
    }

    #[test]
    fn a_text_of_very_many_lines_is_kept_as_it_is() {
        let text = format!("my answer{}\n> quoted", "\n".repeat(MAX_QUOTE_SCAN_LINES));
        assert_eq!(strip_quoted(&text), text);
    }

    #[test]
    fn quoted_mail_under_a_reply_is_dropped() {
        let text = "Yes, order 1234.\n\nOn Tue, 1 Dec 2026 at 10:00, Support <support@example.com>\nwrote:\n> Which order?\n>\n> -- \n> Support\n";
        assert_eq!(strip_quoted(text), "Yes, order 1234.");
        assert_eq!(strip_quoted("Thanks!\n\n-----Original Message-----\nFrom: Support\nHello"), "Thanks!");
        assert_eq!(strip_quoted("> only a quote"), "> only a quote");
        assert_eq!(strip_quoted("Line one\n> inline quote\nmy answer"), "Line one\n> inline quote\nmy answer");
    }

    #[test]
    fn a_mail_is_read_with_its_encoded_subject_files_and_ids() {
        let raw = concat!(
            "From: =?UTF-8?B?0JDQvdC90LA=?= <Anna@Example.COM>\r\n",
            "To: support@example.com\r\n",
            "Subject: =?KOI8-R?B?08/Sz8vB?= 1\r\n",
            "Message-ID: <abc@mail.example.com>\r\n",
            "In-Reply-To: <sb.1.2.x@example.com>\r\n",
            "References: <root@mail.example.com> <sb.1.2.x@example.com>\r\n",
            "MIME-Version: 1.0\r\n",
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n",
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello there\r\n> old\r\n",
            "--b\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename=\"a.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n",
            "--b--\r\n"
        );
        let mail = parse(raw.as_bytes()).expect("parsed");
        assert_eq!(mail.from, "anna@example.com");
        assert_eq!(mail.from_name, "Анна");
        assert_eq!(mail.subject, "сорока 1");
        assert_eq!(mail.message_id, "abc@mail.example.com");
        assert_eq!(mail.references, vec!["sb.1.2.x@example.com", "root@mail.example.com", "sb.1.2.x@example.com"]);
        assert_eq!(mail.text, "Hello there");
        assert_eq!(mail.files.len(), 1);
        assert_eq!((mail.files[0].name.as_str(), mail.files[0].content_type.as_str()), ("a.png", "image/png"));
        assert_eq!(mail.files[0].bytes, b"\x89PNG\r\n\x1a\n");
        assert!(matches!(parse(b"Subject: x\r\n\r\nno sender"), Err(AdapterError::Malformed(_))));
    }

    #[test]
    fn japanese_chinese_and_korean_charsets_are_read() {
        let mut raw = b"From: a@example.org\r\nSubject: =?ISO-2022-JP?B?GyRCJDMkcyRLJEEkTxsoQg==?=\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=Shift_JIS\r\n\r\n".to_vec();
        raw.extend_from_slice(&[0x82, 0xb1, 0x82, 0xf1, 0x82, 0xc9, 0x82, 0xbf, 0x82, 0xcd]);
        let mail = parse(&raw).expect("parsed");
        assert_eq!((mail.subject.as_str(), mail.text.trim()), ("こんにちは", "こんにちは"));
        for (charset, bytes, text) in [("GBK", vec![0xc4, 0xe3, 0xba, 0xc3], "你好"), ("EUC-KR", vec![0xbe, 0xc8, 0xb3, 0xe7], "안녕")] {
            let mut raw = format!("From: a@example.org\r\nContent-Type: text/plain; charset={charset}\r\n\r\n").into_bytes();
            raw.extend_from_slice(&bytes);
            assert_eq!(parse(&raw).expect("parsed").text.trim(), text, "{charset}");
        }
    }

    #[test]
    fn a_mail_a_machine_sent_is_told_from_a_person_s() {
        let with = |headers: &str| parse(format!("From: a@example.org\r\n{headers}\r\nhello").as_bytes()).expect("parsed").automatic;
        assert!(!with(""));
        assert!(!with("Auto-Submitted: no\r\n"));
        assert!(with("Auto-Submitted: auto-replied\r\n"));
        assert!(with("Auto-Submitted: Auto-Generated; owner-email=x@example.org\r\n"));
        assert!(with("Precedence: bulk\r\n"));
        assert!(!with("Precedence: list\r\n"), "a support address run as a list marks its customers' mail so");
        assert!(with("Precedence: junk\r\n"));
        assert!(!with("Auto-Submitted: no (written by a person)\r\n"));
        assert!(!with("Precedence: first-class\r\n"));
        assert!(with("MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n"));
    }

    #[test]
    fn a_composed_reply_reads_back_with_its_thread_and_files() {
        let files = vec![MailFile { name: "счёт.pdf".into(), content_type: "application/pdf".into(), bytes: b"%PDF-1.4 test".to_vec() }];
        let refs = vec!["root@mail.example.com".to_owned()];
        let raw = compose(&Reply {
            from: "support@example.com",
            from_name: "Служба поддержки",
            to: "anna@example.com",
            subject: &reply_subject("Re: Заказ 1234"),
            message_id: "sb.1.5.abc@example.com",
            in_reply_to: Some("abc@mail.example.com"),
            references: &refs,
            text: ".a line with a dot\nЗдравствуйте!",
            files: &files,
            date_ms: 1_796_291_782_000,
            automatic: false,
        });
        let text = String::from_utf8(raw.clone()).expect("ascii");
        assert!(text.contains("Auto-Submitted: no\r\n") && !text.contains("X-Auto-Response-Suppress"), "{text}");
        assert!(text.contains("Date: Thu, 03 Dec 2026 09:56:22 +0000\r\n"), "{text}");
        let back = MessageParser::default().parse(&raw).expect("parses");
        assert_eq!(back.subject(), Some("Re: Заказ 1234"));
        assert_eq!(back.message_id(), Some("sb.1.5.abc@example.com"));
        assert_eq!(back.in_reply_to().as_text(), Some("abc@mail.example.com"));
        assert_eq!(back.body_text(0).as_deref().map(str::trim_end), Some(".a line with a dot\nЗдравствуйте!"));
        let file = back.attachments().next().expect("a file");
        assert_eq!(file.attachment_name(), Some("счёт.pdf"));
        assert_eq!(file.contents(), b"%PDF-1.4 test");
        assert_eq!(back.from().and_then(|a| a.first()).and_then(|a| a.name.as_deref()), Some("Служба поддержки"));
        assert!(dot_stuffed(b"a\r\n.b\n").starts_with(b"a\r\n..b\r\n"));
        // An id that would end its header is left out.
        let bad = vec!["x@y\r\nBcc: eve@example.net".to_owned()];
        let raw = compose(&Reply { from: "s@example.com", from_name: "", to: "a@example.org", subject: "S\r\nBcc: eve@example.net", message_id: "sb.1.1.a@example.com", in_reply_to: Some("x@y\r\nBcc: e@x"), references: &bad, text: "t", files: &[], date_ms: 0, automatic: false });
        let text = String::from_utf8(raw).expect("ascii");
        assert!(!text.contains("\r\nBcc") && !text.contains("In-Reply-To") && !text.contains("References"), "{text}");
        // A notice says a machine wrote it, so no out-of-office answers it.
        let raw = compose(&Reply { from: "s@example.com", from_name: "", to: "a@example.org", subject: "S", message_id: "sb.1.1.a@example.com", in_reply_to: None, references: &[], text: "We open at 9.", files: &[], date_ms: 0, automatic: true });
        let text = String::from_utf8(raw).expect("ascii");
        assert!(text.contains("Auto-Submitted: auto-replied\r\n") && text.contains("X-Auto-Response-Suppress: All\r\n"), "{text}");
    }
}
