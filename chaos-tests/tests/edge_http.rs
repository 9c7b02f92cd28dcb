//! The HTTP edge under abuse (docs/security.md, "Connections", "Attachments", "Pages",
//! "Health"): uploads refused before their body, slow and idle connections, per-address
//! connection limits, file names and types, page headers and readiness.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use switchboard_chaos_tests::{
    binary, client_upload, eventually, free_local_addrs, http_request, query_escape, request_head, serves_a_new_client, Dev, HttpConn,
    HttpOutcome, MIB, WAIT,
};
use switchboard_gateway::client::{http_json, WsClient};

async fn dev_with(dir: &tempfile::TempDir, flags: &[&str]) -> anyhow::Result<Dev> {
    Dev::start_with(binary()?, &dir.path().join("data"), flags).await
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The first `n` bytes of a PNG file.
fn png_start(n: usize) -> Vec<u8> {
    let mut bytes = PNG_SIGNATURE.to_vec();
    bytes.resize(n, 0);
    bytes
}

/// Opens an upload: sends only the request head, declaring `length` bytes.
async fn upload_head(dev: &Dev, token: &str, name: &str, content_type: &str, length: usize) -> anyhow::Result<HttpConn> {
    let mut conn = HttpConn::connect(&dev.public).await?;
    let path = format!("/attachments?token={}&name={}", query_escape(token), query_escape(name));
    conn.send(&request_head("POST", &path, &dev.public, &[("Content-Type", content_type)], Some(length))).await?;
    Ok(conn)
}

/// The response to a head sent without its body, which must come within 2 s.
async fn answer_without_body(mut conn: HttpConn, what: &str) -> anyhow::Result<(u16, Value)> {
    match conn.read_response(Duration::from_secs(2)).await {
        HttpOutcome::Response(response) => Ok((response.status, response.json())),
        other => anyhow::bail!("{what}: no response within 2 s while the body was never sent ({other:?})"),
    }
}

/// Regular files under `dir`, but not in the stores (`records/`, `log/`) and not the
/// node's own log file.
fn files_outside_the_store(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "records" || name == "log" || name == "node.log" {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t) if t.is_file() => {
                    found.insert(path);
                }
                _ => {}
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_refused_before_the_body_is_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--uploads-per-address", "2", "--request-timeout-ms", "2000"]).await?;
    let (_ann, _, token) = dev.client("Ann").await?;

    // Each check answers from the head alone.
    let conn = upload_head(&dev, "v1.forged.token", "cat.png", "image/png", 5_242_880).await?;
    let (status, body) = answer_without_body(conn, "forged token").await?;
    assert_eq!(status, 401, "{body}");
    let alice = dev.login("alice").await?;
    let conn = upload_head(&dev, &alice, "cat.png", "image/png", 5_242_880).await?;
    let (status, body) = answer_without_body(conn, "staff token").await?;
    assert_eq!(status, 403, "{body}");
    let (mut gone, _, gone_token) = dev.client("Gone").await?;
    gone.send(&json!({"type": "close"})).await?;
    gone.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    let conn = upload_head(&dev, &gone_token, "cat.png", "image/png", 5_242_880).await?;
    let (status, body) = answer_without_body(conn, "closed conversation").await?;
    assert_eq!(status, 409, "{body}");
    // A customer blocked while their conversation is open stores no more files there.
    let (_mallory, mallory_conversation, mallory_token) = dev.client("Mallory").await?;
    let supervisor = dev.login("supervisor").await?;
    let (_, doc) = dev.api("GET", &format!("/api/conversations/{mallory_conversation}"), Some(&supervisor), None).await?;
    let visitor = doc["visitor"]["id"].as_str().unwrap_or_default().to_owned();
    let block = json!({"list": "block", "kind": "visitor", "value": visitor, "note": "abusive"});
    let (status, body) = dev.api("PUT", "/api/access/rules", Some(&supervisor), Some(block)).await?;
    assert_eq!(status, 200, "{body}");
    let conn = upload_head(&dev, &mallory_token, "cat.png", "image/png", 5_242_880).await?;
    let (status, body) = answer_without_body(conn, "blocked customer").await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("blocked")), "{body}");
    let conn = upload_head(&dev, &token, "evil.bin", "application/x-evil", 5_242_880).await?;
    let (status, body) = answer_without_body(conn, "wrong type").await?;
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["code"], "unsupported_type", "{body}");
    let conn = upload_head(&dev, &token, "huge.png", "image/png", 6_000_000).await?;
    let (status, body) = answer_without_body(conn, "too large").await?;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "too_large", "{body}");

    // Two uploads in progress per address: of three held open, one is refused at once.
    let files_before = files_outside_the_store(&dev.data_dir);
    let mut held = Vec::new();
    for n in 0..3 {
        let mut conn = upload_head(&dev, &token, &format!("held{n}.png"), "image/png", MIB as usize).await?;
        conn.send(&png_start(1024)).await?;
        held.push(conn);
    }
    // One shared deadline: a response already there is read even once it has passed.
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut outcomes = Vec::new();
    for conn in held.iter_mut() {
        outcomes.push(conn.read_response(deadline.saturating_duration_since(Instant::now())).await);
    }
    let refused: Vec<&HttpOutcome> = outcomes.iter().filter(|o| matches!(o, HttpOutcome::Response(r) if r.status == 429)).collect();
    assert_eq!(refused.len(), 1, "one of three concurrent uploads is refused with 429 at once: {outcomes:?}");
    if let HttpOutcome::Response(r) = refused[0] {
        assert_eq!(r.json()["code"], "rate_limited", "{:?}", r.json());
    }
    let waiting = outcomes.iter().filter(|o| matches!(o, HttpOutcome::TimedOut)).count();
    assert_eq!(waiting, 2, "the other two wait for their bodies: {outcomes:?}");

    // Those two never send the rest: 408 (or closed) once the request time is up.
    let stalled_at = Instant::now();
    for (conn, outcome) in held.iter_mut().zip(&outcomes) {
        if !matches!(outcome, HttpOutcome::TimedOut) {
            continue;
        }
        match conn.read_response(Duration::from_secs(6)).await {
            HttpOutcome::Response(r) => {
                assert_eq!(r.status, 408, "{:?}", r.json());
                assert_eq!(r.json()["code"], "timeout", "{:?}", r.json());
            }
            HttpOutcome::Closed => {}
            HttpOutcome::TimedOut => panic!("a body stalled for {:?} was neither refused nor closed", stalled_at.elapsed()),
        }
    }
    drop(held);
    // No partial file is left behind.
    let data_dir = dev.data_dir.clone();
    eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let (data_dir, files_before) = (data_dir.clone(), files_before.clone());
        async move {
            let now = files_outside_the_store(&data_dir);
            let extra: Vec<&PathBuf> = now.difference(&files_before).collect();
            if extra.is_empty() {
                Ok(Some(()))
            } else {
                anyhow::bail!("left behind: {extra:?}")
            }
        }
    })
    .await?;

    // The address's places are free again and a whole upload goes through.
    let png = png_start(2048);
    eventually(Duration::from_secs(5), Duration::from_millis(100), || async {
        let (status, body) = client_upload(&dev, &token, "ok.png", "image/png", &png).await?;
        match status {
            201 => Ok(Some(())),
            429 => Ok(None),
            _ => anyhow::bail!("{status} {body}"),
        }
    })
    .await?;
    serves_a_new_client(&dev).await?;
    drop(dev);

    // Memory: 30 uploads declaring 5 MiB each, 1 KiB sent, cost far less than 150 MiB.
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--uploads-per-address", "40", "--uploads", "40", "--upload-bytes-per-hour", "1073741824"]).await?;
    let mut tokens = Vec::new();
    for n in 0..6 {
        tokens.push(dev.client(&format!("Uploader {n}")).await?.2);
    }
    let baseline = dev.rss_bytes()?;
    let mut held = Vec::new();
    for n in 0..30 {
        let mut conn = upload_head(&dev, &tokens[n % 5], &format!("big{n}.png"), "image/png", 5_242_880).await?;
        conn.send(&png_start(1024)).await?;
        held.push(conn);
    }
    // While RSS is sampled, each is still waiting for its body.
    let check = async {
        for (n, conn) in held.iter_mut().enumerate() {
            match conn.read_response(Duration::from_millis(30)).await {
                HttpOutcome::TimedOut => {}
                other => anyhow::bail!("held upload {n} was answered: {other:?}"),
            }
        }
        Ok(())
    };
    let (checked, peak) = dev.peak_rss_during(check).await?;
    checked?;
    let grown = peak.saturating_sub(baseline);
    assert!(grown < 40 * MIB, "30 held uploads grew RSS by {} MiB", grown / MIB);
    // Meanwhile another upload goes through.
    let (status, body) = client_upload(&dev, &tokens[5], "small.png", "image/png", &png_start(2048)).await?;
    assert_eq!(status, 201, "{body}");
    drop(held);
    serves_a_new_client(&dev).await?;
    Ok(())
}

/// Trickles a header line every 300 ms, never finishing the head; returns how long
/// the server took to close the connection, `None` if it did not within `limit`.
async fn trickle(addr: &str, limit: Duration) -> anyhow::Result<Option<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let conn = HttpConn::connect(addr).await?;
    let (mut read, mut write) = conn.into_inner().into_split();
    let started = Instant::now();
    write.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n").await?;
    let closed = async move {
        let mut sink = [0u8; 4096];
        loop {
            match read.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::pin!(closed);
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    tick.tick().await;
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            _ = &mut closed => return Ok(Some(started.elapsed())),
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
            _ = tick.tick() => {
                n += 1;
                if write.write_all(format!("X-Slow-{n}: still typing\r\n").as_bytes()).await.is_err() {
                    return Ok(Some(started.elapsed()));
                }
            }
        }
    }
}

/// Whether a connection that sends nothing is closed within `limit`.
async fn idle_closed(addr: &str, limit: Duration) -> anyhow::Result<bool> {
    let mut conn = HttpConn::connect(addr).await?;
    Ok(conn.closed_within(limit).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_one_address_cannot_hold_them_all() -> anyhow::Result<()> {
    // Slowloris: headers must be complete within 1 s, on both listeners.
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--header-timeout-ms", "1000"]).await?;
    let limit = Duration::from_secs(4);
    let (idle_public, idle_private, slow_public, slow_private) =
        tokio::join!(idle_closed(&dev.public, limit), idle_closed(&dev.private, limit), trickle(&dev.public, limit), trickle(&dev.private, limit));
    assert!(idle_public?, "an idle connection to the public listener was still open after {limit:?}");
    assert!(idle_private?, "an idle connection to the private listener was still open after {limit:?}");
    assert!(slow_public?.is_some(), "a trickled head on the public listener was still open after {limit:?}");
    assert!(slow_private?.is_some(), "a trickled head on the private listener was still open after {limit:?}");
    let (status, _) = http_json(&dev.public, "GET", "/healthz", None, None).await?;
    assert_eq!(status, 200);
    let (status, _) = http_json(&dev.private, "GET", "/healthz", None, None).await?;
    assert_eq!(status, 200);
    serves_a_new_client(&dev).await?;
    drop(dev);

    // Ten connections per address per listener: the eleventh is closed at once.
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--max-connections-per-address", "10"]).await?;
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut conn = HttpConn::connect(&dev.public).await?;
        conn.send(b"GET /healthz HT").await?;
        held.push(conn);
    }
    let mut eleventh = HttpConn::connect(&dev.public).await?;
    assert!(eleventh.closed_within(Duration::from_secs(1)).await, "an eleventh connection from one address was kept open");
    // The limit is per listener: the private one still answers.
    let (status, _) = http_json(&dev.private, "GET", "/healthz", None, None).await?;
    assert_eq!(status, 200);
    drop(held);
    eventually(Duration::from_secs(5), Duration::from_millis(100), || async {
        Ok(matches!(http_json(&dev.public, "GET", "/healthz", None, None).await, Ok((200, _))).then_some(()))
    })
    .await
    .context("the public listener serves again once the held connections are gone")?;
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_over_its_attachment_quota_gets_400_invalid() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut client, _, token) = dev.client("Collector").await?;
    let mut first = None;
    for n in 0..50 {
        let (status, body) = client_upload(&dev, &token, &format!("note{n}.txt"), "text/plain", b"note").await?;
        assert_eq!(status, 201, "upload {n}: {body}");
        first.get_or_insert(body["id"].clone());
    }
    // The 51st is refused from its head, before any body...
    let conn = upload_head(&dev, &token, "note50.txt", "text/plain", 4).await?;
    let (status, body) = answer_without_body(conn, "over the quota").await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid", "{body}");
    // ...and with its body.
    let (status, body) = client_upload(&dev, &token, "note50.txt", "text/plain", b"note").await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid", "{body}");
    let stored = std::fs::read_dir(dev.data_dir.join("attachments"))?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_file())).count();
    assert_eq!(stored, 50, "a refused upload leaves no file");

    // The conversation goes on, with the files it has.
    client.send(&json!({"type": "send", "key": "with-file", "text": "see attached", "attachments": [first]})).await?;
    let ack = client.wait_for(WAIT, |v| (v["type"] == "ack" && v["key"] == "with-file") || v["type"] == "error").await?;
    assert_eq!(ack["type"], "ack", "{ack}");
    serves_a_new_client(&dev).await?;
    Ok(())
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A stored (uncompressed) ZIP archive: local file headers, central directory, end record.
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let (size, name_len) = (data.len() as u32, name.len() as u16);
        out.extend_from_slice(b"PK\x03\x04");
        for half in [20u16, 0, 0, 0, 0x21] {
            out.extend_from_slice(&half.to_le_bytes()); // version, flags, method 0, time, date
        }
        for word in [crc, size, size] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // extra length
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        central.extend_from_slice(b"PK\x01\x02");
        for half in [20u16, 20, 0, 0, 0, 0x21] {
            central.extend_from_slice(&half.to_le_bytes()); // made by, needed, flags, method, time, date
        }
        for word in [crc, size, size] {
            central.extend_from_slice(&word.to_le_bytes());
        }
        for half in [name_len, 0, 0, 0, 0] {
            central.extend_from_slice(&half.to_le_bytes()); // name, extra, comment, disk, internal
        }
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (central_offset, central_len) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    let count = entries.len() as u16;
    for half in [0u16, 0, count, count] {
        out.extend_from_slice(&half.to_le_bytes());
    }
    out.extend_from_slice(&central_len.to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file names a Content-Disposition value gives (`filename` and `filename*`).
fn disposition_filenames(value: &str) -> Vec<String> {
    value
        .split(';')
        .skip(1)
        .filter_map(|param| {
            let (key, raw) = param.trim().split_once('=')?;
            match key.trim().to_ascii_lowercase().as_str() {
                "filename" => Some(raw.trim().trim_matches('"').to_owned()),
                "filename*" => Some(percent_decode(raw.trim().rsplit("''").next()?)),
                _ => None,
            }
        })
        .collect()
}

const BIDI_CONTROLS: &[char] = &[
    '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
    '\u{061C}',
];

const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_names_lose_bidi_controls_and_docx_must_be_office_zip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (_client, _, token) = dev.client("Ann").await?;

    // "invoice<RLO>fdp.exe" displays as "invoiceexe.pdf" but is an .exe name.
    let pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n";
    let (status, file) = client_upload(&dev, &token, "invoice\u{202E}fdp.exe", "application/pdf", pdf).await?;
    assert_eq!(status, 201, "{file}");
    let name = file["name"].as_str().unwrap_or_default().to_owned();
    assert!(!name.contains(BIDI_CONTROLS), "the stored name keeps a bidirectional control: {name:?}");
    assert!(name.ends_with(".pdf"), "a PDF's name ends with .pdf: {name:?}");

    let id = file["id"].as_str().context("an attachment id")?;
    let download = http_request(&dev.public, None, "GET", &format!("/attachments/{id}?token={}", query_escape(&token)), &[], b"").await?;
    assert_eq!(download.status, 200);
    assert_eq!(download.body, pdf.to_vec());
    let disposition = download.header("content-disposition").context("a Content-Disposition")?.to_owned();
    assert!(!disposition.contains(BIDI_CONTROLS), "{disposition:?}");
    let names = disposition_filenames(&disposition);
    assert!(!names.is_empty(), "no file name in {disposition:?}");
    for served in &names {
        assert!(served.ends_with(".pdf"), "served as {served:?} ({disposition:?})");
        assert!(!served.contains(BIDI_CONTROLS), "served as {served:?}");
    }

    // A name outside ASCII (a Cyrillic one) is served too: an ASCII `filename` and the
    // name itself in `filename*`.
    let (status, file) = client_upload(&dev, &token, "счёт №5.pdf", "application/pdf", pdf).await?;
    assert_eq!(status, 201, "{file}");
    let id = file["id"].as_str().context("an attachment id")?;
    let download = http_request(&dev.public, None, "GET", &format!("/attachments/{id}?token={}", query_escape(&token)), &[], b"").await?;
    assert_eq!(download.status, 200);
    assert_eq!(download.header("referrer-policy"), Some("no-referrer"), "the token in the link goes nowhere else");
    let disposition = download.header("content-disposition").context("a Content-Disposition for a Cyrillic name")?.to_owned();
    assert_eq!(disposition, "inline; filename=\"____ _5.pdf\"; filename*=UTF-8''%D1%81%D1%87%D1%91%D1%82%20%E2%84%965.pdf");
    assert!(disposition_filenames(&disposition).contains(&"счёт №5.pdf".to_owned()), "{disposition:?}");

    // A "DOCX" is a ZIP whose first entry belongs to an Office Open XML package.
    let content_types = br#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>"#;
    let evil = zip(&[("evil.js", b"alert(1)"), ("[Content_Types].xml", content_types)]);
    let (status, body) = client_upload(&dev, &token, "report.docx", DOCX, &evil).await?;
    assert_eq!(status, 415, "a ZIP of a script passed as DOCX: {body}");
    assert_eq!(body["code"], "unsupported_type", "{body}");
    let docx = zip(&[("[Content_Types].xml", content_types), ("word/document.xml", b"<w:document/>")]);
    let (status, body) = client_upload(&dev, &token, "report.docx", DOCX, &docx).await?;
    assert_eq!(status, 201, "{body}");
    assert!(body["name"].as_str().unwrap_or_default().ends_with(".docx"), "{body}");

    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_sent_with_a_content_security_policy() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;

    let workstation = http_request(&dev.private, None, "GET", "/", &[], b"").await?;
    assert_eq!(workstation.status, 200);
    let csp = workstation.header("content-security-policy").context("the workstation has no Content-Security-Policy")?;
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("object-src 'none'"), "{csp}");
    assert_eq!(workstation.header("x-frame-options").map(str::to_ascii_uppercase).as_deref(), Some("DENY"));
    assert_eq!(workstation.header("x-content-type-options"), Some("nosniff"));

    let demo = http_request(&dev.public, None, "GET", "/", &[], b"").await?;
    assert_eq!(demo.status, 200);
    let csp = demo.header("content-security-policy").context("the public page has no Content-Security-Policy")?;
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(demo.header("x-content-type-options"), Some("nosniff"));

    // Every response, JSON and errors included.
    for (addr, path) in [(&dev.public, "/healthz"), (&dev.private, "/healthz"), (&dev.private, "/api/me"), (&dev.public, "/no-such-page")] {
        let response = http_request(addr, None, "GET", path, &[], b"").await?;
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "GET {path} ({})", response.status);
    }
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_only_when_a_client_can_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let [public, private]: [String; 2] = free_local_addrs(2)?.try_into().map_err(|_| anyhow::anyhow!("two addresses"))?;
    let starting = Dev::launch(binary()?, "dev", &dir.path().join("data"), &public, &private, &[])?;
    // Poll /readyz while the node starts: refused or 503 until it is 200; at that moment
    // a visitor can start a conversation.
    let probe = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut not_ready = 0u32;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "/readyz never turned 200 within 60 s");
            match http_request(&public, None, "GET", "/readyz", &[], b"").await {
                Err(_) => {} // not listening yet
                Ok(r) if r.status == 503 => {
                    anyhow::ensure!(r.json() == json!({"status": "not_ready"}), "503 with {:?}", r.json());
                    not_ready += 1;
                }
                Ok(r) if r.status == 200 => {
                    anyhow::ensure!(r.json() == json!({"status": "ready"}), "200 with {:?}", r.json());
                    let mut ws = WsClient::connect(&public, "/ws/client", None).await?;
                    ws.send(&json!({"type": "start", "name": "Early bird"})).await?;
                    let reply = ws.wait_for(WAIT, |v| v["type"] == "started" || v["type"] == "error").await?;
                    return Ok::<_, anyhow::Error>((reply, not_ready));
                }
                Ok(r) => anyhow::bail!("/readyz answered {} {:?}", r.status, r.json()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
        }
    };
    let (dev, probed) = tokio::join!(starting.ready(), probe);
    let dev = dev?;
    let (reply, _not_ready) = probed?;
    assert_eq!(reply["type"], "started", "a start right after /readyz turned 200: {reply}");

    for addr in [&dev.public, &dev.private] {
        let (status, body) = http_json(addr, "GET", "/readyz", None, None).await?;
        assert_eq!((status, body), (200, json!({"status": "ready"})), "/readyz on {addr}");
        let (status, body) = http_json(addr, "GET", "/healthz", None, None).await?;
        assert_eq!((status, body), (200, json!({"status": "ok"})), "/healthz on {addr}");
    }
    serves_a_new_client(&dev).await?;
    Ok(())
}

/// A small upload whose body stops coming gives its slot back in seconds (5 s plus its
/// length at 32 KiB/s), long before the 30 s request deadline: tiny stalled uploads
/// cannot hold the node's upload slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_small_upload_gives_its_slot_back_in_seconds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--uploads-per-address", "1"]).await?;
    let (_ws, _, token) = dev.client("Ann").await?;
    let started = Instant::now();
    let mut stalled = upload_head(&dev, &token, "a.txt", "text/plain", 10).await?;
    stalled.send(b"abc").await?;
    // Its body is being received once its partial file exists.
    let attachments = dev.data_dir.join("attachments");
    let partial = |dir: &Path| std::fs::read_dir(dir).map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".partial"))).unwrap_or(false);
    eventually(Duration::from_secs(5), Duration::from_millis(20), || {
        let found = partial(&attachments);
        async move { Ok(found.then_some(())) }
    })
    .await
    .context("the stalled upload's partial file never appeared")?;
    // The slot is held meanwhile: a second upload from the address is refused.
    let (status, body) = client_upload(&dev, &token, "b.txt", "text/plain", b"second").await?;
    assert_eq!(status, 429, "{body}");
    match stalled.read_response(Duration::from_secs(15)).await {
        HttpOutcome::Response(response) => assert_eq!(response.status, 408, "{:?}", response.json()),
        HttpOutcome::Closed => {}
        HttpOutcome::TimedOut => anyhow::bail!("a stalled 10-byte upload was still open after 15 s"),
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "the stalled upload ended after {waited:?}");
    assert!(!partial(&attachments), "the partial file is gone");
    let (status, body) = client_upload(&dev, &token, "c.txt", "text/plain", b"after").await?;
    assert_eq!(status, 201, "the slot came back: {body}");
    Ok(())
}

/// Whether what the connections from local `ports` to the server's port `server` sent
/// (on IPv4 loopback) has all been read by the server's process: no byte waits in the
/// sender's queue (unacknowledged) nor in the receiver's (not yet read), per
/// `/proc/net/tcp` (both ends of each connection, matched by both ports: other tests'
/// sockets may share one of them).
fn all_read_by_the_server(server: u16, ports: &[u16]) -> anyhow::Result<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let port_of = |address: &str| address.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    let mut seen = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(queues)) = (fields.get(1), fields.get(2), fields.get(4)) else { continue };
        let Some((tx, rx)) = queues.split_once(':') else { continue };
        let (tx, rx) = (u64::from_str_radix(tx, 16)?, u64::from_str_radix(rx, 16)?);
        let (Some(local), Some(remote)) = (port_of(local), port_of(remote)) else { continue };
        if remote == server && ports.contains(&local) {
            seen += 1;
            if tx > 0 {
                return Ok(false);
            }
        } else if local == server && ports.contains(&remote) && rx > 0 {
            return Ok(false);
        }
    }
    anyhow::ensure!(seen == ports.len(), "{seen} of {} connections found in /proc/net/tcp", ports.len());
    Ok(true)
}

/// A webhook body cut into one-byte chunks costs what its bytes do: 40 connections
/// each holding 64 KiB sent as 65,535 chunks (the body is read before the channel is
/// looked up) grew RSS by 77-97 MiB when every chunk was kept as its own piece (about
/// 2 MiB a connection); read into one buffer, 5-6 MiB. Each body
/// then ends and is answered as any other: read whole, then `404` for a channel that
/// does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_body_in_one_byte_chunks_costs_its_bytes_not_a_piece_each() -> anyhow::Result<()> {
    const CONNECTIONS: usize = 40;
    const CHUNKS: usize = 64 * 1024 - 1;
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &[]).await?;
    let head = format!("POST /hooks/telegram/nosuchchannel HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", dev.public);
    let mut chunks = head.into_bytes();
    for _ in 0..CHUNKS {
        chunks.extend_from_slice(b"1\r\n \r\n");
    }
    let baseline = dev.rss_bytes()?;
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut conn = HttpConn::connect(&dev.public).await?;
        conn.send(&chunks).await?;
        held.push(conn);
    }
    // RSS is sampled until the server has read every byte sent (nothing left in either
    // side's TCP queue); none is answered yet.
    let ports = held.iter().map(HttpConn::local_port).collect::<std::io::Result<Vec<u16>>>()?;
    let server: u16 = dev.public.rsplit(':').next().and_then(|p| p.parse().ok()).context("the public listener's port")?;
    let check = async {
        eventually(Duration::from_secs(30), Duration::from_millis(50), || async { Ok(all_read_by_the_server(server, &ports)?.then_some(())) }).await?;
        for (n, conn) in held.iter_mut().enumerate() {
            match conn.read_response(Duration::from_millis(30)).await {
                HttpOutcome::TimedOut => {}
                other => anyhow::bail!("held webhook call {n} was answered: {other:?}"),
            }
        }
        Ok(())
    };
    let (checked, peak) = dev.peak_rss_during(check).await?;
    checked?;
    let grown = peak.saturating_sub(baseline);
    eprintln!("{CONNECTIONS} webhook bodies of 64 KiB in one-byte chunks held: RSS grew by {:.1} MiB", grown as f64 / MIB as f64);
    assert!(grown < 30 * MIB, "{CONNECTIONS} webhook bodies of 64 KiB in one-byte chunks grew RSS by {} MiB", grown / MIB);
    for (n, conn) in held.iter_mut().enumerate() {
        conn.send(b"0\r\n\r\n").await?;
        match conn.read_response(WAIT).await {
            HttpOutcome::Response(r) => assert_eq!(r.status, 404, "call {n}: {}", String::from_utf8_lossy(&r.body)),
            other => anyhow::bail!("webhook call {n} got no answer once its body ended: {other:?}"),
        }
    }
    drop(held);
    serves_a_new_client(&dev).await?;
    Ok(())
}

/// A JSON call without a JSON content type is answered `400` before its body is read
/// (docs/workstation-api.md): a login declaring 100,000 bytes of body, none sent, is
/// answered at once; with the content type, the same call waits for its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_call_without_its_content_type_is_refused_before_its_body() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &[]).await?;
    for content_type in ["", "Content-Type: text/plain\r\n", "Content-Type: application/jsonx\r\n"] {
        let mut conn = HttpConn::connect(&dev.private).await?;
        conn.send(format!("POST /api/login HTTP/1.1\r\nHost: {}\r\n{content_type}Content-Length: 100000\r\n\r\n", dev.private).as_bytes()).await?;
        match conn.read_response(WAIT).await {
            HttpOutcome::Response(r) => {
                let body: Value = serde_json::from_slice(&r.body)?;
                assert_eq!((r.status, body["code"].as_str()), (400, Some("bad_request")), "{content_type:?}: {body}");
            }
            other => anyhow::bail!("{content_type:?}: no answer before the body: {other:?}"),
        }
    }
    let mut conn = HttpConn::connect(&dev.private).await?;
    conn.send(format!("POST /api/login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 100\r\n\r\n", dev.private).as_bytes()).await?;
    assert!(matches!(conn.read_response(Duration::from_millis(500)).await, HttpOutcome::TimedOut), "a JSON call was answered before its body");
    Ok(())
}

/// Who may call is checked before the body is read: a supervisor linked to no operator
/// setting a favourite gets `403`, whatever the body (none of the right type here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_caller_may_not_make_is_refused_before_its_body() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &[]).await?;
    let supervisor = dev.login("supervisor").await?;
    let mut conn = HttpConn::connect(&dev.private).await?;
    conn.send(format!("PUT /api/templates/greeting/favourite HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {supervisor}\r\nContent-Length: 5\r\n\r\nnope!", dev.private).as_bytes()).await?;
    match conn.read_response(WAIT).await {
        HttpOutcome::Response(r) => assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body)),
        other => anyhow::bail!("no answer: {other:?}"),
    }
    Ok(())
}
