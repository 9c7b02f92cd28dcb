import { describe, expect, it } from 'vitest';
import {
  initialOpState,
  opReducer,
  sortedConvs,
  totalUnread,
  pendingOf,
  deliveryOf,
  isMessenger,
  adapterOf,
  outboxMark,
  waitingSinceOf,
  countUnread,
  type OpAction,
  type OpState,
} from '../src/workstation/operator-state';
import type { Channel, Delivery, Entry, FeedEvent, Hello } from '../src/workstation/types';

const hello = (over: Partial<Hello> = {}): Hello => ({
  type: 'hello',
  operator: 'alice',
  name: 'Alice',
  capacity: 2,
  groups: ['general'],
  presence: 'online',
  presence_since: 1000,
  active: [],
  offers: [],
  seq: 10,
  protocol: 1,
  ...over,
});
const run = (s: OpState, ...actions: OpAction[]) => actions.reduce(opReducer, s);
const ev = (seq: number, kind: string, extra: Partial<FeedEvent> = {}): OpAction => ({ type: 'event', event: { type: 'event', kind, seq, at: 1000 + seq, ...extra } as FeedEvent });
const started: Entry = { kind: 'started', seq: 1, at: 1, channel: 'web', visitor: { name: 'Dana', attributes: { email: 'd@example.com' } } };
const queued: Entry = { kind: 'queued', seq: 2, at: 2, group: 'general' };
const clientMsg = (seq: number, text = 'hi', at = seq * 100): Entry => ({ kind: 'message', seq, at, from: 'client', key: 'k' + seq, text });
const opMsg = (seq: number, key = 'op-' + seq, at = seq * 100): Entry => ({ kind: 'message', seq, at, from: 'operator', key, text: 'hello', name: 'Alice', operator: 'alice' });
const assignedEntry = (seq: number): Entry => ({ kind: 'assigned', seq, at: seq * 100, name: 'Alice', operator: 'alice' });

function assigned(feedSeq: number, conv: number, history: Entry[]) {
  return ev(feedSeq, 'assigned', { conversation: conv, history, history_upto: history[history.length - 1].seq });
}

describe('operator state', () => {
  it('takes a fresh hello as the truth and asks for histories', () => {
    const s = run(initialOpState, { type: 'hello', hello: hello({ active: [7, 8], offers: [{ offer: 3, conversation: 9, group: 'general', deadline: 99 }] }), now: 5000 });
    expect(s.cursor?.r).toBe(10);
    expect([...s.convs.keys()]).toEqual([7, 8]);
    expect(s.needHistory).toEqual([7, 8]);
    expect(s.offers.map((o) => o.offer)).toEqual([3]);
    expect(s.presenceSince).toBe(1000);
    expect(s.me?.name).toBe('Alice');
  });

  it('restores the visitor read marks from hello and history after a reconnect', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello({ active: [7, 8], read_marks: [{ conversation: 7, client_read_upto: 4, operator_read_upto: 3 }] }), now: 5000 });
    expect(s.convs.get(7)?.clientReadUpto).toBe(4);
    expect(s.convs.get(8)?.clientReadUpto).toBe(0);
    s = run(s, { type: 'history', conversation: 8, entries: [started, queued, clientMsg(3)], clientReadUpto: 2 });
    expect(s.convs.get(8)?.clientReadUpto).toBe(2);
    // A mark never moves back, whichever source is older.
    s = run(s, { type: 'history', conversation: 7, entries: [started, queued, clientMsg(3)], clientReadUpto: 1 });
    expect(s.convs.get(7)?.clientReadUpto).toBe(4);
  });

  it('adds and withdraws offers; an assignment clears the offer', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, ev(11, 'offer', { offer: 5, conversation: 17, group: 'general', deadline: 50_000, visitor: 'Dana' }));
    expect(s.offers).toHaveLength(1);
    expect(s.offers[0].visitor).toBe('Dana');
    s = run(s, ev(12, 'offer', { offer: 6, conversation: 18, group: 'general', deadline: 50_000 }), ev(13, 'offer_withdrawn', { offer: 6, conversation: 18, reason: 'expired' }));
    expect(s.offers.map((o) => o.offer)).toEqual([5]);
    s = run(s, assigned(14, 17, [started, queued, clientMsg(3), assignedEntry(4)]));
    expect(s.offers).toHaveLength(0);
    const c = s.convs.get(17)!;
    expect(c.visitor).toBe('Dana');
    expect(c.attributes.email).toBe('d@example.com');
    expect(c.loaded).toBe(true);
    expect(c.entries.map((e) => e.seq)).toEqual([1, 2, 3, 4]);
    expect(s.selected).toBe(17); // first conversation opens by itself
  });

  it('drops feed events it has already processed (resume replays)', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, ev(11, 'offer', { offer: 5, conversation: 17, group: 'g', deadline: 1 }));
    const again = run(s, ev(11, 'offer', { offer: 5, conversation: 17, group: 'g', deadline: 1 }), ev(9, 'presence', { status: 'away' }));
    expect(again).toBe(s);
    s = run(s, ev(12, 'presence', { status: 'away' }));
    expect(s.presence).toBe('away');
    expect(s.cursor?.r).toBe(12);
  });

  it('dedupes conversation entries that arrive twice (history reply and live event)', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, queued, assignedEntry(3)]));
    s = run(s, ev(12, 'conversation', { conversation: 7, entry: clientMsg(4) }));
    s = run(s, { type: 'history', conversation: 7, entries: [started, queued, assignedEntry(3), clientMsg(4), clientMsg(5)] });
    s = run(s, ev(13, 'conversation', { conversation: 7, entry: clientMsg(5) }));
    expect(s.convs.get(7)!.entries.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5]);
  });

  it('counts unread client messages outside the open conversation', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]), assigned(12, 8, [{ ...started }, assignedEntry(2)]));
    expect(s.selected).toBe(7);
    s = run(s, ev(13, 'conversation', { conversation: 8, entry: clientMsg(3) }), ev(14, 'conversation', { conversation: 8, entry: clientMsg(4) }), ev(15, 'conversation', { conversation: 7, entry: clientMsg(3) }));
    expect(s.convs.get(8)!.unread).toBe(2);
    expect(s.convs.get(7)!.unread).toBe(0); // open and visible
    expect(totalUnread(s)).toBe(2);
    s = run(s, { type: 'select', conversation: 8 });
    expect(s.convs.get(8)!.unread).toBe(0);
    expect(s.convs.get(8)!.seenSeq).toBe(4);
  });

  it('does not count as seen while the page is hidden, and catches up when shown', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]), { type: 'viewing', viewing: false });
    s = run(s, ev(12, 'conversation', { conversation: 7, entry: clientMsg(3) }));
    expect(s.convs.get(7)!.unread).toBe(1);
    s = run(s, { type: 'viewing', viewing: true });
    expect(s.convs.get(7)!.unread).toBe(0);
  });

  it('tracks how long the visitor has waited for a reply', () => {
    const entries = [started, clientMsg(2, 'a', 200), clientMsg(3, 'b', 300)];
    expect(waitingSinceOf(entries)).toBe(200);
    expect(waitingSinceOf([...entries, opMsg(4)])).toBeNull();
    expect(waitingSinceOf([...entries, opMsg(4), clientMsg(5, 'c', 500)])).toBe(500);
    expect(countUnread([...entries, opMsg(4), clientMsg(5)], 3)).toBe(1);
  });

  it('counts the wait after a handoff from the bot\'s last answer, not the first message', () => {
    const botMsg = (seq: number): Entry => ({ kind: 'message', seq, at: seq * 100, from: 'bot', key: 'b' + seq, text: 'Hello!', buttons: ['Talk to a person'], attachments: [] });
    const handoff: Entry = { kind: 'handoff', seq: 6, at: 600, group: 'general', reason: 'the customer asked for a person', context: { messages: '1' } };
    const entries = [started, { kind: 'with_bot', seq: 2, at: 200 }, clientMsg(3), botMsg(4), clientMsg(5, 'Talk to a person'), handoff, { ...queued, seq: 7, at: 700 }];
    expect(waitingSinceOf(entries)).toBe(500);
    expect(waitingSinceOf(entries.slice(0, 4))).toBeNull();
    // The bot's answers are not the customer's: nothing unread in them.
    expect(countUnread(entries, 0)).toBe(2);
  });

  it('sorts waiting conversations first, longest wait first', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 });
    s = run(s, assigned(11, 1, [started, assignedEntry(2), opMsg(3, 'x', 900)]));
    s = run(s, assigned(12, 2, [started, clientMsg(2, 'a', 500)]));
    s = run(s, assigned(13, 3, [started, clientMsg(2, 'a', 300)]));
    expect(sortedConvs(s).map((c) => c.id)).toEqual([3, 2, 1]);
  });

  it('keeps a sent message pending until its ack or entry, then shows delivery and read marks', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]));
    s = run(s, { type: 'queueSend', message: { key: 'op-a', conversation: 7, text: 'hello', attachments: [], at: 1, state: 'sending' } });
    expect(pendingOf(s, 7)).toHaveLength(1);
    // ack first: the entry is synthesized so the message stays visible
    s = run(s, { type: 'ack', key: 'op-a', conversation: 7, seq: 3 });
    expect(pendingOf(s, 7)).toHaveLength(0);
    expect(s.convs.get(7)!.entries.map((e) => e.seq)).toEqual([1, 2, 3]);
    // then the event: no duplicate
    s = run(s, ev(12, 'conversation', { conversation: 7, entry: opMsg(3, 'op-a') }));
    expect(s.convs.get(7)!.entries.map((e) => e.seq)).toEqual([1, 2, 3]);
    const c = s.convs.get(7)!;
    expect(deliveryOf(c, c.entries[2])).toMatchObject({ state: 'delivered', glyph: '✓', label: 'delivery_delivered' });
    s = run(s, { type: 'read', conversation: 7, by: 'client', upto: 3 });
    expect(deliveryOf(s.convs.get(7)!, c.entries[2])).toMatchObject({ state: 'read', glyph: '✓✓', label: 'delivery_read' });
    // The web chat marks no notice, and has no outbox status.
    expect(deliveryOf(c, { kind: 'notice', seq: 4, at: 4, text: 'We are closed' })).toBeUndefined();
    expect(deliveryOf(c, c.entries[2])?.status).toBeUndefined();
    // stale or operator read marks are ignored
    expect(run(s, { type: 'read', conversation: 7, by: 'client', upto: 2 })).toBe(s);
    expect(run(s, { type: 'read', conversation: 7, by: 'operator', upto: 9 })).toBe(s);
  });

  it('entry before ack also clears the pending message', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]));
    s = run(s, { type: 'queueSend', message: { key: 'op-b', conversation: 7, text: 'x', attachments: [], at: 1, state: 'sending' } });
    s = run(s, ev(12, 'conversation', { conversation: 7, entry: opMsg(3, 'op-b') }));
    expect(pendingOf(s, 7)).toHaveLength(0);
    s = run(s, { type: 'ack', key: 'op-b', conversation: 7, seq: 3 });
    expect(s.convs.get(7)!.entries).toHaveLength(3);
  });

  it('marks failed sends and lets them be discarded', () => {
    let s = run(initialOpState, { type: 'queueSend', message: { key: 'k', conversation: 7, text: 'x', attachments: [], at: 1, state: 'sending' } });
    s = run(s, { type: 'sendFailed', key: 'k', error: 'not_assigned' });
    expect(s.pending.k.state).toBe('failed');
    s = run(s, { type: 'discard', key: 'k' });
    expect(s.pending.k).toBeUndefined();
  });

  it('keeps the text of replies a released conversation did not take, until dismissed or taken after all', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]));
    s = run(s, { type: 'queueSend', message: { key: 'op-a', conversation: 7, text: 'Your refund is on its way', attachments: [], at: 1, state: 'sending' } });
    s = run(s, { type: 'queueSend', message: { key: 'op-b', conversation: 7, text: 'Anything else?', attachments: [], at: 2, state: 'sending' } });
    s = run(s, ev(12, 'released', { conversation: 7 }));
    expect(s.pending).toEqual({});
    expect(s.unsent.map((p) => p.text)).toEqual(['Your refund is on its way', 'Anything else?']);
    // The first was committed after all: its ack comes late.
    s = run(s, { type: 'ack', key: 'op-a', conversation: 7, seq: 3 });
    expect(s.unsent.map((p) => p.key)).toEqual(['op-b']);
    s = run(s, { type: 'dismissUnsent' });
    expect(s.unsent).toEqual([]);
  });

  it('keeps the unsent list over a reset, and moves to it the replies of conversations a new hello no longer lists', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]));
    s = run(s, { type: 'queueSend', message: { key: 'op-a', conversation: 7, text: 'Still there?', attachments: [], at: 1, state: 'sending' } });
    s = run(s, { type: 'reset' });
    s = run(s, { type: 'hello', hello: hello({ active: [] }), now: 5 });
    expect(s.pending).toEqual({});
    expect(s.unsent.map((p) => p.text)).toEqual(['Still there?']);
    s = run(s, { type: 'reset' });
    expect(s.unsent).toHaveLength(1);
  });

  it('a closed or transferred-away entry does not bring back a conversation this desk does not hold', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello({ active: [] }), now: 0 });
    s = run(s, ev(12, 'conversation', { conversation: 9, entry: { kind: 'closed', seq: 8, at: 3, by: 'client' } }));
    s = run(s, ev(13, 'conversation', { conversation: 10, entry: { kind: 'transferred', seq: 5, at: 3, from: 'alice', to_operator: 'bob' } }));
    expect(s.convs.size).toBe(0);
    expect(s.needHistory).toEqual([]);
  });

  it('drops a released conversation and its selection', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]));
    s = run(s, ev(12, 'conversation', { conversation: 7, entry: { kind: 'transferred', seq: 3, at: 3, from: 'alice', to_operator: 'bob' } }), ev(13, 'released', { conversation: 7 }));
    expect(s.convs.size).toBe(0);
    expect(s.selected).toBeNull();
  });

  describe('protocol 2: one feed per group', () => {
    const h2 = (cursor: Record<string, number>, over: Partial<Hello> = {}) => hello({ seq: undefined, cursor, protocol: 2, ...over });
    const in_ = (feed: string, seq: number, kind: string, extra: Partial<FeedEvent> = {}) => ev(seq, kind, { feed, ...extra });

    it('keeps a position per feed and drops what each feed replays', () => {
      let s = run(initialOpState, { type: 'hello', hello: h2({ r: 4, c0: 0, c1: 9 }), now: 0 });
      expect(s.cursor).toEqual({ r: 4, c0: 0, c1: 9 });
      s = run(s, in_('r', 5, 'assigned', { conversation: 7, history: [started, assignedEntry(2)], history_upto: 2 }));
      s = run(s, in_('c1', 10, 'conversation', { conversation: 7, entry: clientMsg(3, 'one') }));
      s = run(s, in_('c1', 10, 'conversation', { conversation: 7, entry: clientMsg(3, 'one') })); // replayed
      // The same entry from the assignment's history and from the shard's feed: kept once.
      s = run(s, in_('c1', 11, 'conversation', { conversation: 7, entry: assignedEntry(2) }));
      expect(s.cursor).toEqual({ r: 5, c0: 0, c1: 11 });
      expect(s.convs.get(7)!.entries.map((e) => e.seq)).toEqual([1, 2, 3]);
    });

    it('does not bring back a conversation whose last entries come after its release', () => {
      let s = run(initialOpState, { type: 'hello', hello: h2({ r: 4, c0: 0 }), now: 0 });
      s = run(s, in_('r', 5, 'assigned', { conversation: 7, history: [started, assignedEntry(2)], history_upto: 2 }));
      s = run(s, in_('r', 6, 'released', { conversation: 7 }));
      s = run(s, in_('c0', 1, 'conversation', { conversation: 7, entry: { kind: 'closed', seq: 3, at: 3, by: 'client' } }));
      expect(s.convs.size).toBe(0);
      expect(s.needHistory).toEqual([]);
      // Assigned to us again: its entries count again.
      s = run(s, in_('r', 7, 'assigned', { conversation: 7, history: [started, assignedEntry(2), { kind: 'closed', seq: 3, at: 3, by: 'client' }], history_upto: 3 }));
      s = run(s, in_('c0', 2, 'conversation', { conversation: 7, entry: clientMsg(4, 'back') }));
      expect(s.convs.get(7)!.entries.map((e) => e.seq)).toEqual([1, 2, 3, 4]);
    });

    it('does not bring back a released conversation for its shard feed\'s late `assigned`, and reads it whole when routing gives it back', () => {
      let s = run(initialOpState, { type: 'hello', hello: h2({ r: 4, c0: 0 }), now: 0 });
      s = run(s, in_('r', 5, 'assigned', { conversation: 7, history: [started, assignedEntry(2)], history_upto: 2 }));
      // Transferred to us and then away again: the routing feed's release comes before
      // the shard feed's `assigned` with the transfer's entries.
      s = run(s, in_('r', 6, 'released', { conversation: 7 }));
      const transferIn: Entry = { kind: 'transferred', seq: 3, at: 3, from: 'bob', to_operator: 'alice' };
      s = run(s, in_('c0', 1, 'assigned', { conversation: 7, history: [transferIn], history_upto: 3 }));
      expect(s.convs.size).toBe(0);
      expect(s.released).toContain(7);
      // Routing gives it back: the shard's entries dropped above are read with the history.
      s = run(s, in_('r', 7, 'assigned', { conversation: 7, history: [started, assignedEntry(2)], history_upto: 2 }));
      expect([...s.convs.keys()]).toEqual([7]);
      expect(s.needHistory).toEqual([7]);
      expect(s.released).not.toContain(7);
      // A shard's `assigned` for a conversation we hold merges as before.
      s = run(s, in_('c0', 2, 'assigned', { conversation: 7, history: [transferIn], history_upto: 3 }));
      expect(s.convs.get(7)!.entries.map((e) => e.seq)).toEqual([1, 2, 3]);
    });

    it('reconciles a resumed hello once the routing feed catches up, and takes each feed from where the server goes on', () => {
      let s = run(initialOpState, { type: 'hello', hello: h2({ r: 4, c0: 2 }), now: 0 });
      s = run(s, in_('r', 5, 'assigned', { conversation: 7, history: [started, assignedEntry(2)], history_upto: 2 }));
      // Reconnected: the server's routing feed is at 6 (one event to replay); c0 is
      // behind what we saw (a point ahead of it is ignored); c1 is new to us.
      s = run(s, { type: 'hello', hello: h2({ r: 6, c0: 1, c1: 3 }, { active: [7, 8] }), now: 0 });
      expect(s.cursor).toEqual({ r: 5, c0: 1, c1: 0 });
      expect(s.reconcile).not.toBeNull();
      s = run(s, in_('r', 6, 'assigned', { conversation: 8, history: [started], history_upto: 1 }));
      expect(s.reconcile).toBeNull();
      expect([...s.convs.keys()].sort()).toEqual([7, 8]);
    });
  });

  it('shows typing for a few seconds', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]));
    s = run(s, { type: 'typing', conversation: 7, now: 10_000 });
    expect(s.convs.get(7)!.typingUntil).toBeGreaterThan(10_000);
    s = run(s, ev(12, 'conversation', { conversation: 7, entry: clientMsg(3) }));
    expect(s.convs.get(7)!.typingUntil).toBe(0);
  });

  describe('resume', () => {
    const base = () => run(initialOpState, { type: 'hello', hello: hello({ seq: 10 }), now: 0 }, assigned(11, 7, [started, assignedEntry(2)]), ev(12, 'offer', { offer: 5, conversation: 8, group: 'g', deadline: 1 }));

    it('with no missed events keeps local state and applies the snapshot', () => {
      const s = run(base(), { type: 'hello', hello: hello({ seq: 12, active: [7], offers: [{ offer: 5, conversation: 8, group: 'g', deadline: 1 }] }), now: 0 });
      expect(s.convs.get(7)!.entries).toHaveLength(2);
      expect(s.needHistory).toEqual([]);
      expect(s.cursor?.r).toBe(12);
    });

    it('replays missed events and reconciles with the snapshot when they are in', () => {
      let s = run(base(), { type: 'hello', hello: hello({ seq: 15, active: [9], offers: [] }), now: 0 });
      expect(s.reconcile).not.toBeNull();
      expect(s.convs.has(7)).toBe(true); // not yet: events 13..15 come first
      s = run(s, ev(13, 'offer_withdrawn', { offer: 5, conversation: 8, reason: 'expired' }), ev(14, 'conversation', { conversation: 7, entry: { kind: 'closed', seq: 3, at: 3, by: 'client' } }));
      expect(s.reconcile).not.toBeNull();
      s = run(s, ev(15, 'released', { conversation: 7 }));
      expect(s.reconcile).toBeNull();
      expect([...s.convs.keys()]).toEqual([9]);
      expect(s.needHistory).toEqual([9]); // assigned before last_seq? fetch its history
      expect(s.offers).toEqual([]);
    });

    it('starts over when the server ignored a resume point ahead of its feed', () => {
      const s = run(base(), { type: 'hello', hello: hello({ seq: 3, active: [7], offers: [] }), now: 0 });
      expect(s.cursor?.r).toBe(3);
      expect(s.offers).toEqual([]);
      expect(s.convs.get(7)!.entries).toHaveLength(2); // kept what it knew of a still-active conversation
    });

    it('reset (resume_gap) forgets everything but unsent messages', () => {
      let s = run(base(), { type: 'queueSend', message: { key: 'k', conversation: 7, text: 'x', attachments: [], at: 1, state: 'sending' } });
      s = run(s, { type: 'reset' });
      expect(s.cursor).toBeNull();
      expect(s.convs.size).toBe(0);
      expect(s.pending.k).toBeDefined();
    });
  });

  it('stays fast with 1,000 conversations', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello({ capacity: 1000 }), now: 0 });
    const t0 = performance.now();
    for (let i = 1; i <= 1000; i++) s = opReducer(s, assigned(10 + i, i, [started, clientMsg(2, 'x', i)]));
    for (let i = 1; i <= 1000; i++) s = opReducer(s, ev(2000 + i, 'conversation', { conversation: i, entry: clientMsg(3, 'y', 5000 + i) }));
    const sorted = sortedConvs(s);
    expect(sorted).toHaveLength(1000);
    expect(totalUnread(s)).toBeGreaterThan(1000);
    expect(performance.now() - t0).toBeLessThan(3000);
  });
});

describe('offer countdown', () => {
  it('counts on the local clock from arrival, immune to clock skew', async () => {
    const { offerMsLeft, offerWindowMs } = await import('../src/workstation/operator-state');
    // Server clock 5 s ahead of ours: deadline looks 35 s away on our clock, but the window is 30 s.
    const o = { offer: 1, conversation: 1, group: 'g', at: 105_000, deadline: 135_000, receivedAt: 100_000 };
    expect(offerWindowMs(o)).toBe(30_000);
    expect(offerMsLeft(o, 100_000)).toBe(30_000);
    expect(offerMsLeft(o, 120_000)).toBe(10_000);
    expect(offerMsLeft(o, 200_000)).toBe(0);
    // Snapshot offers (from hello) have no arrival time: fall back to the deadline.
    expect(offerMsLeft({ offer: 2, conversation: 2, group: 'g', deadline: 50_000 }, 40_000)).toBe(10_000);
  });
});

describe('offer countdown from the server clock', () => {
  it('starts at the whole window, never a second more, and a snapshot offer counts from the server clock', async () => {
    const { offerSecondsLeft } = await import('../src/workstation/operator-state');
    // A fresh offer event: 30 s window (a millisecond more from the entry's stamp shows 30, not 31).
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, { type: 'event', event: { type: 'event', kind: 'offer', seq: 11, at: 50_000, offer: 5, conversation: 17, group: 'general', deadline: 80_001 }, now: 7_000 });
    expect(offerSecondsLeft(s.offers[0], 7_000)).toBe(30);
    expect(offerSecondsLeft(s.offers[0], 17_000)).toBe(21);
    // After a reload 12 s into an offer, with the browser's clock 4 s behind the server's:
    // hello's `now` says 18 s are left, whatever the local clock says.
    s = run(initialOpState, { type: 'hello', hello: hello({ now: 112_000, offers: [{ offer: 6, conversation: 18, group: 'general', made_at: 100_000, deadline: 130_000 }] }), now: 108_000 });
    expect(offerSecondsLeft(s.offers[0], 108_000)).toBe(18);
    expect(offerSecondsLeft(s.offers[0], 118_000)).toBe(8);
    // A later hello for the same offer keeps counting from the first sighting.
    s = run(s, { type: 'hello', hello: hello({ now: 200_000, offers: [{ offer: 6, conversation: 18, group: 'general', made_at: 100_000, deadline: 130_000 }] }), now: 113_000 });
    expect(offerSecondsLeft(s.offers[0], 113_000)).toBe(13);
  });
});

describe('an offer that arrives late', () => {
  it('counts down from what the server\'s clock leaves it, not from its whole window', async () => {
    const { offerSecondsLeft } = await import('../src/workstation/operator-state');
    // The browser's clock is 4 s behind the server's (hello). An offer made at 100 s
    // (deadline 130 s) arrives 20 s late, after a reconnect: 10 s are left, not 30.
    let s = run(initialOpState, { type: 'hello', hello: hello({ now: 116_000 }), now: 112_000 });
    s = run(s, { type: 'event', event: { type: 'event', kind: 'offer', seq: 11, at: 100_000, offer: 5, conversation: 17, group: 'general', deadline: 130_000, waiting_since: 90_000 }, now: 116_000 });
    expect(offerSecondsLeft(s.offers[0], 116_000)).toBe(10);
    expect(offerSecondsLeft(s.offers[0], 126_000)).toBe(0);
    expect(s.offers[0].waitedAtReceipt).toBe(30_000);
    // Past its deadline by the server's clock: nothing left.
    s = run(s, { type: 'event', event: { type: 'event', kind: 'offer', seq: 12, at: 100_000, offer: 6, conversation: 18, group: 'general', deadline: 130_000 }, now: 140_000 });
    expect(offerSecondsLeft(s.offers[1], 140_000)).toBe(0);
  });
});

describe('missed offers', () => {
  const missed = (seq: number, at: number): OpAction => ({ type: 'event', event: { type: 'event', kind: 'offer_withdrawn', seq, at, offer: 5, conversation: 17, reason: 'expired' } as FeedEvent });
  const presence = (seq: number, at: number, status: string): OpAction => ({ type: 'event', event: { type: 'event', kind: 'presence', seq, at, status } as FeedEvent });

  it('remembers that a missed offer set the operator away until they change their status', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, missed(11, 5_000), presence(12, 5_000, 'away'));
    expect(s.presence).toBe('away');
    expect(s.awayAfterMiss).toBe(true);
    // A reconnect's hello does not make them forget.
    s = run(s, { type: 'hello', hello: hello({ presence: 'away', seq: 12 }), now: 6_000 });
    expect(s.awayAfterMiss).toBe(true);
    s = run(s, presence(13, 9_000, 'online'));
    expect(s.awayAfterMiss).toBe(false);
  });

  it('knows when the server set the operator away because no desk was connected, until they choose', () => {
    const set = (seq: number, at: number): OpAction => ({ type: 'event', event: { type: 'event', kind: 'presence', seq, at, status: 'away', reason: 'disconnected' } as FeedEvent });
    let s = run(initialOpState, { type: 'hello', hello: hello({ presence: 'away', presence_reason: 'disconnected' }), now: 0 });
    expect(s.presenceReason).toBe('disconnected');
    s = run(s, presence(11, 9_000, 'online'));
    expect(s.presenceReason).toBe(null);
    s = run(s, set(12, 20_000));
    expect([s.presence, s.presenceReason]).toEqual(['away', 'disconnected']);
    expect(s.awayAfterMiss).toBe(false);
  });

  it('counts a wrap-up down on the server clock and forgets it when it ends', async () => {
    const { wrapUpSecondsLeft } = await import('../src/workstation/operator-state');
    // The browser's clock is 5 s behind the server's.
    let s = run(initialOpState, { type: 'hello', hello: hello({ now: 105_000, wrap_up_until: 125_000 }), now: 100_000 });
    expect(wrapUpSecondsLeft(s, 100_000)).toBe(20);
    expect(wrapUpSecondsLeft(s, 119_500)).toBe(1);
    expect(wrapUpSecondsLeft(s, 121_000)).toBe(0);
    s = run(s, { type: 'event', event: { type: 'event', kind: 'wrap_up', seq: 11, at: 106_000, until: null } as FeedEvent });
    expect(s.wrapUpUntil).toBe(null);
    expect(wrapUpSecondsLeft(s, 100_000)).toBe(0);
  });

  it('does not blame a missed offer for an away chosen later, or for one that did not set away', () => {
    // A stalled expiry leaves the operator online (rules 3); their own away later is theirs.
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, missed(11, 5_000), presence(12, 8_000, 'away'));
    expect(s.awayAfterMiss).toBe(false);
    s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, ev(11, 'offer_withdrawn', { offer: 5, conversation: 17, reason: 'declined' }), presence(12, 1011, 'away'));
    expect(s.awayAfterMiss).toBe(false);
  });
});

describe('configuration changes', () => {
  it('an admin change of capacity or groups reaches the desk at once', () => {
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 });
    expect(s.me?.capacity).toBe(2);
    s = run(s, ev(11, 'configured', { name: 'Alice B.', capacity: 4, groups: ['general', 'vip'] } as Partial<FeedEvent>));
    expect(s.me).toEqual({ operator: 'alice', name: 'Alice B.', capacity: 4, groups: ['general', 'vip'] });
    expect(s.cursor?.r).toBe(11);
  });
});


describe('offer context and transfers', () => {
  it('counts the wait from the server clock and finds who transferred a conversation to me', async () => {
    const { offerWaitedMs, transferToMe } = await import('../src/workstation/operator-state');
    let s = run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, {
      type: 'event',
      event: { type: 'event', kind: 'offer', seq: 11, at: 50_000, offer: 5, conversation: 17, group: 'general', deadline: 80_000, channel: 'web', preview: 'Hi', waiting_since: 8_000 },
      now: 7_000,
    });
    expect(s.offers[0].channel).toBe('web');
    expect(s.offers[0].preview).toBe('Hi');
    expect(offerWaitedMs(s.offers[0], 7_000)).toBe(42_000);
    expect(offerWaitedMs(s.offers[0], 10_000)).toBe(45_000);
    const transferred: Entry = { kind: 'transferred', seq: 6, at: 600, from: 'bob', to_operator: 'alice', comment: 'refund question' };
    s = run(s, assigned(12, 17, [started, queued, clientMsg(3), { ...assignedEntry(4), name: 'Bob', operator: 'bob' }, clientMsg(5), transferred, assignedEntry(7)]));
    expect(transferToMe(s.convs.get(17)!, 'alice')).toEqual({ from: 'Bob', comment: 'refund question' });
    // Taken from the queue, not handed over: no transfer.
    s = run(s, assigned(13, 18, [started, queued, clientMsg(3), assignedEntry(4)]));
    expect(transferToMe(s.convs.get(18)!, 'alice')).toBeNull();
    // The visitor wrote on before the desk looked: the transfer still counts.
    s = run(s, assigned(14, 19, [started, queued, { ...assignedEntry(3), name: 'Bob', operator: 'bob' }, { ...transferred, seq: 4 }, assignedEntry(5), clientMsg(6)]));
    expect(transferToMe(s.convs.get(19)!, 'alice')).toEqual({ from: 'Bob', comment: 'refund question' });
    // Transferred to someone else, then taken by me from the queue: not a transfer to me.
    s = run(s, assigned(15, 20, [started, queued, assignedEntry(3), { ...transferred, seq: 4, to_operator: 'carol' }, { ...assignedEntry(5), operator: 'carol' }, clientMsg(6), assignedEntry(7), clientMsg(8)]));
    expect(transferToMe(s.convs.get(20)!, 'alice')).toBeNull();
  });
});

describe('alerts', () => {
  it('ring unless muted, notify only in the background with permission, and remember the mute', async () => {
    const { Alerts } = await import('../src/workstation/alerts');
    const store = new Map<string, string>();
    const storage = { getItem: (k: string) => store.get(k) ?? null, setItem: (k: string, v: string) => void store.set(k, v) };
    let hidden = false;
    let permission: NotificationPermission = 'default';
    const beeps: number[] = [];
    const shown: string[] = [];
    const requests: number[] = [];
    const env = {
      storage,
      hidden: () => hidden,
      beep: () => void beeps.push(1),
      notification: { permission: () => permission, request: async () => void requests.push(1), show: (title: string) => void shown.push(title) },
    };
    const a = new Alerts(env);
    a.alert('Offer', 'Dana', 'o1');
    expect([beeps.length, shown.length]).toEqual([1, 0]);
    a.askPermission();
    expect(requests).toHaveLength(1);
    permission = 'granted';
    hidden = true;
    a.alert('Offer', 'Dana', 'o2');
    expect(shown).toEqual(['Offer']);
    a.setMuted(true);
    a.alert('Offer', 'Lee', 'o3');
    expect(beeps).toHaveLength(2);
    expect(new Alerts(env).muted).toBe(true);
    a.askPermission();
    expect(requests).toHaveLength(1);
  });
});

describe('messenger deliveries', () => {
  const tgStarted: Entry = { kind: 'started', seq: 1, at: 1, channel: 'tg', visitor: { name: 'Fay', attributes: {} } };
  const notice: Entry = { kind: 'notice', seq: 3, at: 300, text: 'Card payments are down' };
  const delivery = (seq: number, status: Delivery['status'], updated_at: number, reason = ''): Delivery => ({
    conversation: 7,
    seq,
    channel: 'tg',
    recipient: '4242',
    status,
    attempts: 1,
    provider_id: null,
    reason,
    queued_at: 100,
    updated_at,
  });
  const told = (feedSeq: number, entrySeq: number, status: string, reason = '') =>
    ev(feedSeq, 'delivery', { conversation: 7, entry_seq: entrySeq, status: status as FeedEvent['status'], reason });
  const held = () => run(initialOpState, { type: 'hello', hello: hello(), now: 0 }, assigned(11, 7, [tgStarted, queued, clientMsg(3), notice, opMsg(4), opMsg(5)]));

  it('takes statuses from the conversation view and from feed events, by entry seq', () => {
    let s = held();
    s = run(s, { type: 'deliveries', conversation: 7, deliveries: [delivery(3, 'sent', 500), delivery(4, 'delivered', 600)] });
    expect(s.convs.get(7)!.outbox).toEqual({ 3: { status: 'sent', reason: '', at: 500 }, 4: { status: 'delivered', reason: '', at: 600 } });
    // The event's `seq` is the feed's; the entry is `entry_seq`.
    s = run(s, told(12, 4, 'read'));
    expect(s.cursor?.r).toBe(12);
    expect(s.convs.get(7)!.outbox[4]).toEqual({ status: 'read', reason: '', at: 1012 });
    expect(s.convs.get(7)!.outbox[12]).toBeUndefined();
  });

  it('keeps the newer status when the conversation view arrives after a feed event', () => {
    let s = run(held(), told(12, 5, 'read'));
    const before = s;
    // Read before the event was committed: older, so it changes nothing.
    s = run(s, { type: 'deliveries', conversation: 7, deliveries: [delivery(5, 'sent', 900)] });
    expect(s).toBe(before);
    expect(s.convs.get(7)!.outbox[5].status).toBe('read');
    // The same report again is no change either.
    expect(run(s, { type: 'deliveries', conversation: 7, deliveries: [delivery(5, 'read', 1012)] })).toBe(s);
  });

  it('ignores events for conversations not held, and events without an entry seq', () => {
    const s = held();
    expect(run(s, ev(12, 'delivery', { conversation: 8, entry_seq: 4, status: 'sent' })).convs).toBe(s.convs);
    expect(run(s, ev(12, 'delivery', { conversation: 7, status: 'sent' })).convs).toBe(s.convs);
    expect(run(s, { type: 'deliveries', conversation: 8, deliveries: [delivery(4, 'sent', 1)] })).toBe(s);
  });

  it('marks our messages and the notices the outbox sent', () => {
    let s = run(held(), { type: 'deliveries', conversation: 7, deliveries: [delivery(3, 'failed', 500, 'Forbidden: bot was blocked by the user')] });
    const c = () => s.convs.get(7)!;
    const msg = (seq: number) => c().entries.find((e) => e.seq === seq)!;
    // Nothing told yet about a message: on its way.
    expect(deliveryOf(c(), msg(4), true)).toMatchObject({ state: 'sending', glyph: '…', label: 'delivery_sending' });
    // A notice the outbox holds is marked, with its reason on screen.
    expect(deliveryOf(c(), notice, true)).toEqual({
      state: 'failed',
      glyph: '⚠',
      label: 'delivery_undelivered',
      status: 'failed',
      reason: 'Forbidden: bot was blocked by the user',
      detail: 'Forbidden: bot was blocked by the user',
      loud: true,
    });
    s = run(s, told(12, 4, 'sent'), told(13, 5, 'pending', 'HTTP 503'));
    expect(deliveryOf(c(), msg(4), true)).toMatchObject({ state: 'sent', glyph: '✓', label: 'delivery_sent', status: 'sent' });
    expect(deliveryOf(c(), msg(5), true)).toMatchObject({ state: 'retrying', label: 'delivery_retrying', reason: 'HTTP 503', loud: true });
    expect(deliveryOf(c(), msg(5), true)?.detail).toBeUndefined();
    s = run(s, told(14, 4, 'delivered'));
    expect(deliveryOf(c(), msg(4), true)).toMatchObject({ state: 'delivered', glyph: '✓✓' });
    s = run(s, told(15, 4, 'read'), told(16, 5, 'unknown', 'the node stopped before the provider answered'));
    expect(deliveryOf(c(), msg(4), true)).toMatchObject({ state: 'read', glyph: '✓✓', label: 'delivery_read' });
    expect(deliveryOf(c(), msg(5), true)).toMatchObject({ state: 'unknown', label: 'delivery_unknown', loud: true });
    // A notice the outbox does not hold has no mark.
    expect(deliveryOf(c(), { ...notice, seq: 9 }, true)).toBeUndefined();
  });

  it('labels every outbox status, and a status from a newer server as on its way', () => {
    expect(outboxMark(undefined).state).toBe('sending');
    expect(outboxMark({ status: 'pending', reason: '', at: 1 }).state).toBe('sending');
    expect(outboxMark({ status: 'sending', reason: '', at: 1 }).state).toBe('sending');
    expect(outboxMark({ status: 'sent', reason: '', at: 1 }).loud).toBeUndefined();
    expect(outboxMark({ status: 'bounced' as any, reason: '', at: 1 })).toMatchObject({ state: 'sending', status: 'bounced' });
  });

  it('tells messenger channels from the web chat', () => {
    const channels: Channel[] = [
      { id: 'web', kind: 'web', name: 'Web chat', default_group: 'general', adapter: null },
      { id: 'shop', kind: 'web', name: 'Shop chat', default_group: 'tech' },
      { id: 'tg', kind: 'telegram', name: 'Telegram', default_group: 'general', adapter: 'telegram' },
      { id: 'toy', kind: 'toy', name: 'Toy', default_group: 'general', adapter: null },
    ];
    expect(['web', 'shop', 'tg', 'toy', 'new'].map((id) => isMessenger(channels, id))).toEqual([false, false, true, true, false]);
    expect(isMessenger(null, 'tg')).toBe(false);
    // What the composer holds a message to: the channel's adapter, none for the web chat
    // and for a channel the desk does not know (yet).
    expect(['web', 'shop', 'tg', 'toy', 'new'].map((id) => adapterOf(channels, id))).toEqual([null, null, 'telegram', null, null]);
    expect(adapterOf(null, 'tg')).toBeNull();
  });

  it('forgets the statuses with the conversation', () => {
    let s = run(held(), told(12, 4, 'sent'));
    s = run(s, ev(13, 'released', { conversation: 7 }));
    expect(s.convs.has(7)).toBe(false);
    s = run(s, assigned(14, 7, [tgStarted, queued, clientMsg(3), notice, opMsg(4)]));
    expect(s.convs.get(7)!.outbox).toEqual({});
  });
});
