//! A small HTTP/1.1 client for providers' send endpoints: keep-alive connections pooled
//! per origin, TLS through rustls with the `ring` provider and the Mozilla roots
//! (webpki-roots, compiled in), a deadline on every request and a cap on what a
//! response body may make us hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::AdapterError;

/// Largest provider answer read; a bigger one is a failed attempt.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Idle connections kept per origin.
const IDLE_PER_ORIGIN: usize = 64;

/// Why [`read_whole`] gave up on a body.
#[derive(Debug)]
pub enum WholeError<E> {
    /// More than the `max` bytes it was given.
    TooLong,
    /// The body's own error (for one wrapped in a length limit, its limit too).
    Body(E),
}

/// Reads `body` to its end into one buffer and returns it, or [`WholeError::TooLong`]
/// past `max` bytes. Each piece is copied as it arrives and dropped: collecting the
/// pieces instead keeps a handle of 32 bytes for each (a sender that cuts its body into
/// one-byte chunks makes 64 KiB cost megabytes) and pins the connection's read buffers
/// under them. The buffer doubles as bytes arrive, never past what the body can still
/// bring (its stated length, or what a length limit wrapped around it still allows) nor
/// past `max`, so it holds at most twice what arrived.
pub async fn read_whole<B>(body: B, max: usize) -> Result<Bytes, WholeError<B::Error>>
where
    B: hyper::body::Body,
{
    use bytes::Buf;
    let mut body = std::pin::pin!(body);
    // One that says it is longer is refused unread.
    if body.size_hint().lower() > u64::try_from(max).unwrap_or(u64::MAX) {
        return Err(WholeError::TooLong);
    }
    let mut out: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(mut data) = frame.map_err(WholeError::Body)?.into_data() else { continue };
        let needed = out.len().saturating_add(data.remaining());
        if needed > max {
            return Err(WholeError::TooLong);
        }
        if needed > out.capacity() {
            // Doubled, whatever the body says it will bring: a stated length is not
            // room given before the bytes come (one byte sent of 64 KiB stated holds
            // 64 KiB no sooner than they arrive).
            let to_come = body.size_hint().upper().map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
            let ceiling = needed.saturating_add(to_come).min(max);
            let room = out.capacity().saturating_mul(2).max(needed).min(ceiling);
            out.reserve_exact(room - out.len());
        }
        while data.has_remaining() {
            let piece = data.chunk();
            out.extend_from_slice(piece);
            let n = piece.len();
            data.advance(n);
        }
    }
    Ok(Bytes::from(out))
}

/// A parsed `http://` or `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, AdapterError> {
        // The URL is not repeated: it may hold a token (Telegram's path, a query).
        let bad = || AdapterError::Malformed("the provider's address is not an http(s) URL with a valid host and port".to_owned());
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(bad)?;
            let port = match &v6[end + 1..] {
                "" => default_port,
                p => p.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(bad)?,
            };
            (v6[..end].to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        Ok(Url { tls, host, port, path: path.to_owned() })
    }

    /// `scheme://host:port`, the host in lowercase.
    pub fn origin(&self) -> String {
        format!("{}://{}:{}", if self.tls { "https" } else { "http" }, self.host.to_ascii_lowercase(), self.port)
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// One part of a `multipart/form-data` body: a field, or a file (name and type).
pub struct Part<'a> {
    pub name: &'a str,
    pub file: Option<(&'a str, &'a str)>,
    pub bytes: &'a [u8],
}

/// A provider's answer.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
pub struct Client {
    tls: tokio_rustls::TlsConnector,
    /// Connections whose last answer was read to the end, by origin, with when.
    idle: Arc<Mutex<HashMap<String, Vec<(std::time::Instant, SendRequest<Full<Bytes>>)>>>>,
    timeout: Duration,
}

/// How long a connection may sit idle and still be used again. A connection idle for
/// longer may have been dropped without a word by a NAT, a load balancer or a firewall
/// on the way: a request written into it would get no answer, and a message sent on it
/// would be taken for one the provider may have got (`unknown`) although it never left.
const IDLE_FOR: Duration = Duration::from_secs(30);

impl Client {
    /// A client whose every request (connect, send, read the answer) ends within `timeout`.
    pub fn new(timeout: Duration) -> Result<Client, AdapterError> {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| AdapterError::Malformed(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client { tls: tokio_rustls::TlsConnector::from(Arc::new(config)), idle: Arc::default(), timeout })
    }

    /// The TLS connector (the web's roots), for protocols other than HTTP (SMTP).
    pub fn tls(&self) -> tokio_rustls::TlsConnector {
        self.tls.clone()
    }

    /// How long one request (or one SMTP session) may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `body` to `url` with `headers` (and `Content-Type: application/json`).
    pub async fn post_json(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<Response, AdapterError> {
        self.post_as(url, "application/json", headers, body).await
    }

    /// POSTs `application/x-www-form-urlencoded` fields.
    pub async fn post_form(&self, url: &str, fields: &[(&str, &str)]) -> Result<Response, AdapterError> {
        let body = fields.iter().map(|(k, v)| format!("{}={}", form_escape(k), form_escape(v))).collect::<Vec<_>>().join("&");
        self.post_as(url, "application/x-www-form-urlencoded", &[], body.into_bytes()).await
    }

    /// Errors before the request could be written are [`AdapterError::Unreachable`] (the
    /// provider got nothing); from the moment it may have been written they are
    /// [`AdapterError::NoAnswer`] (the provider may have acted on it).
    async fn post_as(&self, url: &str, content_type: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<Response, AdapterError> {
        self.call(url, Some(content_type), headers, body, MAX_RESPONSE_BYTES).await
    }

    /// POSTs `multipart/form-data` (RFC 7578): fields, and files with their names and
    /// types.
    pub async fn post_multipart(&self, url: &str, headers: &[(&str, String)], parts: &[Part<'_>]) -> Result<Response, AdapterError> {
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| AdapterError::Malformed("no randomness".into()))?;
        let boundary = format!("switchboard-{}", crate::hex(&raw));
        let mut body = Vec::new();
        for part in parts {
            body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", part.name).as_bytes());
            if let Some((filename, content_type)) = part.file {
                let filename: String = filename.chars().filter(|c| !c.is_control() && *c != '"' && *c != '\\').collect();
                body.extend_from_slice(format!("; filename=\"{filename}\"\r\nContent-Type: {content_type}").as_bytes());
            }
            body.extend_from_slice(b"\r\n\r\n");
            body.extend_from_slice(part.bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.post_as(url, &format!("multipart/form-data; boundary={boundary}"), headers, body).await
    }

    /// GETs `url` (a file a customer sent), reading at most `max` bytes of its body.
    pub async fn get(&self, url: &str, headers: &[(&str, String)], max: usize) -> Result<Response, AdapterError> {
        self.call(url, None, headers, Vec::new(), max).await
    }

    /// A POST with a body of `content_type`, or a GET without one.
    async fn call(&self, url: &str, content_type: Option<&str>, headers: &[(&str, String)], body: Vec<u8>, max: usize) -> Result<Response, AdapterError> {
        let url = Url::parse(url)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let origin = url.origin();
        let sender = match tokio::time::timeout_at(deadline, self.sender(&url)).await {
            Ok(sender) => sender?,
            Err(_) => return Err(AdapterError::Unreachable(format!("no connection to {origin} within {} ms", self.timeout.as_millis()))),
        };
        match tokio::time::timeout_at(deadline, self.post(&url, sender, content_type, headers, body, max)).await {
            Ok(result) => result,
            Err(_) => Err(AdapterError::NoAnswer(format!("no answer from {origin} within {} ms", self.timeout.as_millis()))),
        }
    }

    /// A connection ready for a request: a pooled one whose last answer was read to the
    /// end, or a new one.
    async fn sender(&self, url: &Url) -> Result<SendRequest<Full<Bytes>>, AdapterError> {
        let pooled = match self.take_idle(&url.origin()) {
            Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
            None => None,
        };
        match pooled {
            Some(sender) => Ok(sender),
            None => self.connect(url).await,
        }
    }

    async fn post(&self, url: &Url, mut sender: SendRequest<Full<Bytes>>, content_type: Option<&str>, headers: &[(&str, String)], body: Vec<u8>, max: usize) -> Result<Response, AdapterError> {
        let origin = url.origin();
        let mut request = match content_type {
            Some(content_type) => hyper::Request::post(url.path.as_str()).header(hyper::header::CONTENT_TYPE, content_type),
            None => hyper::Request::get(url.path.as_str()),
        }
        .header(hyper::header::HOST, url.host_header())
        .header(hyper::header::USER_AGENT, concat!("switchboard/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| AdapterError::Malformed(format!("request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| {
            // A pooled connection the server closed as it was taken: the request was
            // never written, so nothing reached the provider and a retry is safe.
            if e.is_canceled() {
                AdapterError::Unreachable(format!("{origin}: the connection closed before the request was sent: {e}"))
            } else {
                AdapterError::NoAnswer(format!("{origin}: {e}"))
            }
        })?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_owned(), v.to_owned())))
            .collect();
        let is_get = content_type.is_none();
        let body = read_whole(response.into_body(), max).await.map_err(|e| match e {
            // A GET changed nothing: a body over the cap is too long, for good. An
            // answer to a POST may mean it was taken, so it stays "no answer".
            WholeError::TooLong if is_get => AdapterError::TooLong { limit: max, actual: max.saturating_add(1) },
            WholeError::TooLong => AdapterError::NoAnswer(format!("{origin}: reading the answer: longer than {max} bytes")),
            WholeError::Body(e) => AdapterError::NoAnswer(format!("{origin}: reading the answer: {e}")),
        })?;
        self.put_idle(origin, sender);
        Ok(Response { status, headers, body })
    }

    fn take_idle(&self, origin: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(origin)?;
        // The newest last: those left idle too long go.
        list.retain(|(since, sender)| since.elapsed() < IDLE_FOR && !sender.is_closed());
        list.pop().map(|(_, sender)| sender)
    }

    fn put_idle(&self, origin: String, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(origin).or_default();
        list.retain(|(since, sender)| since.elapsed() < IDLE_FOR && !sender.is_closed());
        if list.len() < IDLE_PER_ORIGIN {
            list.push((std::time::Instant::now(), sender));
        }
    }

    async fn connect(&self, url: &Url) -> Result<SendRequest<Full<Bytes>>, AdapterError> {
        let origin = url.origin();
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| AdapterError::Unreachable(format!("{origin}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        if url.tls {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| AdapterError::Malformed(format!("{origin}: {e}")))?;
            let tls = self.tls.connect(name, tcp).await.map_err(|e| AdapterError::Unreachable(format!("{origin}: TLS: {e}")))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| AdapterError::Unreachable(format!("{origin}: {e}")))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| AdapterError::Unreachable(format!("{origin}: {e}")))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
    }
}

/// Percent-encodes a form field (RFC 3986 unreserved characters stay).
pub fn form_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{read_whole, Url, WholeError};
    use bytes::Bytes;

    #[test]
    fn form_fields_are_percent_encoded() {
        assert_eq!(super::form_escape("Привет, a+b=c&d"), "%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82%2C%20a%2Bb%3Dc%26d");
    }

    #[test]
    fn urls_parse_with_their_ports_and_paths() {
        assert_eq!(Url::parse("https://api.telegram.org/bot1:x/sendMessage").unwrap(), Url { tls: true, host: "api.telegram.org".into(), port: 443, path: "/bot1:x/sendMessage".into() });
        assert_eq!(Url::parse("http://127.0.0.1:8080").unwrap(), Url { tls: false, host: "127.0.0.1".into(), port: 8080, path: "/".into() });
        assert_eq!(Url::parse("http://[::1]:9/x?y=1").unwrap().host, "::1");
        for bad in ["ftp://x", "http://", "http://u:p@host/", "http://h:notaport/"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    /// A body of the given pieces; `stated` says its length up front.
    struct Pieces {
        left: std::collections::VecDeque<Bytes>,
        stated: bool,
        polled: bool,
    }

    impl hyper::body::Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            self.polled = true;
            std::task::Poll::Ready(self.left.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }

        fn size_hint(&self) -> hyper::body::SizeHint {
            let left: usize = self.left.iter().map(|b| b.len()).sum();
            if self.stated {
                hyper::body::SizeHint::with_exact(left as u64)
            } else {
                hyper::body::SizeHint::default()
            }
        }
    }

    fn pieces(n: usize, stated: bool) -> Pieces {
        Pieces { left: (0..n).map(|i| Bytes::from(vec![b'a' + (i % 26) as u8])).collect(), stated, polled: false }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    #[test]
    fn a_body_in_one_byte_pieces_is_read_whole_in_order() {
        for stated in [false, true] {
            let got = run(read_whole(pieces(70_000, stated), 70_000)).expect("within the limit");
            let want: Vec<u8> = (0..70_000).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(&got[..], &want[..], "stated {stated}");
        }
    }

    #[test]
    fn a_body_past_its_limit_is_refused() {
        for stated in [false, true] {
            assert!(matches!(run(read_whole(pieces(1_001, stated), 1_000)), Err(WholeError::TooLong)), "stated {stated}");
        }
    }

    #[test]
    fn a_body_that_says_it_is_too_long_is_not_read() {
        let mut body = pieces(1_001, true);
        assert!(matches!(run(read_whole(&mut body, 1_000)), Err(WholeError::TooLong)));
        assert!(!body.polled, "a body stating more than the limit was read");
    }
}
