//! The SMTP listener (docs/channel-api.md, "Email"): mail for an email channel's address
//! becomes that channel's inbound message, with its files.
//!
//! It takes mail for the channels' addresses only (it relays nothing) and answers `250`
//! to the end of `DATA` only once the message is committed; a failed commit answers
//! `451`, so the sending server delivers it again, and the Message-ID makes that
//! harmless. It is meant to sit behind the company's mail server, which does TLS, spam
//! filtering and sender checks: it offers neither STARTTLS nor AUTH.
//!
//! What an anonymous peer can cost is bounded ([`SmtpLimits`]): connections in all and
//! per address, a command line's length, the time for each command and for a whole
//! session, the size of a mail, recipients per mail, and mails being read at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_actors::core::{Reply, MAX_ATTACHMENTS_PER_MESSAGE, MAX_TEXT_CHARS};
use switchboard_actors::model::{AdapterConfig, ChannelId, Command};
use switchboard_adapters::email;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::attachments::{bytes_match_type, forget_inbound_files, keep_inbound_file, safe_name, ALLOWED_TYPES, MAX_ATTACHMENT_BYTES};
use crate::Gateway;

/// What one SMTP peer may use (docs/security.md, "SMTP listener").
#[derive(Clone, Copy, Debug)]
pub struct SmtpLimits {
    pub max_connections: usize,
    pub per_address: usize,
    /// Largest mail, as sent (MIME encoding included), in bytes.
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    /// Mails being read or taken in at once; a peer past this waits for a slot.
    pub data_slots: usize,
    /// Of those, the most one address may hold: one slow sender cannot hold them all.
    pub data_per_address: usize,
    /// Time for each command line, and for the whole `DATA` body.
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// A whole connection.
    pub session_timeout: Duration,
}

impl Default for SmtpLimits {
    fn default() -> Self {
        SmtpLimits {
            max_connections: 64,
            per_address: 8,
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 10,
            data_slots: 4,
            data_per_address: 2,
            command_timeout: Duration::from_secs(60),
            data_timeout: Duration::from_secs(300),
            session_timeout: Duration::from_secs(600),
        }
    }
}

/// Longest command line, CRLF included (RFC 5321 4.5.3.1.4).
const MAX_COMMAND_LINE: usize = 512;
/// Bad commands before the connection is closed.
const MAX_ERRORS: u32 = 10;

struct Shared {
    gw: Arc<Gateway>,
    limits: SmtpLimits,
    connections: Arc<tokio::sync::Semaphore>,
    data: Arc<tokio::sync::Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Mails each address has in `DATA` (waiting for a slot or holding one).
    data_by_address: Mutex<HashMap<IpAddr, usize>>,
    /// Told each time an address's mail leaves `DATA`.
    data_left: tokio::sync::Notify,
}

/// Serves SMTP on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, limits: SmtpLimits, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let shared = Arc::new(Shared {
        gw,
        limits,
        connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
        data: Arc::new(tokio::sync::Semaphore::new(limits.data_slots)),
        per_address: Mutex::default(),
        data_by_address: Mutex::default(),
        data_left: tokio::sync::Notify::new(),
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "SMTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move { connection(shared, stream, peer).await });
    }
}

/// Releases a peer's connection count when its session ends.
struct Counted<'a>(&'a Shared, IpAddr);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        release(&self.0.per_address, self.1);
    }
}

/// Releases an address's mail in `DATA` when it is taken in (or fails).
struct InData<'a>(&'a Shared, IpAddr);

impl Drop for InData<'_> {
    fn drop(&mut self) {
        release(&self.0.data_by_address, self.1);
        self.0.data_left.notify_waiters();
    }
}

fn release(map: &Mutex<HashMap<IpAddr, usize>>, address: IpAddr) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = map.get_mut(&address) {
        *n -= 1;
        if *n == 0 {
            map.remove(&address);
        }
    }
}

async fn connection(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let Ok(_permit) = shared.connections.clone().try_acquire_owned() else {
        let _ = last_word(&mut stream, b"421 4.3.2 Too many connections, try again later\r\n").await;
        return;
    };
    let admitted = {
        let mut map = shared.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(crate::budget::client_address(peer.ip())).or_default();
        if *n >= shared.limits.per_address {
            false
        } else {
            *n += 1;
            true
        }
    };
    if !admitted {
        let _ = last_word(&mut stream, b"421 4.7.0 Too many connections from your address\r\n").await;
        return;
    }
    let address = crate::budget::client_address(peer.ip());
    let _counted = Counted(&shared, address);
    let mut session = Session { shared: &shared, stream, address, buf: Vec::new(), helo: false, rcpts: Vec::new(), mail: false, null_sender: false, errors: 0 };
    match tokio::time::timeout(shared.limits.session_timeout, session.run()).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => tracing::debug!(%peer, %reason, "SMTP session ended"),
        Err(_) => {
            let _ = last_word(&mut session.stream, b"421 4.4.2 Session too long, closing\r\n").await;
        }
    }
}

/// How long a closing reply may wait for a peer that does not read.
const LAST_WORD: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes a closing reply, giving up after `LAST_WORD`: a peer that stopped reading
/// must not keep its connection slot.
async fn last_word(stream: &mut TcpStream, reply: &[u8]) -> Result<(), ()> {
    match tokio::time::timeout(LAST_WORD, stream.write_all(reply)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

struct Session<'a> {
    shared: &'a Shared,
    stream: TcpStream,
    /// The peer's address as budgets count it.
    address: IpAddr,
    buf: Vec<u8>,
    helo: bool,
    mail: bool,
    /// The mail's envelope sender is null (`MAIL FROM:<>`): a bounce or another report.
    null_sender: bool,
    /// The channels the mail is for, by recipient.
    rcpts: Vec<ChannelId>,
    errors: u32,
}

enum Line {
    Ok(String),
    TooLong,
}

impl Session<'_> {
    /// Writes a reply within the time of a command: a peer that does not read it is
    /// dropped then, not held to the end of its session (with a `DATA` slot, after a mail).
    async fn say(&mut self, reply: &str) -> Result<(), String> {
        let line = [reply.as_bytes(), b"\r\n"].concat();
        match tokio::time::timeout(self.shared.limits.command_timeout, self.stream.write_all(&line)).await {
            Ok(written) => written.map_err(|e| e.to_string()),
            Err(_) => Err("the peer did not read a reply".into()),
        }
    }

    /// Reads more bytes into the buffer within `until`; false at the end of the stream.
    async fn fill(&mut self, until: tokio::time::Instant) -> Result<bool, String> {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(until, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timeout".into()),
        }
    }

    async fn command_line(&mut self) -> Result<Option<Line>, String> {
        let until = tokio::time::Instant::now() + self.shared.limits.command_timeout;
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                if line.len() > MAX_COMMAND_LINE {
                    return Ok(Some(Line::TooLong));
                }
                return Ok(Some(Line::Ok(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned())));
            }
            if self.buf.len() > MAX_COMMAND_LINE {
                // Discard up to the line's end, then say so.
                self.buf.clear();
                loop {
                    if !self.fill(until).await? {
                        return Ok(None);
                    }
                    if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                        self.buf.drain(..=at);
                        return Ok(Some(Line::TooLong));
                    }
                    self.buf.clear();
                }
            }
            match self.fill(until).await {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) if e == "timeout" => {
                    let _ = last_word(&mut self.stream, b"421 4.4.2 Timeout, closing\r\n").await;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run(&mut self) -> Result<(), String> {
        self.say("220 switchboard ESMTP ready").await?;
        loop {
            let line = match self.command_line().await? {
                None => return Ok(()),
                Some(Line::TooLong) => {
                    self.refuse("500 5.5.2 Line too long").await?;
                    continue;
                }
                Some(Line::Ok(line)) => line,
            };
            let (verb, arg) = match line.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_owned()),
                None => (line.trim().to_ascii_uppercase(), String::new()),
            };
            match verb.as_str() {
                "EHLO" => {
                    self.reset();
                    self.helo = true;
                    let size = self.shared.limits.max_message_bytes;
                    self.say(&format!("250-switchboard\r\n250-SIZE {size}\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")).await?;
                }
                "HELO" => {
                    self.reset();
                    self.helo = true;
                    self.say("250 switchboard").await?;
                }
                "MAIL" => self.mail_from(&arg).await?,
                "RCPT" => self.rcpt_to(&arg).await?,
                "DATA" => self.data().await?,
                "RSET" => {
                    self.reset();
                    self.say("250 2.0.0 OK").await?;
                }
                "NOOP" => self.say("250 2.0.0 OK").await?,
                "VRFY" => self.say("252 2.5.0 Cannot verify, send the mail").await?,
                "QUIT" => {
                    self.say("221 2.0.0 Bye").await?;
                    return Ok(());
                }
                "STARTTLS" | "AUTH" => self.refuse("502 5.5.1 Not offered here").await?,
                _ => self.refuse("500 5.5.1 Unknown command").await?,
            }
        }
    }

    fn reset(&mut self) {
        self.mail = false;
        self.null_sender = false;
        self.rcpts.clear();
    }

    /// A refusal that counts towards closing the connection.
    async fn refuse(&mut self, reply: &str) -> Result<(), String> {
        self.errors += 1;
        if self.errors > MAX_ERRORS {
            let _ = last_word(&mut self.stream, b"421 4.7.0 Too many errors, closing\r\n").await;
            return Err("too many errors".into());
        }
        self.say(reply).await
    }

    async fn mail_from(&mut self, arg: &str) -> Result<(), String> {
        if !self.helo {
            return self.refuse("503 5.5.1 Say EHLO first").await;
        }
        if self.mail {
            return self.refuse("503 5.5.1 A mail is already started").await;
        }
        let upper = arg.to_ascii_uppercase();
        if !upper.starts_with("FROM:") {
            return self.refuse("501 5.5.4 Syntax: MAIL FROM:<address>").await;
        }
        let declared = upper.split_whitespace().find_map(|p| p.strip_prefix("SIZE=")).and_then(|n| n.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.shared.limits.max_message_bytes) {
            return self.refuse("552 5.3.4 The mail is larger than this server takes").await;
        }
        self.mail = true;
        self.null_sender = arg[5..].trim_start().starts_with("<>");
        self.say("250 2.1.0 OK").await
    }

    async fn rcpt_to(&mut self, arg: &str) -> Result<(), String> {
        if !self.mail {
            return self.refuse("503 5.5.1 Say MAIL first").await;
        }
        if self.rcpts.len() >= self.shared.limits.max_recipients {
            return self.say("452 4.5.3 Too many recipients").await;
        }
        let Some(address) = arg.get(..3).filter(|p| p.eq_ignore_ascii_case("to:")).and_then(|_| path(&arg[3..])) else {
            return self.refuse("501 5.5.4 Syntax: RCPT TO:<address>").await;
        };
        let address = address.to_ascii_lowercase();
        let channel = {
            let shard = self.shared.gw.backend.directory_shard();
            let state = shard.read();
            state.channel_adapters.iter().find(|(_, a)| matches!(a, AdapterConfig::Email { address: ours, .. } if *ours == address)).map(|(c, _)| c.clone())
        };
        match channel {
            Some(channel) => {
                if !self.rcpts.contains(&channel) {
                    self.rcpts.push(channel);
                }
                self.say("250 2.1.5 OK").await
            }
            None => self.refuse("550 5.1.1 No such mailbox here").await,
        }
    }

    async fn data(&mut self) -> Result<(), String> {
        if self.rcpts.is_empty() {
            return self.refuse("503 5.5.1 Say RCPT first").await;
        }
        // One address holds at most `data_per_address` of the turns, so one slow sender
        // cannot hold the listener's every turn: past that its mail waits for one of its
        // own to end, within the command timeout, as any mail waits for a turn.
        let waited_until = tokio::time::Instant::now() + self.shared.limits.command_timeout;
        let _in_data = loop {
            let left = self.shared.data_left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let taken = {
                let mut map = self.shared.data_by_address.lock().unwrap_or_else(|p| p.into_inner());
                let n = map.entry(self.address).or_default();
                if *n >= self.shared.limits.data_per_address {
                    false
                } else {
                    *n += 1;
                    true
                }
            };
            if taken {
                break InData(self.shared, self.address);
            }
            if tokio::time::timeout_at(waited_until, left).await.is_err() {
                return self.say("451 4.3.2 Too many mails from your address at once, try again later").await;
            }
        };
        // Mails read at once are bounded; a peer past that waits its turn, within the
        // command timeout.
        let slot = match tokio::time::timeout(self.shared.limits.command_timeout, self.shared.data.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => return self.say("451 4.3.2 Busy, try again later").await,
        };
        self.say("354 End data with <CR><LF>.<CR><LF>").await?;
        let raw = match self.read_data().await? {
            Data::Mail(raw) => raw,
            refused @ (Data::TooLarge | Data::BareLineFeed) => {
                self.buf.shrink_to(MAX_COMMAND_LINE * 16);
                self.reset();
                return self.say(match refused {
                    Data::TooLarge => "552 5.3.4 The mail is larger than this server takes",
                    _ => "554 5.6.0 A line of the mail ended in a bare LF, which SMTP does not allow (RFC 5321 2.3.8): not taken",
                })
                .await;
            }
            Data::EndedByBareLineFeed => {
                // Where the sender meant its mail to end, and what it sends next, cannot
                // be told apart from a second mail hidden in it: the session ends.
                let _ = self.say("554 5.6.0 The mail ended in a bare LF (<LF>.<LF>), which SMTP does not allow (RFC 5321 2.3.8): not taken, closing").await;
                return Err("a mail ended by a bare LF".into());
            }
        };
        // What a long line made the buffer hold is given back with the mail's slot.
        self.buf.shrink_to(MAX_COMMAND_LINE * 16);
        let channels = std::mem::take(&mut self.rcpts);
        let null_sender = self.null_sender;
        self.reset();
        let reply = take_mail(&self.shared.gw, &channels, raw, null_sender).await;
        drop(slot);
        self.say(&reply).await
    }

    /// The mail up to the lone `.` line, unstuffed. Only `.` between two CRLFs ends it
    /// (RFC 5321 4.1.1.4): a `.` line ended by a bare LF is the mail's content, so a
    /// sender cannot end a mail where the mail server in front of this listener, which
    /// checked it, did not (SMTP smuggling). A mail larger than the limit, or with a line
    /// ended by a bare LF, is read to its end and dropped, so the session stays in step.
    async fn read_data(&mut self) -> Result<Data, String> {
        let until = tokio::time::Instant::now() + self.shared.limits.data_timeout;
        let max = self.shared.limits.max_message_bytes;
        let mut mail = Vec::new();
        let mut too_large = false;
        let mut bare_line_feed = false;
        // Whether the line before ended in CRLF (the DATA command's line did).
        let mut after_crlf = true;
        // Dropped bytes of a mail past the limit: past twice the limit the peer is not
        // sending a mail that happens to be large, and the connection is closed.
        let mut dropped = 0usize;
        // Each byte is looked at once: lines are taken from `start`, the search for the
        // next line's end goes on from `scanned`, and what was taken leaves the buffer
        // once per read.
        let (mut start, mut scanned) = (0usize, 0usize);
        loop {
            while let Some(found) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + found + 1;
                let line = &self.buf[start..end];
                let crlf = line.ends_with(b"\r\n");
                if line == b".\n" {
                    return Ok(Data::EndedByBareLineFeed);
                }
                if after_crlf && line == b".\r\n" {
                    self.buf.drain(..end);
                    return Ok(if too_large {
                        Data::TooLarge
                    } else if bare_line_feed {
                        Data::BareLineFeed
                    } else {
                        Data::Mail(mail)
                    });
                }
                after_crlf = crlf;
                bare_line_feed |= !crlf;
                let bare = line.strip_suffix(b"\n").map(|l| l.strip_suffix(b"\r").unwrap_or(l)).unwrap_or(line);
                if too_large {
                    dropped += line.len();
                } else {
                    let unstuffed = bare.strip_prefix(b".").unwrap_or(bare);
                    if mail.len() + unstuffed.len() + 2 > max {
                        too_large = true;
                        dropped += mail.len() + line.len();
                        mail = Vec::new();
                    } else {
                        mail.extend_from_slice(unstuffed);
                        mail.extend_from_slice(b"\r\n");
                    }
                }
                start = end;
                scanned = end;
            }
            scanned = self.buf.len();
            if start > 0 {
                self.buf.drain(..start);
                scanned -= start;
                start = 0;
            }
            // A line with no end yet: bounded by what a mail may be.
            if self.buf.len() > max {
                too_large = true;
                dropped += mail.len() + self.buf.len();
                mail = Vec::new();
                self.buf = Vec::new();
                scanned = 0;
                // What comes next ends that line: it does not begin one.
                after_crlf = false;
            }
            if dropped > 2 * max {
                let _ = self.say("552 5.3.4 The mail is far larger than this server takes, closing").await;
                return Err("a mail far past the limit".into());
            }
            match self.fill(until).await {
                Ok(true) => {}
                Ok(false) => return Err("the peer closed during DATA".into()),
                Err(e) => {
                    let _ = last_word(&mut self.stream, b"421 4.4.2 Timeout during DATA, closing\r\n").await;
                    return Err(e);
                }
            }
        }
    }
}

/// What a DATA phase read.
enum Data {
    /// The mail, unstuffed, its lines ended in CRLF.
    Mail(Vec<u8>),
    /// Larger than the listener takes (read to its end and dropped).
    TooLarge,
    /// A line ended in a bare LF (read to its end and dropped).
    BareLineFeed,
    /// A lone `.` line ended by a bare LF: the sender ends its mails so, and the rest
    /// of its session cannot be read safely.
    EndedByBareLineFeed,
}

/// The address in `<…>` (parameters after it ignored); `<>` is none.
fn path(arg: &str) -> Option<String> {
    let arg = arg.trim();
    let inner = arg.strip_prefix('<')?.split('>').next()?;
    // A source route (`<@a,@b:user@c>`) names the mailbox after its colon.
    let mailbox = inner.rsplit(':').next()?;
    switchboard_actors::core::is_email_address(&mailbox.to_ascii_lowercase()).then(|| mailbox.to_owned())
}

/// The subcommand of the node's binary that reads one mail ([`email::read_one_mail`]).
pub const READ_MAIL_COMMAND: &str = "read-mail";

/// Time a process reading one mail may take, start to end, before it is stopped and
/// the mail deferred (`451`): a node too busy to give it its CPU time. The mail itself
/// is refused (`550`) when the kernel stops the process, past
/// [`email::READER_CPU_SECONDS`] of CPU or [`email::READER_ADDRESS_SPACE`] of memory.
pub const MAIL_READ_TIME: Duration = Duration::from_secs(30);

static MAIL_READER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Has every mail read by a process of its own: `exe READ_MAIL_COMMAND` (the node's
/// binary), which the kernel stops past its CPU time and memory, and the listener
/// after [`MAIL_READ_TIME`]. A mail nested in an encoded part hides its contents from
/// the counts the parse makes first, and such a mail can hold the parser for minutes:
/// it then costs a process that is stopped, not the node. Without this call (a gateway
/// embedded in a test) mails are parsed on a thread of the node.
pub fn read_mails_in_processes(exe: std::path::PathBuf) {
    let _ = MAIL_READER.set(exe);
}

const READ_AGAIN: &str = "451 4.3.0 Could not read the mail, try again";

/// Reads one mail in a process of its own: the mail, or the SMTP reply that refuses it.
async fn read_in_process(exe: &std::path::Path, raw: Vec<u8>) -> Result<email::Mail, String> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = tokio::process::Command::new(exe)
        .arg(READ_MAIL_COMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            tracing::error!(error = %e, exe = %exe.display(), "no process could be started to read a mail");
            READ_AGAIN.to_string()
        })?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(READ_AGAIN.into());
    };
    let read = async {
        let write = async move {
            // A reader that stops reading early (it failed) closes the pipe: its
            // status below says why.
            let _ = stdin.write_all(&raw).await;
        };
        let mut out = Vec::new();
        let mut bounded = (&mut stdout).take(email::MAX_READ_BYTES + 1024 * 1024);
        let (_, got) = tokio::join!(write, bounded.read_to_end(&mut out));
        let status = child.wait().await;
        (got.map(|_| out), status)
    };
    let Ok((out, status)) = tokio::time::timeout(MAIL_READ_TIME, read).await else {
        tracing::warn!("a mail was not read within {} s (the node is busy); deferred", MAIL_READ_TIME.as_secs());
        return Err(READ_AGAIN.into());
    };
    let status = status.map_err(|e| {
        tracing::warn!(error = %e, "the process reading a mail could not be waited for");
        READ_AGAIN.to_string()
    })?;
    if let Some(signal) = status.signal() {
        // Stopped by the kernel: past its CPU time (SIGXCPU, then SIGKILL) or its
        // memory (an allocation that failed aborts it).
        tracing::warn!(signal, "the process reading a mail was stopped past its limits; refused");
        return Err(format!(
            "550 5.6.0 The mail takes more than {} s of CPU or {} MiB of memory to read (a message forwarded inside it, encoded?); send it again without it",
            email::READER_CPU_SECONDS,
            email::READER_ADDRESS_SPACE / (1024 * 1024)
        ));
    }
    match out.map_err(|e| e.to_string()).and_then(|out| email::read_outcome(&out)) {
        Ok(Ok(mail)) if status.success() => Ok(mail),
        Ok(Err(why)) if status.success() => Err(format!("550 5.6.0 {why}")),
        outcome => {
            tracing::warn!(?status, error = ?outcome.err(), "the process reading a mail ended without an outcome; deferred");
            Err(READ_AGAIN.into())
        }
    }
}

/// Commits a mail to each channel it is for and says how it went, as an SMTP reply.
async fn take_mail(gw: &Arc<Gateway>, channels: &[ChannelId], raw: Vec<u8>, null_sender: bool) -> String {
    // One mail parsed at a time on a node: a parse holds the parser's parts as well as
    // the mail (a part of a mail nested in an encoded part hides its delimiters from
    // the count `email::parse` makes first).
    static PARSING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(parsing) = PARSING.acquire().await else {
        return READ_AGAIN.into();
    };
    let mut parsed = if let Some(exe) = MAIL_READER.get() {
        let read = read_in_process(exe, raw).await;
        drop(parsing);
        match read {
            Ok(mail) => mail,
            Err(reply) => return reply,
        }
    } else {
        // Held by the parse itself (also when the session ends meanwhile), and only by it.
        match tokio::task::spawn_blocking(move || {
            let parsed = email::parse(&raw);
            drop(parsing);
            parsed
        })
        .await
        {
            Ok(Ok(mail)) => mail,
            Ok(Err(e)) => return format!("550 5.6.0 {e}"),
            Err(_) => return "451 4.3.0 Could not read the mail, try again".into(),
        }
    };
    parsed.automatic |= null_sender;
    let mut conversations = Vec::new();
    // Taken by a channel without a conversation to name (an automatic mail dropped).
    let mut taken_without = 0;
    let mut refusals: Vec<String> = Vec::new();
    for channel in channels {
        match take_for(gw, channel, &parsed).await {
            Ok(Some(conversation)) => conversations.push(conversation.to_string()),
            Ok(None) => taken_without += 1,
            Err(reply) => {
                tracing::info!(%channel, %reply, "a mail was not taken by one of the channels it is for");
                refusals.push(reply);
            }
        }
    }
    // Not taken for now by one channel: sent again, the channels that took it find it
    // by its Message-ID and write nothing twice.
    if let Some(again) = refusals.iter().find(|r| r.starts_with('4')) {
        return again.clone();
    }
    // Taken by some, refused for good by others: taken (a bounce would tell the
    // customer it was lost, and a resend would write it twice).
    match (conversations.is_empty(), refusals.into_iter().next()) {
        (true, Some(refused)) if taken_without == 0 => refused,
        (true, _) if parsed.automatic => "250 2.0.0 Taken; an automatic mail starts no conversation".into(),
        (true, _) => "250 2.0.0 Taken".into(),
        _ => format!("250 2.0.0 Taken in conversation {}", conversations.join(", ")),
    }
}

/// A mail as one channel's inbound message: its text (with what could not be kept
/// named in it), its files, the conversation it answers and, for a new conversation,
/// its subject and Message-ID as attributes.
/// Unicode format characters (bidi overrides and isolates, zero-width ones): they could
/// make a name shown to staff read as something else.
fn is_format_char(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// The conversation the mail went to; `None` for an automatic mail dropped, or for a
/// mail taken before.
async fn take_for(gw: &Gateway, channel: &ChannelId, mail: &email::Mail) -> Result<Option<u64>, String> {
    match take_in(gw, channel, mail, true).await {
        // The thread it names closed after it was read (routing rules 24): the mail is
        // its sender's own, and goes where their mail goes.
        Err(reply) if reply == THREAD_CLOSED => take_in(gw, channel, mail, false).await,
        taken => taken,
    }
}

/// What [`take_in`] answers when the conversation shard of the thread a mail names
/// refused it because that conversation closed after the gateway read it open; only
/// when it followed the thread, so the mail is taken again without it. (A `4xx`, should
/// it ever reach the sending server: try again.)
const THREAD_CLOSED: &str = "451 4.3.0 The conversation the mail answers just closed, try again";

/// [`take_for`]; `follow_thread: false` places the mail by its sender alone.
async fn take_in(gw: &Gateway, channel: &ChannelId, mail: &email::Mail, follow_thread: bool) -> Result<Option<u64>, String> {
    let Some(AdapterConfig::Email { thread_secret, .. }) = gw.backend.directory_shard().read().channel_adapters.get(channel).cloned() else {
        return Err("451 4.3.0 The channel changed, try again".into());
    };
    // Sent again after its `250` was lost: taken already, on whichever shard took it. On
    // a split cluster a reply in a thread was taken on the thread's shard, and if that
    // conversation closed since, the mail would now go to its sender's shard, which has
    // no record of it, and be written twice. A read that fails leaves it to the commit.
    let seen_key = switchboard_actors::core::inbound_key(channel, &mail.from, &mail.message_id);
    if gw.inbound_seen_anywhere(channel, &mail.from, &seen_key).await {
        return Ok(None);
    }
    let mut text = if mail.text.trim().is_empty() { mail.subject.clone() } else { mail.text.clone() };
    let mut files = Vec::new();
    let mut not_kept = Vec::new();
    let mut kept: Vec<(String, String, &[u8])> = Vec::new();
    for file in &mail.files {
        let why = if !ALLOWED_TYPES.contains(&file.content_type.as_str()) {
            Some("this type is not taken")
        } else if file.bytes.len() > MAX_ATTACHMENT_BYTES {
            Some("larger than a file may be")
        } else if file.bytes.is_empty() || !bytes_match_type(&file.content_type, &file.bytes) {
            Some("its content is not of its type")
        } else if kept.len() >= MAX_ATTACHMENTS_PER_MESSAGE {
            Some("too many files in one mail")
        } else {
            None
        };
        match why {
            Some(why) => not_kept.push(format!("[file not kept: {} ({}), {why}]", safe_name(&file.name, &file.content_type), file.content_type.chars().take(80).collect::<String>())),
            None => kept.push((safe_name(&file.name, &file.content_type), file.content_type.clone(), &file.bytes)),
        }
    }
    let mut thread = if follow_thread { email::thread_of(&mail.references, &thread_secret) } else { None };
    // Refused at commit: store nothing (nor the long text's file below), so no copy
    // outlives the refusal.
    let blocked = crate::attachments::sender_blocked(gw, channel, &mail.from);
    if blocked {
        kept.clear();
    }
    // A reply in a thread that is closed (or of another channel) is the sender's own
    // mail: it goes where the sender's mail goes, as a mail without the thread would.
    // On a split cluster the thread's shard is not the sender's, and there it would
    // start a second conversation of that sender.
    // A read that fails leaves the thread to the core, which decides as it always did.
    // Whether the thread's conversation is another sender's (a colleague in copy, the
    // customer's other address): the message then says who wrote it, since staff read
    // every customer message as the conversation's visitor's.
    let mut another_sender = false;
    let answered = match thread {
        Some(conversation) => match gw.backend.conversation_reads(conversation).open_conversation(conversation).await {
            Ok(Some(c)) => {
                another_sender = c.visitor.id.as_deref() != Some(format!("{channel}:{}", mail.from).as_str());
                &c.channel == channel && c.status != switchboard_actors::state::ConversationStatus::Closed
            }
            Ok(None) => false,
            Err(_) => true,
        },
        None => false,
    };
    // The name without what could end the line or pass for another address (control,
    // format and separator characters, brackets), at most 60 characters.
    let from_line = (answered && another_sender).then(|| {
        let name: String = mail.from_name.chars().filter(|c| !c.is_control() && !matches!(c, '<' | '>' | '[' | ']' | '\u{2028}' | '\u{2029}') && !is_format_char(*c)).take(60).collect();
        let name = name.trim();
        if name.is_empty() { format!("[from <{}>]", mail.from) } else { format!("[from {name} <{}>]", mail.from) }
    });
    if !answered {
        thread = None;
        // A machine's mail (an out-of-office, a bounce) that answers no open
        // conversation starts none: the conversation's automatic answers (after hours,
        // a greeting) would go back to it, and its answer to them start another.
        if mail.automatic {
            gw.metrics.automatic_mail_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(%channel, "an automatic mail answering no open conversation was dropped");
            return Ok(None);
        }
    }
    // Text over the core's limit goes whole into a file, the message shows its start.
    let note_room = not_kept.iter().map(|l| l.chars().count() + 1).sum::<usize>().min(1000);
    let from_room = from_line.as_ref().map_or(0, |l| l.chars().count() + 1);
    let room = MAX_TEXT_CHARS - 100 - note_room - from_room;
    let long_text;
    if text.chars().count() > room && !blocked {
        // The whole text, up to what a file may be.
        let mut end = text.len().min(MAX_ATTACHMENT_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        long_text = text[..end].as_bytes().to_vec();
        text = format!("{}…\n[the whole text is in message.txt]", text.chars().take(room).collect::<String>());
        if kept.len() >= MAX_ATTACHMENTS_PER_MESSAGE {
            kept.pop();
            not_kept.push("[file not kept: too many files in one mail]".into());
        }
        kept.push(("message.txt".into(), "text/plain".into(), &long_text));
    }
    // A reply to an open conversation of this channel with no room for these files:
    // the message is taken without them, and says so. Stored first, they would be
    // copied to other members and then refused at commit with the whole mail, and the
    // copies would stay behind.
    if let (Some(conversation), false) = (thread, kept.is_empty()) {
        let reads = gw.backend.conversation_reads(conversation);
        let bytes: u64 = kept.iter().map(|(_, _, b)| b.len() as u64).sum();
        if matches!(reads.attachment_room(conversation, kept.len(), bytes).await, Err(switchboard_actors::Error::Invalid(_))) {
            for (name, content_type, _) in kept.drain(..) {
                not_kept.push(format!("[file not kept: {name} ({}), the conversation has no room for more files]", content_type.chars().take(80).collect::<String>()));
            }
        }
    }
    if let Some(line) = from_line {
        text = format!("{line}\n{text}");
    }
    for line in not_kept.iter().take(10) {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(line);
    }
    // Whatever the lines came to, the message fits what the core takes.
    if text.chars().count() > MAX_TEXT_CHARS {
        text = text.chars().take(MAX_TEXT_CHARS).collect();
    }
    if text.trim().is_empty() && kept.is_empty() {
        text = "(an empty mail)".into();
    }
    // Named by the mail as the core keys it (its sender and Message-ID) and its place.
    let key = switchboard_actors::core::inbound_key(channel, &mail.from, &mail.message_id);
    // A reply in a thread is decided by its conversation's shard; a new mail by the one
    // its sender hashes to. Its files go to that shard's holders.
    let owner = match thread {
        Some(conversation) => crate::attachments::FileOwner::Conversation(conversation),
        None => crate::attachments::FileOwner::Sender { channel: channel.clone(), sender: mail.from.clone() },
    };
    for (i, (name, content_type, bytes)) in kept.into_iter().enumerate() {
        match keep_inbound_file(gw, &owner, &key, i, name, content_type, bytes).await {
            Ok(file) => files.push(file),
            Err(e) => {
                tracing::warn!(error = %e, "a mail's file could not be stored");
                return Err("451 4.3.0 Could not store a file, try again".into());
            }
        }
    }
    let mut attributes = vec![(email::ATTR_SUBJECT.to_owned(), mail.subject.clone())];
    if !mail.message_id.starts_with("sha256:") {
        attributes.push((email::ATTR_MESSAGE_ID.to_owned(), mail.message_id.clone()));
    }
    let command = Command::ChannelInboundRich {
        channel: channel.clone(),
        sender: mail.from.clone(),
        sender_name: {
            let mut end = mail.from_name.len().min(switchboard_actors::core::MAX_SENDER_BYTES);
            while !mail.from_name.is_char_boundary(end) {
                end -= 1;
            }
            mail.from_name[..end].to_owned()
        },
        provider_message_id: mail.message_id.clone(),
        text,
        files,
        thread,
        attributes,
    };
    let stored = match &command {
        Command::ChannelInboundRich { files, .. } => files.clone(),
        _ => Vec::new(),
    };
    // Its Message-ID makes a second copy harmless: sent again through a failover
    // before the sending server is asked to try later.
    match gw.submit_keyed(command).await {
        Ok(Reply::Inbound { conversation, .. }) => Ok(Some(conversation.0)),
        Ok(_) => Ok(None),
        // Not decided (a commit, actor, storage or unreachable member failed): again.
        Err(e) if !e.is_refusal() => {
            tracing::warn!(%channel, error = %e, "a mail could not be committed; the sender is asked to retry");
            Err("451 4.3.0 Not committed, try again later".into())
        }
        // Routing rules 24: the thread's shard found it closed, and the sender's mail
        // goes to another shard; nothing was written.
        Err(switchboard_actors::Error::Closed(c)) if follow_thread && thread == Some(c) => {
            forget_inbound_files(gw, &stored).await;
            Err(THREAD_CLOSED.into())
        }
        Err(e) if crate::channels::settings_not_there_yet(gw, &channel, &e) => {
            tracing::info!(%channel, "a mail came before its channel's settings reached its conversation shard; the sender is asked to retry");
            Err("451 4.3.0 Not committed, try again later".into())
        }
        Err(switchboard_actors::Error::Blocked(_)) => {
            forget_inbound_files(gw, &stored).await;
            Err("550 5.7.1 The sender is blocked".into())
        }
        Err(e) => {
            forget_inbound_files(gw, &stored).await;
            tracing::info!(%channel, error = %e, "a mail was refused");
            Err(format!("554 5.6.0 {}", e.to_string().replace(['\r', '\n'], " ").chars().take(200).collect::<String>()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_read_with_parameters_and_source_routes() {
        assert_eq!(path("<Support@Example.com> SIZE=100").as_deref(), Some("Support@Example.com"));
        assert_eq!(path("<@relay.example:support@example.com>").as_deref(), Some("support@example.com"));
        assert_eq!(path("<>"), None);
        assert_eq!(path("support@example.com"), None);
    }
}
