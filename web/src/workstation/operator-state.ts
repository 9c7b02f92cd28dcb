/**
 * The operator workstation's state as a pure reducer over socket frames and UI actions.
 *
 * Two sequence spaces meet here: the operator's *feeds* (protocol 2: one per group of the
 * cluster, `r` for routing and `c0`, `c1`… for conversation shards, each numbered on its
 * own; the cursor of the last event processed in each resumes with ?cursor=) and each
 * conversation's own seq (history entries, used to dedupe entries that arrive both in a
 * history reply and as live events, or from two feeds).
 */
import { mergeBySeq, lastSeq } from '../shared/seq';
import type { Attachment } from '../shared/files';
import type { Key } from './strings';
import type { AdapterKind, Channel, Delivery, DeliveryStatus, Entry, FeedEvent, Hello, Offer, Presence } from './types';

/** Milliseconds left to answer an offer. Counted on the local clock from what was left
 *  by the server's clock when the offer arrived, so a browser clock that is off from the
 *  server's does not distort it, and never more than the offer's whole window. */
export function offerMsLeft(o: Offer, now: number): number {
  const left = o.receivedAt != null ? (o.leftAtReceipt ?? offerWindowMs(o)) - (now - o.receivedAt) : o.deadline - now;
  return Math.max(0, Math.min(left, offerWindowMs(o)));
}

/** Whole seconds left to answer, as the countdown shows them: never more than the window
 *  holds (a 30 s offer starts at 30, not 31). */
export function offerSecondsLeft(o: Offer, now: number): number {
  return Math.min(Math.ceil(offerMsLeft(o, now) / 1000), Math.floor(offerWindowMs(o) / 1000));
}

/** How long the offer's customer has waited so far, on the local clock from arrival. */
export function offerWaitedMs(o: Offer, now: number): number | null {
  if (o.waitedAtReceipt == null || o.receivedAt == null) return null;
  return o.waitedAtReceipt + Math.max(0, now - o.receivedAt);
}

/** If `c` came to `me` by a transfer, who sent it (display name when the history has it)
 *  and their note. The handover that counts is the latest `assigned` or `transferred`;
 *  entries after it (the visitor writing on) do not hide it. */
export function transferToMe(c: Conv, me: string): { from: string; comment: string } | null {
  for (let i = c.entries.length - 1; i >= 0; i--) {
    const e = c.entries[i];
    if (e.kind === 'assigned' && e.operator === me) continue;
    if (e.kind !== 'transferred' && e.kind !== 'assigned') continue;
    if (e.kind !== 'transferred' || e.to_operator !== me) return null;
    const from = e.from ?? '';
    const named = c.entries.find((x) => (x.kind === 'assigned' || x.kind === 'message') && x.operator === from && x.name);
    return { from: named?.name ?? from, comment: e.comment ?? '' };
  }
  return null;
}

/** Whether the conversation's history already says it is `me`'s (its `assigned` or a
 *  `transferred` to `me`). On a split cluster the entries that say so may come a
 *  moment after the routing feed's `assigned`. */
export function historySaysMine(c: Conv, me: string): boolean {
  // The latest entry that hands the conversation to someone: an earlier episode with
  // the same operator does not count.
  for (let i = c.entries.length - 1; i >= 0; i--) {
    const e = c.entries[i];
    if (e.kind === 'assigned' || e.kind === 'transferred') return e.kind === 'assigned' ? e.operator === me : e.to_operator === me;
  }
  return false;
}

/** The whole answer window of an offer (deadline minus when it was made). */
export function offerWindowMs(o: Offer): number {
  const made = o.at ?? o.made_at;
  return made != null ? Math.max(0, o.deadline - made) : 30000;
}

export interface Conv {
  id: number;
  entries: readonly Entry[];
  /** Client messages the operator has not looked at yet. */
  unread: number;
  /** Highest conversation seq the operator has seen. */
  seenSeq: number;
  /** Highest seq the visitor has read (from ephemeral read frames). */
  clientReadUpto: number;
  /** Until when to show "visitor is typing" (ms since epoch). */
  typingUntil: number;
  /** Whether the full history is known (an assigned event or a history reply arrived). */
  loaded: boolean;
  visitor: string;
  channel: string;
  attributes: Record<string, string>;
  group: string;
  /** When the oldest client message still without an operator reply was written. */
  waitingSince: number | null;
  lastAt: number;
  assignedAt: number;
  /** Messenger conversations: what became of each entry sent to the customer, by seq. */
  outbox: Readonly<Record<number, Outbox>>;
}

/** An outbox entry's status as last told (a feed event or the conversation's REST view),
 *  with when it was (server clock): an older report never overwrites a newer one. */
export interface Outbox {
  status: DeliveryStatus;
  reason: string;
  at: number;
}

export interface PendingMessage {
  key: string;
  conversation: number;
  text: string;
  attachments: Attachment[];
  at: number;
  state: 'sending' | 'failed';
  error?: string;
}

export interface Me {
  operator: string;
  name: string;
  capacity: number;
  groups: string[];
}

export interface OpState {
  me: Me | null;
  presence: Presence;
  presenceSince: number;
  /** Last processed seq of each feed; null before the first hello or after a reset. */
  cursor: Readonly<Record<string, number>> | null;
  /** Conversations released from us lately: entries of theirs that a conversation shard's
   *  feed brings after the release (feeds are not ordered with each other) are dropped. */
  released: readonly number[];
  /** How many releases this desk has seen (what follows the desk's releases reloads on
   *  it: the list above stops growing at its limit). */
  releases: number;
  offers: readonly Offer[];
  convs: ReadonlyMap<number, Conv>;
  selected: number | null;
  /** Whether the page is visible and focused (new entries in the open conversation count as seen). */
  viewing: boolean;
  pending: Readonly<Record<string, PendingMessage>>;
  /** Replies not taken before their conversation left this desk (reassigned, closed or
   *  transferred meanwhile): shown until dismissed, so their text is not lost. */
  unsent: readonly PendingMessage[];
  /** A hello snapshot taken ahead of our resume point, applied once the replay reaches it. */
  reconcile: Hello | null;
  /** Conversations whose history must be requested. */
  needHistory: readonly number[];
  /** Offers that arrived and were not announced yet (for aria-live and sounds). */
  lastOfferAt: number;
  /** An offer ran out unanswered here and the server set us away for it: the desk says
   *  so until the operator changes their status. */
  awayAfterMiss: boolean;
  /** Why the server set our presence (`disconnected`: no desk was connected for the
   *  grace period), until the operator sets one themselves. */
  presenceReason: string | null;
  /** The configured pause reasons (from hello). */
  pauseReasons: string[];
  /** Wrap-up after a close: no offer until then (server clock, ms); null when not. */
  wrapUpUntil: number | null;
  /** The server's clock minus ours when the last hello came (for wrap-up countdowns). */
  clockSkew: number;
  /** When the last offer ran out unanswered (its event's time), until the next presence event. */
  missedAt?: number;
}

export const initialOpState: OpState = {
  me: null,
  presence: 'offline',
  presenceSince: 0,
  cursor: null,
  released: [],
  unsent: [],
  releases: 0,
  offers: [],
  convs: new Map(),
  selected: null,
  viewing: true,
  pending: {},
  reconcile: null,
  needHistory: [],
  lastOfferAt: 0,
  awayAfterMiss: false,
  presenceReason: null,
  wrapUpUntil: null,
  clockSkew: 0,
  pauseReasons: [],
};

export type OpAction =
  | { type: 'hello'; hello: Hello; now: number }
  | { type: 'event'; event: FeedEvent; now?: number }
  | { type: 'history'; conversation: number; entries: Entry[]; clientReadUpto?: number }
  | { type: 'typing'; conversation: number; now: number }
  | { type: 'read'; conversation: number; by: string; upto: number }
  | { type: 'select'; conversation: number | null }
  | { type: 'offerPreview'; offer: number; preview: string }
  | { type: 'viewing'; viewing: boolean }
  | { type: 'queueSend'; message: PendingMessage }
  | { type: 'ack'; key: string; conversation: number; seq: number }
  | { type: 'sendFailed'; key: string; error: string }
  | { type: 'discard'; key: string }
  /** The operator read (and copied) the replies their released conversations did not take. */
  | { type: 'dismissUnsent' }
  | { type: 'historyRequested'; conversation: number }
  /** The outbox entries of `GET /api/conversations/{id}` (statuses when it was opened). */
  | { type: 'deliveries'; conversation: number; deliveries: Delivery[] }
  | { type: 'reset' };

export function emptyConv(id: number): Conv {
  return {
    id,
    entries: [],
    unread: 0,
    seenSeq: 0,
    clientReadUpto: 0,
    typingUntil: 0,
    loaded: false,
    visitor: '',
    channel: '',
    attributes: {},
    group: '',
    waitingSince: null,
    lastAt: 0,
    assignedAt: 0,
    outbox: {},
  };
}

/** When the visitor started waiting: the first client message after the last answer (an
 *  operator's, or the bot's before it handed the conversation over). */
export function waitingSinceOf(entries: readonly Entry[]): number | null {
  let since: number | null = null;
  for (let i = entries.length - 1; i >= 0; i--) {
    const e = entries[i];
    if (e.kind !== 'message') continue;
    if (e.from === 'operator' || e.from === 'bot') break;
    if (e.from === 'client') since = e.at;
  }
  return since;
}

export function countUnread(entries: readonly Entry[], seenSeq: number): number {
  let n = 0;
  for (let i = entries.length - 1; i >= 0 && entries[i].seq > seenSeq; i--) {
    if (entries[i].kind === 'message' && entries[i].from === 'client') n++;
  }
  return n;
}

/** Merges entries into a conversation and recomputes the derived fields. */
export function withEntries(c: Conv, incoming: readonly Entry[], seen: boolean): Conv {
  const entries = mergeBySeq(c.entries, incoming);
  if (entries === c.entries) return c;
  const next: Conv = { ...c, entries };
  for (const e of incoming) {
    if (e.kind === 'started') {
      next.channel = e.channel ?? next.channel;
      if (e.visitor) {
        next.visitor = e.visitor.name ?? next.visitor;
        next.attributes = e.visitor.attributes ?? next.attributes;
      }
    } else if (e.kind === 'queued' && e.group) {
      next.group = e.group;
    } else if (e.kind === 'assigned') {
      next.assignedAt = Math.max(next.assignedAt, e.at);
    } else if (e.kind === 'transferred' && e.to_group) {
      next.group = e.to_group;
    } else if (e.kind === 'message' && e.from === 'client') {
      next.typingUntil = 0;
    }
  }
  next.lastAt = entries[entries.length - 1].at;
  next.waitingSince = waitingSinceOf(entries);
  if (seen) next.seenSeq = lastSeq(entries);
  next.unread = countUnread(entries, next.seenSeq);
  return next;
}

/** Records outbox statuses of a conversation; of two reports on one entry the later
 *  one counts (a status read over REST may arrive after a newer feed event). */
export function withOutbox(c: Conv, reports: readonly ({ seq: number } & Outbox)[]): Conv {
  let outbox: Record<number, Outbox> | null = null;
  for (const { seq, status, reason, at } of reports) {
    const known = (outbox ?? c.outbox)[seq];
    if (known && (known.at > at || (known.at === at && known.status === status && known.reason === reason))) continue;
    outbox = outbox ?? { ...c.outbox };
    outbox[seq] = { status, reason, at };
  }
  return outbox ? { ...c, outbox } : c;
}

function setConv(s: OpState, c: Conv): OpState {
  const convs = new Map(s.convs);
  convs.set(c.id, c);
  return { ...s, convs };
}

function isSeen(s: OpState, id: number): boolean {
  return s.selected === id && s.viewing;
}

function addHistoryNeed(list: readonly number[], id: number): readonly number[] {
  return list.includes(id) ? list : [...list, id];
}

/** The feed positions a hello names: protocol 2's cursor, or protocol 1's one seq. */
export function helloCursor(h: Hello): Record<string, number> {
  return h.cursor ?? { r: h.seq ?? 0 };
}

/** The routing feed's position (the one a hello snapshot is taken with). */
export function routingSeq(s: OpState): number | null {
  return s.cursor == null ? null : (s.cursor.r ?? 0);
}

/** Where the server continues each feed after a hello answering a resume from `ours`:
 *  after our point, or after its newest for a point ahead of it; from its start for a
 *  feed we did not name. */
function resumedCursor(ours: Readonly<Record<string, number>>, theirs: Record<string, number>): Record<string, number> {
  const next: Record<string, number> = {};
  for (const [feed, newest] of Object.entries(theirs)) next[feed] = Math.min(ours[feed] ?? 0, newest);
  return next;
}

/** How many released conversations are remembered. */
const RELEASED_KEPT = 200;

/** Replaces offers and conversations by a hello snapshot, keeping what we already know. */
function applySnapshot(s: OpState, hello: Hello, now: number): OpState {
  const convs = new Map<number, Conv>();
  let needHistory: readonly number[] = s.needHistory.filter((id) => hello.active.includes(id));
  for (const id of hello.active) {
    const known = s.convs.get(id);
    convs.set(id, known ?? emptyConv(id));
    if (!known || !known.loaded) needHistory = addHistoryNeed(needHistory, id);
  }
  // Read marks are committed on the server: a reconnect or reload keeps the ✓✓.
  for (const mark of hello.read_marks ?? []) {
    const c = convs.get(mark.conversation);
    if (c && mark.client_read_upto > c.clientReadUpto) convs.set(c.id, { ...c, clientReadUpto: mark.client_read_upto });
  }
  const offers = hello.offers.map((o) => {
    const known = s.offers.find((x) => x.offer === o.offer);
    // An offer first seen in a snapshot counts down from what the server's clock left it.
    const serverNow = hello.now ?? now;
    const fresh =
      known?.receivedAt == null
        ? { receivedAt: now, leftAtReceipt: o.deadline - serverNow, waitedAtReceipt: o.waiting_since != null ? Math.max(0, serverNow - o.waiting_since) : undefined }
        : {};
    return { ...(known ?? {}), ...o, ...fresh };
  });
  // Replies to conversations no longer held (they left while this desk was away) go to
  // the unsent list, as on a release: sent now they would be refused.
  const pending: Record<string, PendingMessage> = {};
  const unsent = [...s.unsent];
  for (const [k, p] of Object.entries(s.pending)) {
    if (convs.has(p.conversation)) pending[k] = p;
    else if (p.text.trim() || p.attachments.length) unsent.push(p);
  }
  const selected = s.selected != null && convs.has(s.selected) ? s.selected : null;
  return { ...s, convs, offers, selected, needHistory, pending, unsent: unsent.slice(-20), reconcile: null };
}

function applyEvent(s: OpState, ev: FeedEvent, now?: number): OpState {
  switch (ev.kind) {
    case 'offer': {
      if (ev.offer == null || ev.conversation == null) return s;
      if (s.offers.some((o) => o.offer === ev.offer)) return s;
      const deadline = ev.deadline ?? ev.at + 30000;
      // The server's time now: this browser's clock corrected by the hello's `now`; the
      // event's own time when the arrival time is not known.
      const serverNow = now != null ? Math.max(ev.at, now + s.clockSkew) : ev.at;
      const offer: Offer = {
        offer: ev.offer,
        conversation: ev.conversation,
        group: ev.group ?? '',
        deadline,
        visitor: ev.visitor,
        at: ev.at,
        receivedAt: now,
        // What is left by the server's clock when the frame arrived (an offer replayed
        // after a reconnect, or held up on the way, has less left than its window).
        leftAtReceipt: Math.max(0, Math.min(deadline - ev.at, deadline - serverNow)),
        channel: ev.channel,
        preview: ev.preview,
        waiting_since: ev.waiting_since,
        waitedAtReceipt: ev.waiting_since != null ? Math.max(0, serverNow - ev.waiting_since) : undefined,
      };
      return { ...s, offers: [...s.offers, offer], lastOfferAt: ev.at };
    }
    case 'offer_withdrawn': {
      const offers = s.offers.filter((o) => o.offer !== ev.offer);
      // Missed: if the server sets us away for it, the presence event follows.
      return ev.reason === 'expired' ? { ...s, offers, missedAt: ev.at } : { ...s, offers };
    }
    case 'assigned': {
      const id = ev.conversation!;
      // Protocol 2: a conversation shard's `assigned` (feed `c…`) brings the entries of
      // an assignment it wrote (a transfer's) and gives nothing back: for a conversation
      // released from us it is the assignment the release undid (feeds are not ordered
      // with each other), dropped; only the routing feed's `assigned` gives it back.
      const fromShard = ev.feed != null && ev.feed !== 'r';
      if (fromShard && !s.convs.has(id) && s.released.includes(id)) return s;
      // Given back after a release: the shard's `assigned` with the entries written
      // since may have been dropped above, so the history is read whole.
      const again = !fromShard && !s.convs.has(id) && s.released.includes(id);
      const offers = s.offers.filter((o) => o.conversation !== id);
      if (s.released.includes(id) && !fromShard) s = { ...s, released: s.released.filter((x) => x !== id) };
      const c = withEntries({ ...(s.convs.get(id) ?? emptyConv(id)), loaded: true, assignedAt: ev.at }, ev.history ?? [], false);
      const needHistory = again ? addHistoryNeed(s.needHistory, id) : s.needHistory.filter((x) => x !== id);
      let next: OpState = { ...setConv(s, c), offers, needHistory };
      if (next.selected == null) next = select(next, id);
      return next;
    }
    case 'conversation': {
      const id = ev.conversation!;
      if (!ev.entry) return s;
      const known = s.convs.get(id);
      // Released already: its last entries (closed, transferred) come after the release.
      if (!known && s.released.includes(id)) return s;
      // Nor does an entry that ends it here bring back one this desk does not hold (after a
      // fresh hello the list of releases is empty, and a shard feed's `closed` may come
      // after the routing feed's release): it would stay, never closable, taking room.
      if (!known && (ev.entry.kind === 'closed' || (ev.entry.kind === 'transferred' && ev.entry.to_operator !== s.me?.operator))) return s;
      const c = withEntries(known ?? emptyConv(id), [ev.entry], isSeen(s, id));
      let next = c === known ? s : setConv(s, c);
      if (!known) next = { ...next, needHistory: addHistoryNeed(next.needHistory, id) };
      // Our own message is committed: it is no longer pending.
      if (ev.entry.kind === 'message' && ev.entry.key && next.pending[ev.entry.key]) {
        const pending = { ...next.pending };
        delete pending[ev.entry.key];
        next = { ...next, pending };
      }
      return next;
    }
    case 'released': {
      const id = ev.conversation!;
      const released = [...s.released.filter((x) => x !== id), id].slice(-RELEASED_KEPT);
      const releases = s.releases + 1;
      if (!s.convs.has(id)) return { ...s, released, releases };
      const convs = new Map(s.convs);
      convs.delete(id);
      const pending: Record<string, PendingMessage> = {};
      const unsent = [...s.unsent];
      for (const [k, p] of Object.entries(s.pending)) {
        if (p.conversation !== id) pending[k] = p;
        else if (p.text.trim() || p.attachments.length) unsent.push(p);
      }
      return {
        ...s,
        convs,
        pending,
        unsent: unsent.slice(-20),
        released,
        releases,
        selected: s.selected === id ? null : s.selected,
        needHistory: s.needHistory.filter((x) => x !== id),
      };
    }
    case 'delivery': {
      const c = ev.conversation != null ? s.convs.get(ev.conversation) : undefined;
      if (!c || typeof ev.entry_seq !== 'number' || !ev.status) return s;
      const next = withOutbox(c, [{ seq: ev.entry_seq, status: ev.status as DeliveryStatus, reason: ev.reason ?? '', at: ev.at }]);
      return next === c ? s : setConv(s, next);
    }
    case 'wrap_up':
      return { ...s, wrapUpUntil: typeof ev.until === 'number' ? ev.until : null };
    case 'configured': {
      if (!s.me) return s;
      const me: Me = { ...s.me, name: ev.name ?? s.me.name, capacity: ev.capacity ?? s.me.capacity, groups: ev.groups ?? s.me.groups };
      return { ...s, me };
    }
    case 'presence': {
      if (!ev.status) return s;
      // Away in the same entry as a missed offer (the same time): that is why.
      const missed = ev.status === 'away' && s.missedAt != null && ev.at === s.missedAt;
      return {
        ...s,
        presence: ev.status as Presence,
        presenceSince: ev.at ?? s.presenceSince,
        awayAfterMiss: missed || (ev.status === 'away' && s.awayAfterMiss),
        presenceReason: ev.reason ?? null,
        missedAt: undefined,
      };
    }
    default:
      return s;
  }
}

function select(s: OpState, id: number | null): OpState {
  if (id == null) return { ...s, selected: null };
  const c = s.convs.get(id);
  if (!c) return { ...s, selected: null };
  const next = { ...s, selected: id };
  if (!s.viewing) return next;
  return markSeen(next, id);
}

function markSeen(s: OpState, id: number): OpState {
  const c = s.convs.get(id);
  if (!c) return s;
  const seq = lastSeq(c.entries);
  if (c.seenSeq >= seq && c.unread === 0) return s;
  return setConv(s, { ...c, seenSeq: seq, unread: 0 });
}

export function opReducer(s: OpState, a: OpAction): OpState {
  switch (a.type) {
    case 'hello': {
      const h = a.hello;
      const me: Me = { operator: h.operator, name: h.name, capacity: h.capacity, groups: h.groups };
      const base: OpState = {
        ...s,
        me,
        presence: h.presence,
        awayAfterMiss: h.presence === 'away' && s.awayAfterMiss,
        presenceReason: h.presence_reason ?? null,
        wrapUpUntil: h.wrap_up_until ?? null,
        pauseReasons: Array.isArray(h.pause_reasons) ? h.pause_reasons : [],
        clockSkew: typeof h.now === 'number' ? h.now - a.now : s.clockSkew,
        presenceSince: h.presence_since ?? (s.presence === h.presence && s.presenceSince ? s.presenceSince : (h.now ?? a.now)),
      };
      const theirs = helloCursor(h);
      const ours = s.cursor;
      if (ours == null) {
        // Fresh start: the snapshot is the truth and every feed continues after it.
        return { ...applySnapshot(base, h, a.now), cursor: theirs };
      }
      const cursor = resumedCursor(ours, theirs);
      if ((theirs.r ?? 0) <= (ours.r ?? 0)) {
        // Caught up, or the server ignored a routing point ahead of its feed: the
        // snapshot is the truth and that feed continues after it.
        return { ...applySnapshot(base, h, a.now), cursor };
      }
      // Routing events (ours.r, theirs.r] are about to be replayed; reconcile when they are in.
      return { ...base, cursor, reconcile: h };
    }
    case 'event': {
      const ev = a.event;
      const feed = ev.feed ?? 'r';
      if (s.cursor != null && ev.seq <= (s.cursor[feed] ?? 0)) return s; // replayed twice: drop
      let next: OpState = { ...applyEvent(s, ev, a.now), cursor: { ...(s.cursor ?? {}), [feed]: ev.seq } };
      // A reply listed as not sent turns out committed (its entry came after all).
      const key = ev.entry?.key;
      if (key && next.unsent.some((p) => p.key === key)) next = { ...next, unsent: next.unsent.filter((p) => p.key !== key) };
      if (next.reconcile && feed === 'r' && ev.seq >= (helloCursor(next.reconcile).r ?? 0)) next = applySnapshot(next, next.reconcile, a.now ?? Date.now());
      return next;
    }
    case 'offerPreview': {
      // The first words count: a preview already shown stays.
      if (!s.offers.some((o) => o.offer === a.offer && !o.preview)) return s;
      return { ...s, offers: s.offers.map((o) => (o.offer === a.offer && !o.preview ? { ...o, preview: a.preview } : o)) };
    }
    case 'history': {
      const known = s.convs.get(a.conversation);
      if (!known) return s;
      const readUpto = Math.max(known.clientReadUpto, a.clientReadUpto ?? 0);
      const c = withEntries({ ...known, loaded: true, clientReadUpto: readUpto }, a.entries, isSeen(s, a.conversation));
      let next = setConv(s, c);
      // Pending messages whose entries arrived are delivered.
      const keys = new Set(a.entries.filter((e) => e.kind === 'message' && e.key).map((e) => e.key!));
      if (Object.keys(s.pending).some((k) => keys.has(k))) {
        const pending: Record<string, PendingMessage> = {};
        for (const [k, p] of Object.entries(s.pending)) if (!keys.has(k)) pending[k] = p;
        next = { ...next, pending };
      }
      return { ...next, needHistory: next.needHistory.filter((x) => x !== a.conversation) };
    }
    case 'historyRequested':
      return { ...s, needHistory: s.needHistory.filter((x) => x !== a.conversation) };
    case 'deliveries': {
      const c = s.convs.get(a.conversation);
      if (!c) return s;
      const next = withOutbox(
        c,
        a.deliveries.map((d) => ({ seq: d.seq, status: d.status, reason: d.reason ?? '', at: d.updated_at })),
      );
      return next === c ? s : setConv(s, next);
    }
    case 'typing': {
      const c = s.convs.get(a.conversation);
      if (!c) return s;
      return setConv(s, { ...c, typingUntil: a.now + 4000 });
    }
    case 'read': {
      const c = s.convs.get(a.conversation);
      if (!c || a.by !== 'client' || a.upto <= c.clientReadUpto) return s;
      return setConv(s, { ...c, clientReadUpto: a.upto });
    }
    case 'select':
      return select(s, a.conversation);
    case 'viewing': {
      const next = { ...s, viewing: a.viewing };
      return a.viewing && s.selected != null ? markSeen(next, s.selected) : next;
    }
    case 'queueSend':
      return { ...s, pending: { ...s.pending, [a.message.key]: a.message } };
    case 'ack': {
      // Taken after all (its answer came after the conversation left this desk).
      if (!s.pending[a.key]) return s.unsent.some((p) => p.key === a.key) ? { ...s, unsent: s.unsent.filter((p) => p.key !== a.key) } : s;
      // Committed. The entry itself arrives as a conversation event (either order); keep
      // the message visible as pending-delivered until then by synthesizing the entry.
      const p = s.pending[a.key];
      const pending = { ...s.pending };
      delete pending[a.key];
      const c = s.convs.get(a.conversation);
      let next: OpState = { ...s, pending };
      if (c && !c.entries.some((e) => e.seq === a.seq)) {
        const entry: Entry = {
          kind: 'message',
          seq: a.seq,
          at: p.at,
          from: 'operator',
          key: a.key,
          text: p.text,
          name: s.me?.name,
          operator: s.me?.operator,
          attachments: p.attachments.length ? p.attachments : undefined,
        };
        next = setConv(next, withEntries(c, [entry], isSeen(s, a.conversation)));
      }
      return next;
    }
    case 'sendFailed': {
      const p = s.pending[a.key];
      if (!p) return s;
      return { ...s, pending: { ...s.pending, [a.key]: { ...p, state: 'failed', error: a.error } } };
    }
    case 'dismissUnsent':
      return s.unsent.length ? { ...s, unsent: [] } : s;
    case 'discard': {
      if (!s.pending[a.key]) return s;
      const pending = { ...s.pending };
      delete pending[a.key];
      return { ...s, pending };
    }
    case 'reset':
      return { ...initialOpState, viewing: s.viewing, pending: s.pending, unsent: s.unsent, me: s.me };
    default:
      return s;
  }
}

/** Conversations for the list: waiting visitors first (longest wait first), then most recent activity. */
export function sortedConvs(s: OpState): Conv[] {
  return [...s.convs.values()].sort((a, b) => {
    if (a.waitingSince != null && b.waitingSince != null) return a.waitingSince - b.waitingSince || a.id - b.id;
    if (a.waitingSince != null) return -1;
    if (b.waitingSince != null) return 1;
    return b.lastAt - a.lastAt || b.id - a.id;
  });
}

export function totalUnread(s: OpState): number {
  let n = 0;
  for (const c of s.convs.values()) n += c.unread;
  return n;
}

/** Pending (not yet committed) messages of one conversation, oldest first. */
export function pendingOf(s: OpState, conversation: number): PendingMessage[] {
  return Object.values(s.pending)
    .filter((p) => p.conversation === conversation)
    .sort((a, b) => a.at - b.at);
}

/** The mark next to one of our entries: `state` names its style (`delivery-<state>`),
 *  `label` says it in words; `loud` marks show the words (and `detail`) on screen, not
 *  only to screen readers and in the tooltip. */
export interface DeliveryMark {
  state: 'sending' | 'sent' | 'delivered' | 'read' | 'retrying' | 'failed' | 'unknown';
  glyph: string;
  label: Key;
  /** The outbox status it stands for (messenger conversations only). */
  status?: DeliveryStatus;
  /** Why it failed or is retried, as the server said (in the tooltip). */
  reason?: string;
  loud?: boolean;
  /** What a loud mark shows after its label: why it was not delivered. */
  detail?: string;
}

const OUTBOX_MARKS: Record<DeliveryStatus, DeliveryMark> = {
  pending: { state: 'sending', glyph: '…', label: 'delivery_sending' },
  sending: { state: 'sending', glyph: '…', label: 'delivery_sending' },
  sent: { state: 'sent', glyph: '✓', label: 'delivery_sent' },
  delivered: { state: 'delivered', glyph: '✓✓', label: 'delivery_delivered' },
  read: { state: 'read', glyph: '✓✓', label: 'delivery_read' },
  failed: { state: 'failed', glyph: '⚠', label: 'delivery_undelivered', loud: true },
  unknown: { state: 'unknown', glyph: '?', label: 'delivery_unknown', loud: true },
};

/** The mark for an outbox status: a pending entry with a reason failed once and is
 *  being retried; a status this desk does not know is shown as still on its way. */
export function outboxMark(o: Outbox | undefined): DeliveryMark {
  if (!o) return OUTBOX_MARKS.pending;
  if (o.status === 'pending' && o.reason) return { state: 'retrying', glyph: '↻', label: 'delivery_retrying', status: o.status, reason: o.reason, loud: true };
  const mark = OUTBOX_MARKS[o.status] ?? OUTBOX_MARKS.pending;
  const reason = o.reason || undefined;
  return { ...mark, status: o.status, reason, detail: o.status === 'failed' ? reason : undefined };
}

/**
 * The mark next to an entry of ours. In the web chat, our messages: written (✓) or read
 * by the visitor (✓✓). In a messenger conversation, what the outbox made of our messages
 * (on their way until the first status comes) and of automatic notices it sent; nothing
 * for a notice the outbox does not hold.
 */
export function deliveryOf(c: Conv, e: Entry, messenger = false): DeliveryMark | undefined {
  if (messenger) return e.kind === 'message' || c.outbox[e.seq] ? outboxMark(c.outbox[e.seq]) : undefined;
  if (e.kind !== 'message') return undefined;
  return c.clientReadUpto >= e.seq ? { state: 'read', glyph: '✓✓', label: 'delivery_read' } : { state: 'delivered', glyph: '✓', label: 'delivery_delivered' };
}

/** Whether a channel's conversations go out through an adapter (a messenger) rather
 *  than the web chat: a channel this desk does not know counts as the web chat. */
export function isMessenger(channels: readonly Channel[] | null, id: string): boolean {
  const c = channels?.find((x) => x.id === id);
  return !!c && (c.adapter != null || c.kind !== 'web');
}

/** The adapter a channel's conversations go out through (null: none, the web chat, or a
 *  channel this desk does not know): what its customers can be sent depends on it. */
export function adapterOf(channels: readonly Channel[] | null, id: string): AdapterKind | null {
  return channels?.find((x) => x.id === id)?.adapter ?? null;
}

/** Whole seconds of wrap-up left at local time `now` (0 when none or over). */
export function wrapUpSecondsLeft(s: Pick<OpState, 'wrapUpUntil' | 'clockSkew'>, now: number): number {
  if (s.wrapUpUntil == null) return 0;
  return Math.max(0, Math.ceil((s.wrapUpUntil - (now + s.clockSkew)) / 1000));
}
