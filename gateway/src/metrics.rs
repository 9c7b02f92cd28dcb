//! Prometheus text exposition of the gateway's counters, written by hand: a few atomics
//! and one histogram do not justify a metrics framework in the dependency tree.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the commit latency histogram, in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    total: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
        self.total.fetch_add(1, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", self.counts[i].load(Relaxed));
        }
        let total = self.total.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub client_sessions_opened: AtomicU64,
    pub client_sessions_active: AtomicU64,
    pub operator_sessions_opened: AtomicU64,
    pub operator_sessions_active: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub error_frames: AtomicU64,
    pub rate_limited: AtomicU64,
    pub auth_failures: AtomicU64,
    pub commands_committed: AtomicU64,
    pub commands_rejected: AtomicU64,
    pub commit_latency: Histogram,
    pub connections_refused: AtomicU64,
    pub accepts_resent: AtomicU64,
    pub keyed_resent: AtomicU64,
    pub receipts_held: AtomicU64,
    pub receipts_matched_late: AtomicU64,
    pub receipts_dropped: AtomicU64,
    pub automatic_mail_dropped: AtomicU64,
}

impl Metrics {
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &str, &AtomicU64); 18] = [
            ("switchboard_connections_refused_total", "counter", "TCP connections closed at once: over the per-address or per-listener cap.", &self.connections_refused),
            ("switchboard_client_sessions_opened_total", "counter", "Client WebSocket sessions opened.", &self.client_sessions_opened),
            ("switchboard_client_sessions", "gauge", "Client WebSocket sessions open now.", &self.client_sessions_active),
            ("switchboard_operator_sessions_opened_total", "counter", "Operator WebSocket sessions opened.", &self.operator_sessions_opened),
            ("switchboard_operator_sessions", "gauge", "Operator WebSocket sessions open now.", &self.operator_sessions_active),
            ("switchboard_frames_received_total", "counter", "WebSocket frames received.", &self.frames_received),
            ("switchboard_frames_sent_total", "counter", "WebSocket frames sent.", &self.frames_sent),
            ("switchboard_error_frames_total", "counter", "Error frames sent.", &self.error_frames),
            ("switchboard_rate_limited_total", "counter", "Frames and requests refused by rate limits and budgets.", &self.rate_limited),
            ("switchboard_auth_failures_total", "counter", "Refused logins and tokens.", &self.auth_failures),
            ("switchboard_commands_committed_total", "counter", "Commands committed through Raft.", &self.commands_committed),
            ("switchboard_commands_rejected_total", "counter", "Commands refused by the core.", &self.commands_rejected),
            ("switchboard_accepts_resent_total", "counter", "Offer accepts sent again because the node could not say whether they committed.", &self.accepts_resent),
            ("switchboard_keyed_resent_total", "counter", "Keyed commands (messages, notes, inbound messages) tried again because the node could not say whether they committed, or could not reach the members that decide them.", &self.keyed_resent),
            ("switchboard_receipts_held_total", "counter", "Provider receipts (delivered, read, failed) that named a message whose send was not committed yet, held to be matched again.", &self.receipts_held),
            ("switchboard_receipts_matched_late_total", "counter", "Held provider receipts matched to their message once its send was committed.", &self.receipts_matched_late),
            ("switchboard_mail_automatic_dropped_total", "counter", "Inbound mails a machine sent (an out-of-office, a bounce, a list's mail) that answered no open conversation: taken and dropped, since a conversation they started would answer them and could loop.", &self.automatic_mail_dropped),
            ("switchboard_receipts_dropped_total", "counter", "Provider receipts given up: held 60 s without being matched and committed, dropped with their message when 10,000 are held, a fifth for one message, or with an empty id or one over 256 bytes.", &self.receipts_dropped),
        ];
        for (name, kind, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Relaxed));
        }
        self.commit_latency.render(
            "switchboard_commit_seconds",
            "Time from receiving a command to its commit and apply.",
            &mut out,
        );
        out.push_str(extra);
        out
    }
}
