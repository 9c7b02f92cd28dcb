#!/usr/bin/env python3
"""A reference bot for Switchboard's Bot API (docs/channel-api.md, "Bots"), standard library only.

It greets each new conversation, echoes what the customer writes with a quick reply
"Talk to a person", and hands the conversation to the channel's skill group when the
customer asks for a person (or writes "operator"), with the reason and what it learned:
how many messages the customer wrote and the last one. "bye" closes the conversation.

Switchboard POSTs each event to this bot's URL, signed like the Channel API's outbound
deliveries; the bot answers 200 at once and acts afterwards, calling
``POST /api/bot/{channel}/messages``, ``…/handoff`` or ``…/close`` with its token.

Configuration, from the environment:

    SWITCHBOARD_URL      the private listener, e.g. http://127.0.0.1:8081
    SWITCHBOARD_CHANNEL  the channel id
    BOT_TOKEN            the bot token (shown once when the bot was set)
    BOT_SECRET           the signing secret (shown with it)
    BOT_LISTEN           host:port to serve on, e.g. 127.0.0.1:9100
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
TOKEN = os.environ["BOT_TOKEN"]
SECRET = os.environ["BOT_SECRET"].encode()
HOST, PORT = os.environ.get("BOT_LISTEN", "127.0.0.1:9100").rsplit(":", 1)

PERSON = "Talk to a person"
MAX_SIGNATURE_AGE = 300

lock = threading.Lock()
seen = set()  # delivery ids already acted on: Switchboard may deliver one again
written = {}  # conversation -> how many messages the customer wrote


def call(path, body):
    request = urllib.request.Request(
        f"{SWITCHBOARD}/api/bot/{CHANNEL}/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"},
    )
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as e:
            # 408: maybe not committed; sent again with the same key, which is harmless.
            if e.code < 500 and e.code != 408:
                sys.stderr.write(f"bot: {path} refused: {e.code} {e.read()!r}\n")
                return e.code
        except OSError:
            pass
        time.sleep(0.2 * (attempt + 1))
    return 0


def signature_ok(header, body):
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs(time.time() - t) > MAX_SIGNATURE_AGE:
        return False
    expected = hmac.new(SECRET, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


def act(event):
    conversation = event["conversation"]
    key = f"bot-{event['delivery_id']}"
    if event["event"] == "started":
        name = event["customer"]["name"] or "there"
        call("messages", {"conversation": conversation, "key": key, "text": f"Hello {name}! I am the assistant. What can I do for you?", "buttons": [PERSON]})
        return
    text = event["text"].strip()
    with lock:
        written[conversation] = written.get(conversation, 0) + 1
        count = written[conversation]
    if text.lower() in (PERSON.lower(), "operator"):
        call("handoff", {"conversation": conversation, "reason": "the customer asked for a person", "context": {"messages": str(count), "asked_with": text}})
    elif text.lower() == "bye":
        call("close", {"conversation": conversation, "resolution": "bot_resolved"})
    else:
        call("messages", {"conversation": conversation, "key": key, "text": f"You said: {text}", "buttons": [PERSON]})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("bot: " + (fmt % args) + "\n")

    def answer(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200 if self.path == "/healthz" else 404, {"ok": self.path == "/healthz"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > 64 * 1024:
            self.answer(413, {"error": "too large"})
            return
        body = self.rfile.read(length)
        if not signature_ok(self.headers.get("X-Switchboard-Signature", ""), body):
            self.answer(401, {"error": "bad signature"})
            return
        event = json.loads(body)
        with lock:
            fresh = event["delivery_id"] not in seen
            seen.add(event["delivery_id"])
        self.answer(200, {"ok": True})
        if fresh:
            threading.Thread(target=act, args=(event,), daemon=True).start()


def main():
    server = ThreadingHTTPServer((HOST, int(PORT)), Handler)
    print(f"bot for channel {CHANNEL} listening on {HOST}:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
