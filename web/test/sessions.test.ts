import { describe, expect, it, vi } from 'vitest';
import { Backoff } from '../src/shared/backoff';
import { ReconnectingSocket } from '../src/shared/socket';
import { OperatorSession } from '../src/workstation/operator-session';
import { FloorFeed } from '../src/workstation/floor-feed';
import { FakeTimers, MemoryStorage, socketFactory } from './fakes';

const helloFrame = (over: Record<string, unknown> = {}) => ({
  type: 'hello',
  operator: 'alice',
  name: 'Alice',
  capacity: 2,
  groups: ['general'],
  presence: 'online',
  active: [],
  offers: [],
  seq: 10,
  protocol: 1,
  ...over,
});

describe('ReconnectingSocket', () => {
  it('keeps one socket, backs off with growing delays, and resets only on a healthy handshake', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, backoff: new Backoff({ base: 1000, max: 8000, random: () => 1 }), onFrame: () => {} });
    link.start();
    link.start(); // no second socket
    expect(f.sockets).toHaveLength(1);
    f.last.drop();
    expect(timers.pending()).toEqual([1000]);
    timers.advance(1000);
    expect(f.sockets).toHaveLength(2);
    f.last.open(); // open but no handshake: the server may drop it at once
    f.last.drop();
    expect(timers.pending()).toEqual([2000]);
    timers.advance(2000);
    f.last.open();
    link.markHealthy();
    expect(link.state.status).toBe('open');
    f.last.drop();
    expect(timers.pending()).toEqual([1000]);
    expect(link.state.status).toBe('reconnecting');
  });

  it('makes no request storm: 20 failures take minutes, not milliseconds', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, backoff: new Backoff({ base: 1000, max: 30000, random: () => 0.5 }), onFrame: () => {} });
    link.start();
    const t0 = timers.t;
    while (f.sockets.length < 20) {
      f.last.drop();
      timers.advance(timers.pending()[0]);
    }
    expect(timers.t - t0).toBeGreaterThan(5 * 60 * 1000 - 1);
  });

  it('ignores frames and closes from a replaced socket', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const frames: unknown[] = [];
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, onFrame: (x) => frames.push(x) });
    link.start();
    const old = f.last;
    old.open();
    link.restart();
    expect(f.sockets).toHaveLength(2);
    old.frame({ type: 'stale' });
    old.drop();
    expect(frames).toEqual([]);
    expect(f.sockets).toHaveLength(2);
    expect(timers.pending()).toEqual([]);
  });

  it('pings when idle and reconnects a silent (half-open) connection', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, idleMs: 10_000, onFrame: () => {} });
    link.start();
    f.last.open();
    link.markHealthy();
    timers.advance(10_000);
    expect(f.last.ofType('ping')).toHaveLength(1);
    timers.advance(10_000);
    expect(f.sockets[0].closedWith).toBe(4000);
    expect(link.state.status).toBe('reconnecting');
  });

  it('takes a socket whose ping goes unanswered past the deadline for dead, and probes on demand', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, idleMs: 10_000, pingTimeoutMs: 5_000, onFrame: () => {} });
    link.start();
    f.last.open();
    link.markHealthy();
    timers.advance(10_000);
    expect(f.last.ofType('ping')).toHaveLength(1);
    // An answer within the deadline keeps it.
    timers.advance(2_000);
    f.last.frame({ type: 'pong' });
    timers.advance(4_000);
    expect(link.state.status).toBe('open');
    // Asked to check (the browser came back online): a ping at once, dead 5 s later.
    link.probe();
    expect(f.last.ofType('ping')).toHaveLength(2);
    timers.advance(5_000);
    expect(f.sockets[0].closedWith).toBe(4000);
    expect(link.state.status).toBe('reconnecting');
  });

  it('retryNow starts the backoff over', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, backoff: new Backoff({ base: 1000, max: 30_000, random: () => 1 }), onFrame: () => {} });
    link.start();
    for (let i = 0; i < 4; i++) {
      f.last.drop();
      timers.advance(60_000);
    }
    f.last.drop();
    expect(link.state.retryAt! - timers.now()).toBeGreaterThan(1000);
    link.retryNow();
    f.last.drop();
    expect(link.state.retryAt! - timers.now()).toBeLessThanOrEqual(1000);
  });

  it('retryNow skips the wait, stop ends it all', () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const link = new ReconnectingSocket({ url: () => 'ws://x', create: f.create, timers, onFrame: () => {} });
    link.start();
    f.last.drop();
    link.retryNow();
    expect(f.sockets).toHaveLength(2);
    link.stop();
    expect(link.state.status).toBe('stopped');
    expect(timers.pending()).toEqual([]);
    expect(link.send({ type: 'x' })).toBe(false);
  });
});

function operatorSession(extra: Partial<ConstructorParameters<typeof OperatorSession>[0]> = {}) {
  const timers = new FakeTimers();
  const f = socketFactory();
  const s = new OperatorSession({ wsBase: 'ws://h', token: 'T k', create: f.create, timers, backoff: new Backoff({ base: 1000, random: () => 0 }), ...extra });
  return { timers, f, s };
}

describe('OperatorSession', () => {
  it('connects without last_seq first and resumes with the last processed feed seq', () => {
    const { timers, f, s } = operatorSession();
    s.start();
    expect(f.last.url).toBe('ws://h/ws/operator?token=T%20k&protocol=2');
    f.last.open();
    f.last.frame(helloFrame({ seq: 10 }));
    f.last.frame({ type: 'event', kind: 'presence', status: 'away', seq: 11, at: 5 });
    f.last.drop();
    timers.advance(timers.pending()[0]);
    expect(f.last.url).toBe('ws://h/ws/operator?token=T%20k&protocol=2&cursor=r.11');
    f.last.open();
    f.last.frame(helloFrame({ seq: 12, presence: 'online' }));
    f.last.frame({ type: 'event', kind: 'presence', status: 'away', seq: 11, at: 5 }); // duplicate: ignored
    f.last.frame({ type: 'event', kind: 'presence', status: 'online', seq: 12, at: 6 });
    expect(s.store.get().cursor?.r).toBe(12);
    expect(s.store.get().presence).toBe('online');
  });

  it('resumes every feed of protocol 2 from its own last processed seq', () => {
    const { timers, f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ seq: undefined, cursor: { c0: 5, c1: 0, r: 3 }, protocol: 2 }));
    f.last.frame({ type: 'event', kind: 'presence', status: 'away', feed: 'r', seq: 4, at: 5 });
    f.last.frame({ type: 'event', kind: 'delivery', conversation: 9, entry_seq: 2, status: 'read', feed: 'c0', seq: 6, at: 6 });
    f.last.drop();
    timers.advance(timers.pending()[0]);
    expect(f.last.url).toBe('ws://h/ws/operator?token=T%20k&protocol=2&cursor=c0.6,c1.0,r.4');
  });

  it('keeps saying that a missed offer set the operator away, in state rather than a passing notice', () => {
    const notices: string[] = [];
    const { f, s } = operatorSession({ onNotice: (code) => notices.push(code) });
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ seq: 10 }));
    f.last.frame({ type: 'event', kind: 'offer_withdrawn', offer: 3, conversation: 9, reason: 'declined', seq: 11, at: 5 });
    f.last.frame({ type: 'event', kind: 'offer_withdrawn', offer: 4, conversation: 9, reason: 'expired', seq: 12, at: 6 });
    f.last.frame({ type: 'event', kind: 'offer_withdrawn', offer: 4, conversation: 9, reason: 'expired', seq: 12, at: 6 }); // replayed
    f.last.frame({ type: 'event', kind: 'presence', status: 'away', seq: 13, at: 6 });
    expect(notices).toEqual([]);
    expect(s.store.get().presence).toBe('away');
    expect(s.store.get().awayAfterMiss).toBe(true);
  });

  it('on resume_gap forgets its state and reconnects without last_seq', () => {
    const { f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ seq: 10 }));
    f.last.frame({ type: 'event', kind: 'presence', status: 'away', seq: 11, at: 5 });
    f.last.frame({ type: 'error', code: 'resume_gap', message: 'gap' });
    expect(f.sockets).toHaveLength(2);
    expect(f.last.url).toBe('ws://h/ws/operator?token=T%20k&protocol=2');
    expect(s.store.get().cursor).toBeNull();
  });

  it('re-sends unacknowledged messages with the same key after reconnecting', () => {
    const { timers, f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ active: [7] }));
    f.last.frame({ type: 'history', conversation: 7, entries: [{ kind: 'started', seq: 1, at: 1 }], ref: 'hist:7' });
    const key = s.sendMessage(7, 'hello');
    expect(f.last.ofType('send')).toEqual([{ type: 'send', conversation: 7, key, text: 'hello', ref: key }]);
    f.last.drop();
    timers.advance(timers.pending()[0]);
    f.last.open();
    f.last.frame(helloFrame({ active: [7], seq: 10 }));
    expect(f.last.ofType('send').map((x) => x.key)).toEqual([key]);
    f.last.frame({ type: 'ack', conversation: 7, key, ref: key, seq: 2, duplicate: true });
    expect(s.store.get().pending[key]).toBeUndefined();
  });

  it('sends a reply answered unavailable again with its key, then shows it not sent, with Retry', () => {
    const notices: string[] = [];
    const { timers, f, s } = operatorSession({ onNotice: (code: string) => notices.push(code) });
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ active: [7] }));
    const key = s.sendMessage(7, 'hello');
    const sock = f.last;
    for (let i = 0; i < 5; i++) {
      sock.frame({ type: 'error', code: 'unavailable', ref: key });
      expect(s.store.get().pending[key].state).toBe('sending');
      const sent = sock.ofType('send').length;
      for (let ms = 0; ms < 1000 * 2 ** i; ms += 500) {
        // Not before its wait is over.
        expect(sock.ofType('send').length).toBe(sent);
        timers.advance(500);
        sock.frame({ type: 'pong' });
      }
      expect(sock.ofType('send').length).toBe(sent + 1);
    }
    expect(notices).toEqual([]);
    expect(sock.ofType('send').map((x) => x.key)).toEqual(Array(6).fill(key));
    sock.frame({ type: 'error', code: 'unavailable', ref: key });
    expect(s.store.get().pending[key].state).toBe('failed');
    s.retry(key);
    expect(sock.ofType('send')).toHaveLength(7);
    sock.frame({ type: 'ack', conversation: 7, key, ref: key, seq: 2, duplicate: true });
    expect(s.store.get().pending[key]).toBeUndefined();
  });

  it('keeps the replies not acknowledged over a reload of the tab and sends them again with their keys', () => {
    const storage = new MemoryStorage();
    const first = operatorSession({ storage, storageKey: 'switchboard.desk.pending.alice' });
    first.s.start();
    first.f.last.open();
    first.f.last.frame(helloFrame({ active: [7] }));
    const key = first.s.sendMessage(7, 'Your refund is on its way');
    expect(storage.getItem('switchboard.desk.pending.alice')).toContain(key);
    // The page reloads before the ack.
    const again = operatorSession({ storage, storageKey: 'switchboard.desk.pending.alice' });
    again.s.start();
    again.f.last.open();
    again.f.last.frame(helloFrame({ active: [7] }));
    expect(again.f.last.ofType('send').map((x) => [x.key, x.text])).toEqual([[key, 'Your refund is on its way']]);
    again.f.last.frame({ type: 'ack', conversation: 7, key, ref: key, seq: 4, duplicate: true });
    expect(storage.getItem('switchboard.desk.pending.alice')).toBeNull();
  });

  it('asks for at most 3 histories at a time (no burst on reconnect)', () => {
    const { f, s, timers } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ active: [1, 2, 3, 4, 5] }));
    expect(f.last.ofType('history').map((x) => x.conversation)).toEqual([1, 2, 3]);
    f.last.frame({ type: 'history', conversation: 2, entries: [], ref: 'hist:2' });
    expect(f.last.ofType('history').map((x) => x.conversation)).toEqual([1, 2, 3, 4]);
    f.last.frame({ type: 'error', code: 'forbidden', ref: 'hist:1' });
    expect(f.last.ofType('history').map((x) => x.conversation)).toEqual([1, 2, 3, 4]);
    f.last.frame({ type: 'history', conversation: 3, entries: [], ref: 'hist:3' });
    expect(f.last.ofType('history').map((x) => x.conversation)).toEqual([1, 2, 3, 4, 5]);
    // The one refused for now (a shard catching up) is asked again a second later, not
    // before.
    f.last.frame({ type: 'history', conversation: 4, entries: [], ref: 'hist:4' });
    expect(f.last.ofType('history').map((x) => x.conversation)).toEqual([1, 2, 3, 4, 5]);
    timers.advance(1000);
    expect(f.last.ofType('history').map((x) => x.conversation)).toEqual([1, 2, 3, 4, 5, 1]);
  });

  it('matches replies to requests by ref', async () => {
    const { f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame());
    const ok = s.setPresence('away');
    const bad = s.accept(5);
    const [p, a] = f.last.sent.slice(-2);
    expect(p).toMatchObject({ type: 'presence', status: 'away' });
    f.last.frame({ type: 'error', code: 'offer_gone', message: 'gone', ref: a.ref });
    f.last.frame({ type: 'ok', ref: p.ref });
    await expect(ok).resolves.toMatchObject({ type: 'ok' });
    await expect(bad).rejects.toMatchObject({ code: 'offer_gone' });
  });

  it('fails requests when disconnected and times out unanswered ones', async () => {
    const { timers, f, s } = operatorSession();
    s.start();
    await expect(s.setPresence('online')).rejects.toMatchObject({ code: 'disconnected' });
    f.last.open();
    f.last.frame(helloFrame());
    const p = s.transfer(7, { group: 'billing' }, 'refund');
    expect(f.last.sent.at(-1)).toMatchObject({ type: 'transfer', conversation: 7, to_group: 'billing', comment: 'refund' });
    timers.advance(15_000);
    await expect(p).rejects.toMatchObject({ code: 'timeout' });
  });

  it('sends close with resolution and tags', () => {
    const { f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame());
    s.close(7, 'solved', ['billing', 'refund']).catch(() => {});
    expect(f.last.sent.at(-1)).toMatchObject({ type: 'close', conversation: 7, resolution: 'solved', tags: ['billing', 'refund'] });
  });

  it('throttles typing and sends read marks only forward; stops them if the server refuses', () => {
    const { timers, f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame());
    s.typing(7);
    s.typing(7);
    timers.advance(3000);
    s.typing(7);
    expect(f.last.ofType('typing')).toHaveLength(2);
    s.markRead(7, 5);
    s.markRead(7, 5);
    s.markRead(7, 4);
    expect(f.last.ofType('read')).toEqual([{ type: 'read', conversation: 7, upto: 5, ref: 'read:7' }]);
    f.last.frame({ type: 'error', code: 'unknown_type', ref: 'read:7' });
    s.markRead(7, 9);
    expect(f.last.ofType('read')).toHaveLength(1);
  });

  it('takes an error about a read mark or a typing signal (named in `for`) quietly', () => {
    const notices: string[] = [];
    const { f, s } = operatorSession({ onNotice: (code: string) => notices.push(code) });
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ active: [7] }));
    s.markRead(7, 5);
    f.last.frame({ type: 'error', code: 'unavailable', for: 'read', message: 'try again' });
    f.last.frame({ type: 'error', code: 'invalid', for: 'typing', message: 'no' });
    expect(notices).toEqual([]);
    // Read marks are still sent: the server knows them.
    s.markRead(7, 9);
    expect(f.last.ofType('read')).toHaveLength(2);
  });

  it('applies typing and read frames from the visitor', () => {
    const { f, s } = operatorSession();
    s.start();
    f.last.open();
    f.last.frame(helloFrame({ active: [7] }));
    f.last.frame({ type: 'typing', conversation: 7, from: 'client' });
    f.last.frame({ type: 'read', conversation: 7, by: 'client', upto: 4 });
    const c = s.store.get().convs.get(7)!;
    expect(c.typingUntil).toBeGreaterThan(0);
    expect(c.clientReadUpto).toBe(4);
  });

  it('signs out when the token is refused', async () => {
    const onAuthLost = vi.fn();
    const { f, s } = operatorSession({ checkAuth: async () => 'unauthorized', onAuthLost });
    s.start();
    f.last.drop(1006); // upgrade refused: closed before any hello
    await Promise.resolve();
    await Promise.resolve();
    expect(onAuthLost).toHaveBeenCalled();
    expect(s.link.state.status).toBe('stopped');
  });
});

describe('FloorFeed', () => {
  it('uses floor frames, falls back to polling while the socket is down, and stops polling when it is back', async () => {
    const timers = new FakeTimers();
    const f = socketFactory();
    const floors: any[] = [];
    const get = vi.fn(async (p: string) =>
      p === '/api/queues' ? { queues: [{ group: 'general', name: 'General', waiting: 1, offered: 0, longest_wait_ms: 10 }] } : { operators: [{ id: 'alice', name: 'Alice', presence: 'online', presence_since: 1, load: 1, capacity: 2, active: 1, groups: [] }] },
    );
    const modes: string[] = [];
    const feed = new FloorFeed({ wsBase: 'ws://h', token: 't', get, onFloor: (x) => floors.push(x), onMode: (m) => modes.push(m), create: f.create, timers, pollMs: 2000 });
    feed.start();
    expect(f.last.url).toBe('ws://h/ws/supervisor?token=t');
    f.last.drop(1006); // e.g. 404 on an older server
    await vi.waitFor(() => expect(floors).toHaveLength(1));
    expect(floors[0].source).toBe('poll');
    expect(floors[0].operators[0].activeCount).toBe(1);
    expect(get).toHaveBeenCalledTimes(2);
    timers.advance(2000);
    await vi.waitFor(() => expect(floors).toHaveLength(2));
    // the socket comes back (its retry is due) and sends a frame
    timers.advance(timers.pending().find((d) => d > 0) ?? 0);
    const s = f.last;
    s.open();
    s.frame({ type: 'floor', at: 5, queues: [{ group: 'general', name: 'General', waiting: 0, offered: 1, longest_wait_ms: 0, sla_ms: 60000, within_sla: 1 }], operators: [{ id: 'alice', name: 'Alice', presence: 'online', presence_since: 1, load: 2, capacity: 2, active: [3, 7] }] });
    const last = floors.at(-1);
    expect(last.source).toBe('socket');
    expect(last.operators[0].active).toEqual([3, 7]);
    expect(last.queues[0].sla_ms).toBe(60000);
    const calls = get.mock.calls.length;
    timers.advance(10_000);
    expect(get.mock.calls.length).toBe(calls);
    expect(modes).toEqual(['poll', 'socket']);
    feed.stop();
  });
});
