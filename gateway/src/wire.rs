//! The WebSocket frame codec of the server side (RFC 6455 §5), without I/O.
//!
//! Bytes go in, whole messages and control frames come out. Every rule is checked on a
//! frame's header, before its payload is buffered: a message whose fragments together
//! pass the size limit is refused the moment the header that would pass it arrives, so
//! a peer can make the gateway hold at most one message's worth of bytes (plus one
//! read) whatever it sends.
//!
//! fastwebsockets still does the upgrade handshake; its reader is not used because its
//! fragment collector checks the limit only per frame and when a message completes,
//! and it accepts unmasked client frames.
//!
//! Left out: extensions (permessage-deflate is never negotiated, so RSV bits are always
//! a violation).

use bytes::{Buf, BytesMut};

/// Close codes for what a peer did wrong.
pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const TOO_BIG: u16 = 1009;

/// The largest payload of a control frame (§5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Frames one message may come in. Fragments cost no rate-limit token until their
/// message completes, so without a cap empty fragments would be free.
pub const MAX_FRAGMENTS: usize = 64;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// What a complete frame or message means to the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The peer's close frame: its code (none if the payload was empty) and reason.
    Close(Option<u16>, String),
}

/// Why the connection must close, with the close code to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

fn protocol(reason: &'static str) -> Violation {
    Violation { code: PROTOCOL_ERROR, reason }
}

/// Decodes client frames, assembling fragmented messages within `max_message` bytes.
pub struct Decoder {
    max_message: usize,
    /// The message being assembled: whether it is text, and its bytes so far.
    partial: Option<(bool, Vec<u8>)>,
    /// Frames of the message being assembled so far.
    fragments: usize,
    /// Whether frames come from a client (masked, as RFC 6455 requires) or from a
    /// server (unmasked: what a standalone gateway reads from the node it relays to).
    from_client: bool,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Decoder { max_message, partial: None, fragments: 0, from_client: true }
    }

    /// A decoder of a server's frames (unmasked), for the client side of a socket.
    pub fn of_server(max_message: usize) -> Self {
        Decoder { max_message, partial: None, fragments: 0, from_client: false }
    }

    /// Bytes of a message being assembled (what a peer currently makes us hold).
    pub fn pending_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, bytes)| bytes.len())
    }

    /// Takes the next complete frame off the front of `buf`. `Ok(None)` means more bytes
    /// are needed; `buf` is then left as it was. After an error the decoder is spent.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, Violation> {
        loop {
            let Some(header) = parse_header(buf, self.from_client)? else { return Ok(None) };
            let control = header.opcode >= OP_CLOSE;
            if control {
                if !header.fin {
                    return Err(protocol("fragmented control frame"));
                }
                if header.len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(protocol("control frame over 125 bytes"));
                }
            } else {
                match (header.opcode, &self.partial) {
                    (OP_CONTINUATION, None) => return Err(protocol("continuation frame without a message")),
                    (OP_TEXT | OP_BINARY, Some(_)) => return Err(protocol("new message inside a fragmented one")),
                    _ => {}
                }
                // Checked on the header, before any payload is held.
                if header.len.saturating_add(self.pending_bytes() as u64) > self.max_message as u64 {
                    return Err(Violation { code: TOO_BIG, reason: "message too big" });
                }
            }
            let len = header.len as usize;
            if buf.len() < header.size + len {
                // Make room for the rest of this frame at once: it is within the limit.
                buf.reserve(header.size + len - buf.len());
                return Ok(None);
            }
            buf.advance(header.size);
            let mut payload = buf.split_to(len);
            unmask(&mut payload, header.mask);
            match header.opcode {
                OP_PING => return Ok(Some(Inbound::Ping(payload.to_vec()))),
                OP_PONG => return Ok(Some(Inbound::Pong)),
                OP_CLOSE => return close_frame(&payload).map(Some),
                opcode => {
                    let (text, mut bytes) = match self.partial.take() {
                        Some(partial) => partial,
                        None => (opcode == OP_TEXT, Vec::new()),
                    };
                    bytes.extend_from_slice(&payload);
                    if !header.fin {
                        self.fragments += 1;
                        if self.fragments >= MAX_FRAGMENTS {
                            return Err(Violation { code: TOO_BIG, reason: "message in too many fragments" });
                        }
                        self.partial = Some((text, bytes));
                        continue;
                    }
                    self.fragments = 0;
                    if !text {
                        return Ok(Some(Inbound::Binary(bytes)));
                    }
                    return String::from_utf8(bytes)
                        .map(|s| Some(Inbound::Text(s)))
                        .map_err(|_| Violation { code: INVALID_PAYLOAD, reason: "invalid utf-8" });
                }
            }
        }
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: u64,
    /// Bytes of the header itself.
    size: usize,
}

fn parse_header(buf: &BytesMut, from_client: bool) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(protocol("reserved bits set"));
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(protocol("reserved opcode"));
    }
    if from_client && b1 & 0x80 == 0 {
        return Err(protocol("client frame not masked"));
    }
    if !from_client && b1 & 0x80 != 0 {
        return Err(protocol("server frame masked"));
    }
    let (len, len_bytes) = match b1 & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else { return Ok(None) };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 2)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else { return Ok(None) };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(bytes);
            let len = u64::from_be_bytes(raw);
            if len >> 63 != 0 {
                return Err(protocol("payload length with the top bit set"));
            }
            (len, 8)
        }
        n => (u64::from(n), 0),
    };
    if !from_client {
        let size = 2 + len_bytes;
        return Ok(Some(Header {
            fin: b0 & 0x80 != 0,
            opcode,
            mask: [0; 4],
            len,
            size,
        }));
    }
    let size = 2 + len_bytes + 4;
    let Some(mask) = buf.get(2 + len_bytes..size) else { return Ok(None) };
    Ok(Some(Header { fin: b0 & 0x80 != 0, opcode, mask: [mask[0], mask[1], mask[2], mask[3]], len, size }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Close codes a peer may send (§7.4.1; 1004-1006 and 1015 never go on the wire).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn close_frame(payload: &[u8]) -> Result<Inbound, Violation> {
    match payload.len() {
        0 => Ok(Inbound::Close(None, String::new())),
        1 => Err(protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(protocol("close code not allowed"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| protocol("close reason not utf-8"))?;
            Ok(Inbound::Close(Some(code), reason.to_owned()))
        }
    }
}

/// A server frame (never masked), ready to write.
pub fn encode(opcode: ServerOp, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    encode_into(&mut out, opcode, payload);
    out
}

/// Appends a server frame (never masked) to `out`, after the frames already there.
pub fn encode_into(out: &mut Vec<u8>, opcode: ServerOp, payload: &[u8]) {
    let (header, used) = server_header(opcode, payload.len());
    out.reserve(used + payload.len());
    out.extend_from_slice(&header[..used]);
    out.extend_from_slice(payload);
}

/// The longest header a frame can have.
const MAX_HEADER: usize = 10;

/// The header of an unmasked frame with `len` bytes of payload, and how many of its
/// bytes it uses (2, 4 or 10).
fn server_header(opcode: ServerOp, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut header = [0u8; MAX_HEADER];
    header[0] = 0x80 | opcode as u8;
    let used = match len {
        n if n < 126 => {
            header[1] = n as u8;
            2
        }
        n if n <= usize::from(u16::MAX) => {
            header[1] = 126;
            header[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            10
        }
    };
    (header, used)
}

/// Appends `value` as one text frame to `out`, written straight into it: the payload
/// goes after room for the longest header, and moves back over what the header did
/// not need once its length is known.
pub fn encode_json_into(out: &mut Vec<u8>, value: &serde_json::Value) {
    let start = out.len();
    out.extend_from_slice(&[0u8; MAX_HEADER]);
    if serde_json::to_writer(&mut *out, value).is_err() {
        // Writing a `Value` into memory does not fail; should it, no frame is left half.
        out.truncate(start);
        return;
    }
    let (header, used) = server_header(ServerOp::Text, out.len() - start - MAX_HEADER);
    out.copy_within(start + MAX_HEADER.., start + used);
    out.truncate(out.len() - (MAX_HEADER - used));
    out[start..start + used].copy_from_slice(&header[..used]);
}

/// A client frame (masked with `mask`, as a client must), ready to write.
pub fn encode_masked(opcode: ServerOp, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = encode(opcode, &[]);
    out.truncate(1);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// A close frame with a code and a reason cut to fit a control frame.
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    encode(ServerOp::Close, &close_payload(code, reason))
}

/// The payload of a close frame with `code` and `reason` (cut to fit).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

/// Opcodes the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerOp {
    Text = OP_TEXT,
    Close = OP_CLOSE,
    Ping = OP_PING,
    Pong = OP_PONG,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_json_frame_written_in_place_is_the_frame_of_its_text() {
        // Payload lengths on each side of the two header size steps, after other frames.
        for len in [0usize, 100, 123, 124, 125, 126, 127, 65_533, 65_534, 65_535, 65_536, 70_000] {
            let value = serde_json::Value::String("y".repeat(len.saturating_sub(2)));
            let text = value.to_string();
            let mut before = encode(ServerOp::Ping, b"earlier");
            let expected = [before.clone(), encode(ServerOp::Text, text.as_bytes())].concat();
            encode_json_into(&mut before, &value);
            assert_eq!(before, expected, "a payload of {} bytes", text.len());
        }
    }

    #[test]
    fn what_a_client_encodes_a_server_decodes_and_back() {
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let text = "x".repeat(len);
            let mut buf =
                BytesMut::from(&encode_masked(ServerOp::Text, text.as_bytes(), [1, 2, 3, 4])[..]);
            assert_eq!(
                Decoder::new(1 << 20).decode(&mut buf),
                Ok(Some(Inbound::Text(text.clone()))),
                "client to server, {len} bytes"
            );
            let mut buf = BytesMut::from(&encode(ServerOp::Text, text.as_bytes())[..]);
            assert_eq!(
                Decoder::of_server(1 << 20).decode(&mut buf),
                Ok(Some(Inbound::Text(text))),
                "server to client, {len} bytes"
            );
        }
        let mut masked = BytesMut::from(&encode_masked(ServerOp::Ping, b"", [9, 9, 9, 9])[..]);
        assert_eq!(
            Decoder::of_server(1024)
                .decode(&mut masked)
                .map_err(|v| v.code),
            Err(PROTOCOL_ERROR),
            "a server never masks"
        );
        let mut close = BytesMut::from(
            &encode_masked(
                ServerOp::Close,
                &close_payload(4001, "login changed"),
                [7, 0, 7, 0],
            )[..],
        );
        assert_eq!(
            Decoder::new(1024).decode(&mut close),
            Ok(Some(Inbound::Close(Some(4001), "login changed".into())))
        );
    }

    /// A client frame: `first` is the first header byte (FIN, RSV, opcode).
    fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        let bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(bit | n as u8),
            n if n <= 65535 => {
                out.push(bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Inbound>, Violation> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(event) = decoder.decode(&mut buf)? {
            out.push(event);
        }
        Ok(out)
    }

    fn code_of(bytes: &[u8]) -> u16 {
        decode_all(&mut Decoder::new(1024), bytes).expect_err("must be refused").code
    }

    #[test]
    fn fragments_assemble_into_one_message() {
        let mut bytes = frame(OP_TEXT, b"hel", true);
        bytes.extend(frame(0x80 | OP_PING, b"p", true));
        bytes.extend(frame(0x80 | OP_CONTINUATION, "lo ✓".as_bytes(), true));
        let events = decode_all(&mut Decoder::new(1024), &bytes).unwrap();
        assert_eq!(events, vec![Inbound::Ping(b"p".to_vec()), Inbound::Text("hello ✓".into())]);
    }

    #[test]
    fn fragments_count_against_the_limit_on_their_headers() {
        let mut decoder = Decoder::new(100);
        let mut buf = BytesMut::from(&frame(OP_TEXT, &[b'a'; 60], true)[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(decoder.pending_bytes(), 60);
        // Only the header of the next fragment has arrived: refused already.
        let next = frame(OP_CONTINUATION, &[b'a'; 60], true);
        buf.extend_from_slice(&next[..6]);
        assert_eq!(decoder.decode(&mut buf).unwrap_err().code, TOO_BIG);
    }

    #[test]
    fn empty_fragments_are_capped() {
        let mut bytes = frame(OP_TEXT, b"", true);
        for _ in 0..MAX_FRAGMENTS {
            bytes.extend(frame(OP_CONTINUATION, b"", true));
        }
        assert_eq!(code_of(&bytes), TOO_BIG);
        let mut fine = frame(OP_TEXT, b"a", true);
        for _ in 0..MAX_FRAGMENTS - 2 {
            fine.extend(frame(OP_CONTINUATION, b"", true));
        }
        fine.extend(frame(0x80 | OP_CONTINUATION, b"b", true));
        assert_eq!(decode_all(&mut Decoder::new(1024), &fine).unwrap(), vec![Inbound::Text("ab".into())]);
    }

    #[test]
    fn a_frame_that_declares_too_much_is_refused_before_its_payload() {
        let mut header = vec![0x80 | OP_TEXT, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[0; 4]);
        assert_eq!(code_of(&header), TOO_BIG);
    }

    #[test]
    fn protocol_violations_close_with_1002() {
        assert_eq!(code_of(&frame(0x80 | OP_CONTINUATION, b"x", true)), PROTOCOL_ERROR, "stray continuation");
        assert_eq!(code_of(&frame(OP_PING, b"x", true)), PROTOCOL_ERROR, "fragmented ping");
        assert_eq!(code_of(&frame(0x80 | OP_PING, &[0; 126], true)), PROTOCOL_ERROR, "oversized ping");
        assert_eq!(code_of(&frame(0x83, b"x", true)), PROTOCOL_ERROR, "reserved opcode");
        assert_eq!(code_of(&frame(0x80 | 0x40 | OP_TEXT, b"x", true)), PROTOCOL_ERROR, "RSV1");
        assert_eq!(code_of(&frame(0x80 | OP_TEXT, b"x", false)), PROTOCOL_ERROR, "unmasked");
        let mut nested = frame(OP_TEXT, b"a", true);
        nested.extend(frame(0x80 | OP_TEXT, b"b", true));
        assert_eq!(code_of(&nested), PROTOCOL_ERROR, "new message inside a fragmented one");
        assert_eq!(code_of(&frame(0x80 | OP_CLOSE, &[3], true)), PROTOCOL_ERROR, "1-byte close");
        assert_eq!(code_of(&frame(0x80 | OP_CLOSE, &1005u16.to_be_bytes(), true)), PROTOCOL_ERROR, "close 1005");
    }

    #[test]
    fn text_must_be_utf8_and_close_frames_carry_their_code() {
        assert_eq!(code_of(&frame(0x80 | OP_TEXT, &[0xFF, 0xFE], true)), INVALID_PAYLOAD);
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let events = decode_all(&mut Decoder::new(16), &frame(0x80 | OP_CLOSE, &payload, true)).unwrap();
        assert_eq!(events, vec![Inbound::Close(Some(1000), "bye".into())]);
    }

    #[test]
    fn server_frames_encode_every_length_form() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let encoded = encode(ServerOp::Text, &vec![b'x'; len]);
            let header = match len {
                n if n < 126 => 2,
                n if n <= 65535 => 4,
                _ => 10,
            };
            assert_eq!(encoded.len(), header + len);
            assert_eq!(encoded[0], 0x81);
        }
        let close = encode_close(1009, &"é".repeat(200));
        assert!(close.len() <= 2 + 125);
        assert!(std::str::from_utf8(&close[4..]).is_ok(), "the reason is cut on a character boundary");
    }

    proptest! {
        /// Whatever a peer sends, decoding never panics and never holds more than one
        /// message's worth of bytes.
        #[test]
        fn arbitrary_bytes_are_decoded_within_the_limit(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32)) {
            let mut decoder = Decoder::new(256);
            let mut buf = BytesMut::new();
            'feed: for chunk in chunks {
                buf.extend_from_slice(&chunk);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(Inbound::Text(t))) => prop_assert!(t.len() <= 256),
                        Ok(Some(Inbound::Binary(b))) => prop_assert!(b.len() <= 256),
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(v) => {
                            prop_assert!([PROTOCOL_ERROR, INVALID_PAYLOAD, TOO_BIG].contains(&v.code));
                            break 'feed;
                        }
                    }
                }
                prop_assert!(decoder.pending_bytes() <= 256);
            }
        }

        /// Valid fragmented messages, split at arbitrary points, come out whole.
        #[test]
        fn split_fragments_round_trip(text in "[a-zé✓ ]{0,200}", cuts in proptest::collection::vec(0usize..400, 0..6)) {
            let bytes = text.as_bytes();
            let middle = bytes.len() / 2;
            let mut wire = frame(OP_BINARY, &bytes[..middle], true);
            wire.extend(frame(0x80 | OP_CONTINUATION, &bytes[middle..], true));
            let mut decoder = Decoder::new(1024);
            let mut buf = BytesMut::new();
            let mut events = Vec::new();
            let mut at = 0;
            let mut cuts = cuts;
            cuts.sort_unstable();
            for cut in cuts.into_iter().chain([wire.len()]) {
                let cut = cut.min(wire.len()).max(at);
                buf.extend_from_slice(&wire[at..cut]);
                at = cut;
                while let Some(event) = decoder.decode(&mut buf).unwrap() {
                    events.push(event);
                }
            }
            prop_assert_eq!(events, vec![Inbound::Binary(bytes.to_vec())]);
        }
    }
}
