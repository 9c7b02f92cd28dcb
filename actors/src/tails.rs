//! The newest history and feed entries of a shard, kept in memory after their records
//! are written, so that a socket woken for what was just applied reads it from here and
//! not from the record store (a range scan of the store per wake-up was a seventh of
//! the node's CPU at saturation, docs/benchmarks.md).
//!
//! What is cached is a copy of records that are never rewritten: a history entry and a
//! feed entry keep their content for good once written. Only a retention purge deletes
//! them, and a purge empties the cache. Entries reach the cache in the apply that makes
//! them (`Shard::apply`, as soon as it lets go of the state's write lock), so the cache
//! moves with the hot state: a reader that saw a conversation's `last_seq` finds the
//! entries up to it here (but for that instant), even before the entry's records are
//! written (they are committed: an apply never comes undone, and a process that stops
//! replays them). A key's cached run is always
//! consecutive sequence numbers ending at the newest entry applied for it. A read the
//! cache cannot answer whole (older entries, a key it dropped) goes to the store, so the
//! cache only ever saves work.
//!
//! Memory is bounded by bytes: entries go into the young generation; when it holds
//! `budget / 2` bytes it becomes the old generation (the previous old one is dropped)
//! and a new young one starts. A key found only in the old generation moves to the
//! young one when it grows. So at most `budget` bytes are held (estimated as each
//! entry's text plus a fixed overhead), and an entry stays at least as long as it took
//! to write `budget / 2` bytes after it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::model::{ConversationId, OperatorId};
use crate::state::{FeedEntry, FeedItem, HistoryEntry, HistoryItem};

/// Entries kept per conversation: a woken reader needs the last few.
const PER_KEY: usize = 8;
/// Entries kept per operator feed: a desk holding dozens of conversations finds many
/// new items at each wake-up under load, more than one conversation's few.
const PER_FEED: usize = 64;
/// Bytes the cache of one shard may hold (both generations, histories and feeds).
pub const BUDGET: usize = 4 << 20;
/// Bytes counted per entry besides its text (the entry, its queue slot, the map's).
const OVERHEAD: usize = 160;

/// Something cached under a key, in sequence.
trait Sequenced {
    fn seq(&self) -> u64;
    fn size(&self) -> usize;
}

impl Sequenced for HistoryEntry {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn size(&self) -> usize {
        history_size(&self.item)
    }
}

impl Sequenced for FeedEntry {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn size(&self) -> usize {
        match &self.item {
            FeedItem::Conversation { entry, .. } => history_size(&entry.item),
            _ => OVERHEAD,
        }
    }
}

/// An estimate of the memory a history entry holds.
fn history_size(item: &HistoryItem) -> usize {
    OVERHEAD
        + match item {
            HistoryItem::ClientMessage { key, text, attachments } => key.len() + text.len() + attachments.len() * OVERHEAD,
            HistoryItem::OperatorMessage { name, key, text, attachments, .. } => name.len() + key.len() + text.len() + attachments.len() * OVERHEAD,
            HistoryItem::Note { author, name, key, text } => author.len() + name.len() + key.len() + text.len(),
            HistoryItem::Notice { text } => text.len(),
            HistoryItem::BotMessage { key, text, buttons } => key.len() + text.len() + buttons.iter().map(String::len).sum::<usize>(),
            HistoryItem::Closed { resolution, tags, .. } => resolution.len() + tags.iter().map(String::len).sum::<usize>(),
            HistoryItem::Rated { comment, .. } => comment.len(),
            HistoryItem::Transferred { comment, .. } => comment.len(),
            HistoryItem::Handoff { reason, context, .. } => reason.len() + context.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
            HistoryItem::Started { visitor, .. } => visitor.name.len() + visitor.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
            HistoryItem::Assigned { name, .. } => name.len(),
            _ => 0,
        }
}

/// Two generations of runs of consecutive entries per key.
struct Runs<K, V> {
    /// Entries kept per key.
    per_key: usize,
    young: HashMap<K, VecDeque<V>>,
    old: HashMap<K, VecDeque<V>>,
    /// Estimated bytes in `young`.
    bytes: usize,
    /// Bytes at which `young` becomes `old`.
    half: usize,
}

impl<K: Hash + Eq + Clone, V: Sequenced + Clone> Runs<K, V> {
    fn new(per_key: usize, half: usize) -> Self {
        Runs { per_key, young: HashMap::new(), old: HashMap::new(), bytes: 0, half }
    }

    fn push(&mut self, key: &K, value: V) {
        self.bytes += value.size();
        let run = match self.young.get_mut(key) {
            Some(run) => run,
            None => {
                let run = self.old.remove(key).unwrap_or_default();
                self.bytes += run.iter().map(Sequenced::size).sum::<usize>();
                self.young.entry(key.clone()).or_insert(run)
            }
        };
        if run.back().is_some_and(|last| last.seq() + 1 != value.seq()) {
            run.clear();
        }
        run.push_back(value);
        if run.len() > self.per_key {
            run.pop_front();
        }
        if self.bytes > self.half {
            self.old = std::mem::take(&mut self.young);
            self.bytes = 0;
        }
    }

    /// The entries after `after`, at most `limit`, if the cache holds all of them.
    fn after(&self, key: &K, after: u64, limit: usize) -> Option<Vec<V>> {
        let run = self.young.get(key).or_else(|| self.old.get(key))?;
        let first = run.front()?.seq();
        if after + 1 < first {
            return None;
        }
        Some(run.iter().filter(|v| v.seq() > after).take(limit).cloned().collect())
    }

    fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.young.values().chain(self.old.values()).map(VecDeque::len).sum()
    }
}

/// What an apply adds to the cache.
pub(crate) enum Staged {
    History(ConversationId, HistoryEntry),
    Feed(OperatorId, FeedEntry),
    /// A purge deleted records: nothing cached before this point may be served.
    Clear,
}

/// The cache of one shard.
pub(crate) struct Tails {
    histories: Runs<ConversationId, HistoryEntry>,
    feeds: Runs<OperatorId, FeedEntry>,
}

impl Tails {
    pub(crate) fn new(budget: usize) -> Self {
        // Histories take three quarters: they are read by every socket of a conversation.
        Tails { histories: Runs::new(PER_KEY, budget * 3 / 8), feeds: Runs::new(PER_FEED, budget / 8) }
    }

    pub(crate) fn take(&mut self, staged: Vec<Staged>) {
        for item in staged {
            match item {
                Staged::History(id, entry) => self.histories.push(&id, entry),
                Staged::Feed(id, entry) => self.feeds.push(&id, entry),
                Staged::Clear => self.clear(),
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.histories.clear();
        self.feeds.clear();
    }

    pub(crate) fn history(&self, id: ConversationId, after: u64, limit: usize) -> Option<Vec<HistoryEntry>> {
        self.histories.after(&id, after, limit)
    }

    pub(crate) fn feed(&self, id: &OperatorId, after: u64, limit: usize) -> Option<Vec<FeedEntry>> {
        self.feeds.after(id, after, limit)
    }

    /// Entries held now.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.histories.entries() + self.feeds.entries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    fn message(seq: u64, text: &str) -> HistoryEntry {
        HistoryEntry { seq, at: Timestamp(seq), item: HistoryItem::ClientMessage { key: format!("k{seq}"), text: text.into(), attachments: Vec::new() } }
    }

    #[test]
    fn a_run_answers_only_what_it_holds_whole() {
        let mut tails = Tails::new(BUDGET);
        let c = ConversationId(7);
        assert!(tails.history(c, 0, 10).is_none(), "nothing cached: the store answers");
        for seq in 5..=7 {
            tails.take(vec![Staged::History(c, message(seq, "hi"))]);
        }
        let seqs = |v: Option<Vec<HistoryEntry>>| v.map(|v| v.iter().map(|e| e.seq).collect::<Vec<_>>());
        assert_eq!(seqs(tails.history(c, 4, 10)), Some(vec![5, 6, 7]));
        assert_eq!(seqs(tails.history(c, 5, 1)), Some(vec![6]));
        assert_eq!(seqs(tails.history(c, 7, 10)), Some(vec![]), "caught up");
        assert!(tails.history(c, 3, 10).is_none(), "entry 4 is not cached: the store answers");
        // A gap (entries written while the cache did not see them) starts a new run.
        tails.take(vec![Staged::History(c, message(9, "again"))]);
        assert!(tails.history(c, 7, 10).is_none());
        assert_eq!(seqs(tails.history(c, 8, 10)), Some(vec![9]));
        // At most PER_KEY entries per conversation.
        for seq in 10..30 {
            tails.take(vec![Staged::History(c, message(seq, "x"))]);
        }
        assert_eq!(seqs(tails.history(c, 29 - PER_KEY as u64, 100)).map(|v| v.len()), Some(PER_KEY));
        assert!(tails.history(c, 28 - PER_KEY as u64, 100).is_none());
        tails.take(vec![Staged::Clear]);
        assert!(tails.history(c, 28, 10).is_none(), "a purge empties the cache");
    }

    #[test]
    fn memory_stays_within_the_budget() {
        let budget = 64 << 10;
        let mut tails = Tails::new(budget);
        let text = "y".repeat(200);
        for id in 0..10_000u64 {
            tails.take(vec![Staged::History(ConversationId(id), message(1, &text))]);
        }
        let held = tails.entries() * (text.len() + 2 + OVERHEAD);
        assert!(held <= budget, "{held} bytes held for a budget of {budget}");
        // The newest entries are still there; the oldest went.
        assert!(tails.history(ConversationId(9_999), 0, 1).is_some());
        assert!(tails.history(ConversationId(0), 0, 1).is_none());
    }
}
