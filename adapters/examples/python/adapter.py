#!/usr/bin/env python3
"""An example adapter for Switchboard's open Channel API, in Python's standard library only.

It bridges a toy messenger to one Switchboard channel, the way a real adapter bridges
a provider (see docs/channel-api.md, which is all it was written from):

- The toy messenger's webhook, ``POST /incoming`` with ``{"from", "name", "id", "text"}``,
  is forwarded to ``POST /api/channel-api/{channel}/messages`` with the channel token.
  The messenger is answered only after Switchboard answered, so that the messenger
  retries what Switchboard did not take (5xx or no answer).
- Switchboard's outbound deliveries arrive at ``POST /outbound``. The signature is
  checked, a delivery id seen before is answered again without sending twice, and the
  message is "sent" to the toy messenger (kept in memory, listed by ``GET /sent``).
  Then a ``delivered`` receipt is reported to ``POST /api/channel-api/{channel}/statuses``.

Configuration, from the environment:

    SWITCHBOARD_URL      the private listener, e.g. http://127.0.0.1:8081
    SWITCHBOARD_CHANNEL  the channel id
    SWITCHBOARD_TOKEN    the channel token (shown once when the adapter was set)
    SWITCHBOARD_SECRET   the signing secret (shown with it)
    ADAPTER_LISTEN       host:port to serve on, e.g. 127.0.0.1:9000
"""

import hashlib
import hmac
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SWITCHBOARD = os.environ["SWITCHBOARD_URL"].rstrip("/")
CHANNEL = os.environ["SWITCHBOARD_CHANNEL"]
TOKEN = os.environ["SWITCHBOARD_TOKEN"]
SECRET = os.environ["SWITCHBOARD_SECRET"].encode()
HOST, PORT = os.environ.get("ADAPTER_LISTEN", "127.0.0.1:9000").rsplit(":", 1)

# Signatures older than this are refused (replays).
MAX_SIGNATURE_AGE = 300
MAX_BODY = 64 * 1024

lock = threading.Lock()
delivered = {}  # delivery_id -> the toy messenger's message id
sent = []  # what the toy messenger received, in order


def call_switchboard(method, path, body):
    """Calls the Channel API; returns (status, parsed JSON or None)."""
    request = urllib.request.Request(
        SWITCHBOARD + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, None
    except OSError:
        return 0, None


def signature_ok(header, body):
    """Checks ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs(time.time() - t) > MAX_SIGNATURE_AGE:
        return False
    expected = hmac.new(SECRET, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


def report_delivered(conversation, seq):
    # Retried a few times: a receipt is worth having, not worth blocking on.
    for attempt in range(5):
        status, _ = call_switchboard(
            "POST",
            f"/api/channel-api/{CHANNEL}/statuses",
            [{"conversation": conversation, "seq": seq, "status": "delivered"}],
        )
        if status == 204:
            return
        time.sleep(0.2 * (attempt + 1))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("adapter: " + (fmt % args) + "\n")

    def answer(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return None
        return self.rfile.read(length)

    def do_GET(self):
        if self.path == "/sent":
            with lock:
                self.answer(200, list(sent))
        elif self.path == "/healthz":
            self.answer(200, {"ok": True})
        else:
            self.answer(404, {"error": "not found"})

    def do_POST(self):
        body = self.read_body()
        if body is None:
            self.answer(413, {"error": "too large"})
        elif self.path == "/incoming":
            self.incoming(body)
        elif self.path == "/outbound":
            self.outbound(body)
        else:
            self.answer(404, {"error": "not found"})

    def incoming(self, body):
        try:
            message = json.loads(body)
            push = {
                "sender": str(message["from"]),
                "sender_name": message.get("name", ""),
                "message_id": str(message["id"]),
                "text": message["text"],
            }
        except (ValueError, KeyError, TypeError):
            self.answer(400, {"error": "expected from, id and text"})
            return
        status, reply = call_switchboard("POST", f"/api/channel-api/{CHANNEL}/messages", push)
        if status == 200:
            self.answer(200, {"ok": True, "conversation": reply["conversation"]})
        elif status in (400, 409):
            # Switchboard will never take it (malformed, blocked, too long…): tell the
            # messenger not to retry.
            self.answer(200, {"ok": False, "refused": reply})
        else:
            # 408 (maybe not committed), 401 (the adapter's token changed), 413, 429,
            # 5xx, no answer: the messenger sends it again later; the same message_id
            # makes a second copy harmless.
            if status == 401:
                sys.stderr.write("adapter: Switchboard refused the token: set SWITCHBOARD_TOKEN to the adapter's current token\n")
            self.answer(503, {"error": "Switchboard did not take it; retry"})

    def outbound(self, body):
        if not signature_ok(self.headers.get("X-Switchboard-Signature", ""), body):
            self.answer(401, {"error": "bad signature"})
            return
        delivery = json.loads(body)
        with lock:
            known = delivered.get(delivery["delivery_id"])
            if known is None:
                known = f"toy-{len(sent) + 1}"
                delivered[delivery["delivery_id"]] = known
                sent.append({"to": delivery["recipient"], "text": delivery["text"], "kind": delivery["kind"]})
        self.answer(200, {"provider_message_id": known})
        threading.Thread(target=report_delivered, args=(delivery["conversation"], delivery["seq"]), daemon=True).start()


def main():
    server = ThreadingHTTPServer((HOST, int(PORT)), Handler)
    print(f"adapter for channel {CHANNEL} listening on {HOST}:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
