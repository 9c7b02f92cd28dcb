import { describe, expect, it, vi } from 'vitest';
import { Backoff } from '../src/shared/backoff';
import { deserialize, emptyWidgetState, lastOperatorSeq, quickReplies, serialize, unreadFromOperator, widgetReducer, withBot, MAX_CACHED_EVENTS, type ClientEvent, type WidgetAction, type WidgetState } from '../src/widget/widget-state';
import { identityOwner, KEYS_MARK, NAME_KEY, ownerKey, parseNotices, SEEN_KEY, SESSION_KEY, sessionKey, RESUME_LIMITED_RETRY_MS, START_RETRY_MS, VISITOR_KEY, WidgetSession } from '../src/widget/widget-session';
import { FakeTimers, MemoryStorage, socketFactory } from './fakes';

/** A start's key as the protocol takes it (docs/protocol.md §2): 16-64 of A-Z a-z 0-9 - _. */
const START_KEY = expect.stringMatching(/^[A-Za-z0-9_-]{16,64}$/);
const run = (s: WidgetState, ...a: WidgetAction[]) => a.reduce(widgetReducer, s);
const ev = (seq: number, kind: string, extra: Partial<ClientEvent> = {}): WidgetAction => ({ type: 'event', event: { type: 'event', kind, seq, at: seq * 1000, ...extra } });
const startedState = () => run(emptyWidgetState, { type: 'started', token: 'tok', conversation: 17 }, ev(1, 'started', { channel: 'web' }), ev(2, 'queued', { group: 'general' }));

describe('widget state', () => {
  it('dedupes by seq and tracks the operator', () => {
    let s = startedState();
    s = run(s, ev(3, 'message', { from: 'client', key: 'k', text: 'hi' }), ev(3, 'message', { from: 'client', key: 'k', text: 'hi' }), ev(2, 'queued'));
    expect(s.events.map((e) => e.seq)).toEqual([1, 2, 3]);
    s = run(s, ev(4, 'assigned', { name: 'Alice' }), ev(5, 'message', { from: 'operator', name: 'Alice', text: 'hello' }));
    expect(s.operatorName).toBe('Alice');
    expect(lastOperatorSeq(s)).toBe(5);
    expect(unreadFromOperator(s, 0)).toBe(1);
    expect(unreadFromOperator(s, 5)).toBe(0);
    s = run(s, ev(6, 'transferred'));
    expect(s.operatorName).toBeNull();
  });

  it('keeps pending messages until their event; ack marks them delivered', () => {
    let s = run(startedState(), { type: 'queue', message: { key: 'a', text: 'x', attachments: [], at: 1, state: 'sending' } });
    s = run(s, { type: 'ack', key: 'a', seq: 3 });
    expect(s.pending[0].ackSeq).toBe(3);
    s = run(s, ev(3, 'message', { from: 'client', key: 'a', text: 'x' }));
    expect(s.pending).toEqual([]);
    expect(run(s, { type: 'ack', key: 'a', seq: 3 })).toBe(s);
  });

  it('closes and rates', () => {
    let s = run(startedState(), ev(3, 'closed', { by: 'operator' }));
    expect(s.closed).toBe(true);
    s = run(s, ev(4, 'rated', { score: 5 }));
    expect(s.rated).toBe(true);
  });

  it('applies read marks from the operator only forward', () => {
    let s = run(startedState(), { type: 'read', by: 'operator', upto: 3 });
    expect(s.operatorReadUpto).toBe(3);
    expect(run(s, { type: 'read', by: 'operator', upto: 2 })).toBe(s);
    expect(run(s, { type: 'read', by: 'client', upto: 9 })).toBe(s);
  });

  it('caps the cached events', () => {
    let s = startedState();
    for (let i = 3; i < MAX_CACHED_EVENTS + 50; i++) s = run(s, ev(i, 'message', { from: 'client', key: 'k' + i, text: 'x' }));
    expect(s.events.length).toBe(MAX_CACHED_EVENTS);
    expect(s.lastSeq).toBe(MAX_CACHED_EVENTS + 49);
  });

  it('round-trips through storage', () => {
    let s = run(startedState(), ev(3, 'message', { from: 'client', key: 'k', text: 'hi' }), { type: 'queue', message: { key: 'p', text: 'later', attachments: [], at: 1, state: 'sending' } });
    const back = deserialize(serialize(s));
    expect(back.token).toBe('tok');
    expect(back.lastSeq).toBe(3);
    expect(back.events.map((e) => e.seq)).toEqual([1, 2, 3]);
    expect(back.pending.map((p) => p.key)).toEqual(['p']);
    expect(serialize(emptyWidgetState)).toBeNull();
  });

  it('shows the quick replies of the newest bot message only, until something answers it', () => {
    const person = ['Talk to a person'];
    const bot = (seq: number, buttons: string[] = person) => ev(seq, 'message', { from: 'bot', text: 'Hello!', buttons });
    let s = run(emptyWidgetState, { type: 'started', token: 'tok', conversation: 17 }, ev(1, 'started', { channel: 'web' }), ev(2, 'with_bot'));
    expect(withBot(s)).toBe(true);
    expect(quickReplies(s)).toBeNull();
    s = run(s, bot(3, ['Talk to a person', 'Track my order']));
    expect(quickReplies(s)).toEqual({ seq: 3, buttons: ['Talk to a person', 'Track my order'] });
    // A newer bot message takes over: only its buttons, under it.
    s = run(s, ev(4, 'message', { from: 'client', key: 'c1', text: 'where is my order' }));
    expect(quickReplies(s)).toBeNull();
    s = run(s, bot(5));
    expect(quickReplies(s)).toEqual({ seq: 5, buttons: person });
    // Entries that answer nothing leave them; one without buttons has none.
    expect(quickReplies(run(s, ev(6, 'notice', { text: 'We are busy' })))?.seq).toBe(5);
    expect(quickReplies(run(s, bot(6, [])))).toBeNull();
    // Tapped (or typed): the message being sent hides them at once, its event after it.
    const tapped = run(s, { type: 'queue', message: { key: 'c2', text: 'Talk to a person', attachments: [], at: 1, state: 'sending' } });
    expect(quickReplies(tapped)).toBeNull();
    s = run(tapped, ev(6, 'message', { from: 'client', key: 'c2', text: 'Talk to a person' }));
    expect(s.pending).toEqual([]);
    expect(quickReplies(s)).toBeNull();
    // Handed over: the conversation waits for a person, and the bot's buttons are gone.
    const handed = run(s, bot(7), ev(8, 'handoff'));
    expect(quickReplies(handed)).toBeNull();
    expect(withBot(handed)).toBe(false);
    expect(withBot(run(handed, ev(9, 'queued', { group: 'general' }), ev(10, 'assigned', { name: 'Alice' })))).toBe(false);
    // Closed by the bot: neither.
    const closed = run(s, bot(7), ev(8, 'closed', { by: 'system' }));
    expect(quickReplies(closed)).toBeNull();
    expect(withBot(closed)).toBe(false);
    // A conversation without a bot never had one.
    expect(withBot(startedState())).toBe(false);
  });

  it('keeps the quick replies of a greeting when the first message, written before it, lands after it', () => {
    // The widget starts the conversation with the visitor's first message waiting; a bot
    // that greets on `started` can commit its greeting before that message.
    const person = ['Talk to a person'];
    let s = run(emptyWidgetState, { type: 'queue', message: { key: 'first', text: 'Hi, a question', attachments: [], at: 1, state: 'sending' } });
    s = run(s, { type: 'started', token: 'tok', conversation: 17 }, ev(1, 'started', { channel: 'web' }), ev(2, 'with_bot'));
    s = run(s, ev(3, 'message', { from: 'bot', text: 'Hello!', buttons: person }));
    expect(quickReplies(s)).toEqual({ seq: 3, buttons: person });
    s = run(s, ev(4, 'message', { from: 'client', key: 'first', text: 'Hi, a question' }));
    expect(s.pending).toEqual([]);
    expect(quickReplies(s)).toEqual({ seq: 3, buttons: person });
    // Kept through a reload, too.
    expect(quickReplies(deserialize(serialize(s)))).toEqual({ seq: 3, buttons: person });
    // What the visitor sends after seeing the greeting answers it: sending, then sent.
    s = run(s, { type: 'queue', message: { key: 'second', text: 'Talk to a person', attachments: [], at: 2, state: 'sending' } });
    expect(quickReplies(s)).toBeNull();
    s = run(s, ev(5, 'message', { from: 'client', key: 'second', text: 'Talk to a person' }));
    expect(quickReplies(s)).toBeNull();
    // An operator's message answers it whatever the visitor saw.
    const answered = run(emptyWidgetState, { type: 'started', token: 'tok', conversation: 18 }, ev(1, 'with_bot'), ev(2, 'message', { from: 'bot', text: 'Hi', buttons: person }), ev(3, 'message', { from: 'operator', text: 'Alice here' }));
    expect(quickReplies(answered)).toBeNull();
  });

  it('keeps bot messages and their buttons through storage', () => {
    const s = run(startedState(), ev(3, 'with_bot'), ev(4, 'message', { from: 'bot', text: 'Hi', buttons: ['Talk to a person'] }));
    const back = deserialize(serialize(s));
    expect(quickReplies(back)).toEqual({ seq: 4, buttons: ['Talk to a person'] });
    expect(withBot(back)).toBe(true);
  });

  it('distrusts a cache that does not reach lastSeq, and garbage', () => {
    const bad = JSON.stringify({ v: 1, token: 't', lastSeq: 9, events: [{ kind: 'started', seq: 1, at: 1 }] });
    const s = deserialize(bad);
    expect(s.token).toBe('t');
    expect(s.lastSeq).toBe(0); // replay everything rather than show a gap
    expect(s.events).toEqual([]);
    expect(deserialize('{nope')).toBe(emptyWidgetState);
    expect(deserialize(JSON.stringify({ v: 99, token: 't' }))).toBe(emptyWidgetState);
    expect(deserialize(null)).toBe(emptyWidgetState);
  });
});

function widget(storage = new MemoryStorage(), timers = new FakeTimers()) {
  const f = socketFactory();
  const w = new WidgetSession({ origin: 'https://chat.example.com', storage, create: f.create, timers, backoff: new Backoff({ base: 1000, random: () => 0 }), attributes: () => ({ page: 'https://shop/x' }) });
  return { w, f, storage, timers };
}

describe('WidgetSession', () => {
  it('keeps the visitor token the server signed and presents it on the next start', () => {
    const { w, f, storage } = widget();
    expect(w.visitorToken).toBeNull();
    w.send('Hi');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'start', key: START_KEY, attributes: { page: 'https://shop/x' } });
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', visitor_token: 'v1.visitor.mac', protocol: 1 });
    expect(storage.getItem(VISITOR_KEY)).toBe('v1.visitor.mac');
    // A later visit, after that conversation was finished and forgotten.
    storage.removeItem(SESSION_KEY);
    const again = widget(storage);
    expect(again.w.visitorToken).toBe('v1.visitor.mac');
    again.w.send('Back again');
    again.f.last.open();
    expect(again.f.last.sent[0]).toEqual({ type: 'start', key: START_KEY, visitor_token: 'v1.visitor.mac', attributes: { page: 'https://shop/x' } });
  });

  it('keeps the conversations of two channels apart on one site, and the visitor shared', () => {
    const storage = new MemoryStorage();
    const f = socketFactory();
    const make = (channel?: string) =>
      new WidgetSession({ origin: 'https://chat.example.com', storage, channel, create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const support = make();
    support.send('Hi support');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 17, token: 'tok-support', visitor_token: 'v1.visitor.mac', protocol: 1 });
    const sales = make('sales');
    expect(sales.visitorToken).toBe('v1.visitor.mac');
    sales.send('Hi sales');
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'start', channel: 'sales', visitor_token: 'v1.visitor.mac' });
    f.last.frame({ type: 'started', conversation: 18, token: 'tok-sales', protocol: 1 });
    expect(JSON.parse(storage.getItem(SESSION_KEY)!).token).toBe('tok-support');
    expect(JSON.parse(storage.getItem(sessionKey('sales'))!).token).toBe('tok-sales');
    // After a reload each resumes its own.
    make('sales').resumeIfAny();
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'resume', token: 'tok-sales' });
    make().resumeIfAny();
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'resume', token: 'tok-support' });
  });

  it('a channel widget resumes, once, the conversation an earlier build stored for it under the plain key', () => {
    const f = socketFactory();
    const make = (storage: MemoryStorage, channel?: string) => new WidgetSession({ origin: 'https://chat.example.com', storage, channel, create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const stored = (token: string, channel: string, lastSeq = 2) => {
      const storage = new MemoryStorage();
      const events = lastSeq ? [{ type: 'event', kind: 'started', seq: 1, at: 1, channel }, { type: 'event', kind: 'queued', seq: 2, at: 2 }] : [];
      storage.setItem(SESSION_KEY, JSON.stringify({ v: 1, token, conversation: 18, lastSeq, events, pending: [] }));
      return storage;
    };
    // Started in the sales channel: the sales widget takes it over at once, with what was
    // seen of it, and leaves the plain key as it was.
    const before = stored('tok-sales-before', 'sales');
    before.setItem(SEEN_KEY, '7');
    const sales = make(before, 'sales');
    expect(sales.adoptedPlain).toBe(true);
    expect(JSON.parse(before.getItem(sessionKey('sales'))!).token).toBe('tok-sales-before');
    expect(before.getItem(SEEN_KEY + '.sales')).toBe('7');
    sales.resumeIfAny();
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'resume', token: 'tok-sales-before', last_seq: 2 });
    f.last.frame({ type: 'resumed', conversation: 18, last_seq: 2, protocol: 1 });
    f.last.frame({ type: 'event', kind: 'message', seq: 3, at: 3, from: 'operator', name: 'Alice', text: 'Still here' });
    expect(JSON.parse(before.getItem(sessionKey('sales'))!)).toMatchObject({ token: 'tok-sales-before', lastSeq: 3 });
    expect(JSON.parse(before.getItem(SESSION_KEY)!)).toMatchObject({ token: 'tok-sales-before', lastSeq: 2 });
    // Reloaded: it resumes its own copy. After a new conversation and a reload, the plain
    // key's is not taken again.
    expect(make(before, 'sales').adoptedPlain).toBe(false);
    make(before, 'sales').newConversation();
    expect(before.getItem(sessionKey('sales'))).toBeNull();
    const later = make(before, 'sales');
    expect(later.adoptedPlain).toBe(false);
    later.send('A new question');
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'start', channel: 'sales' });
    // Started in another channel (the default widget's): a sales widget leaves it alone.
    const support = stored('tok-support', 'web');
    const other = make(support, 'sales');
    expect(other.adoptedPlain).toBe(false);
    other.send('Hi sales');
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'start', channel: 'sales' });
    // A widget without data-channel reads the plain key as always.
    const plain = make(support);
    plain.resumeIfAny();
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'resume', token: 'tok-support' });
    // A browser where this build ran already, or no cached `started` event to tell the
    // channel: not taken.
    const marked = stored('tok-sales-again', 'sales');
    marked.setItem(KEYS_MARK, '1');
    expect(make(marked, 'sales').adoptedPlain).toBe(false);
    expect(make(stored('tok-unknown', 'sales', 0), 'sales').adoptedPlain).toBe(false);
  });

  it('forgets every channel\'s conversation when the site signs its customer out', () => {
    const storage = new MemoryStorage();
    const f = socketFactory();
    const make = (channel?: string) =>
      new WidgetSession({ origin: 'https://chat.example.com', storage, channel, identity: 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTQyIn0.c2ln', create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const sales = make('sales');
    sales.send('Hi sales');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 18, token: 'tok-sales', visitor_token: 'v1.visitor.mac', protocol: 1 });
    const support = make();
    support.send('Hi support');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 17, token: 'tok-support', protocol: 1 });
    expect(storage.getItem(sessionKey('sales'))).not.toBeNull();
    // Signed out on the support page: the sales page's conversation goes too.
    support.identify(null);
    expect(storage.getItem(SESSION_KEY)).toBeNull();
    expect(storage.getItem(sessionKey('sales'))).toBeNull();
    expect(storage.getItem(VISITOR_KEY)).toBeNull();
  });

  it('shows an identified customer\'s conversation only to that customer: a logout the widget never heard of leaves the next person nothing', () => {
    const storage = new MemoryStorage();
    const f = socketFactory();
    // `{"sub":"cust-42"}` and `{"sub":"cust-7"}`, as a site signs them.
    const cust42 = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTQyIn0.c2ln';
    const cust7 = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTcifQ.c2ln';
    expect(identityOwner(cust42)).toBe('|cust-42');
    expect(identityOwner('not-a-jwt')).toBeNull();
    const make = (identity?: string) => new WidgetSession({ origin: 'https://chat.example.com', storage, identity, create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const first = make(cust42);
    first.send('My card number ends in 4242');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 17, token: 'tok-42', visitor_token: 'v1.customer.mac', protocol: 1 });
    f.last.frame({ type: 'event', at: 1, kind: 'message', seq: 3, from: 'client', key: 'k', text: 'My card number ends in 4242' });
    expect(storage.getItem(ownerKey())).toBe('|cust-42');
    // The visitor token the verified start gave stands for the customer: memory only.
    expect(storage.getItem(VISITOR_KEY)).toBeNull();

    // The site logs them out with a redirect; the next page load has no identity.
    const stranger = make();
    expect(stranger.state.token).toBeNull();
    expect(stranger.state.events).toEqual([]);
    const sockets = f.sockets.length;
    stranger.resumeIfAny();
    expect(f.sockets.length).toBe(sockets);
    // Left stored, for its owner.
    expect(storage.getItem(SESSION_KEY)).toContain('4242');

    // The customer logs in again on a later page: theirs comes back and is resumed.
    const back = make();
    back.identify(cust42);
    expect(back.state.token).toBe('tok-42');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'resume', token: 'tok-42', last_seq: 3 });

    // Another customer's page: they never see it; once identified as another customer
    // on this browser, it is forgotten.
    const other = make(cust7);
    expect(other.state.token).toBeNull();
    expect(storage.getItem(SESSION_KEY)).toContain('4242');
    other.identify(cust7);
    expect(other.state.token).toBeNull();
    expect(storage.getItem(SESSION_KEY)).toBeNull();
    expect(storage.getItem(ownerKey())).toBeNull();
  });

  it('on a logout forgets every channel\'s conversation and whose it was, and drops a customer\'s visitor token an earlier build stored', () => {
    const storage = new MemoryStorage();
    const f = socketFactory();
    const cust42 = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTQyIn0.c2ln';
    const make = (channel?: string) => new WidgetSession({ origin: 'https://chat.example.com', storage, channel, identity: cust42, create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const sales = make('sales');
    sales.send('Hi sales');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 18, token: 'tok-sales', protocol: 1 });
    expect(storage.getItem(ownerKey('sales'))).toBe('|cust-42');
    const support = make();
    support.identify(null);
    expect(storage.getItem(sessionKey('sales'))).toBeNull();
    expect(storage.getItem(ownerKey('sales'))).toBeNull();
    // `{"kind":"visitor","visitor":"customer:ab12cd34:cust-42"}`, as an earlier build kept it.
    const old = 'v1.' + btoa(JSON.stringify({ kind: 'visitor', visitor: 'customer:ab12cd34:cust-42', exp: 1 })).replace(/=+$/, '') + '.mac';
    storage.setItem(VISITOR_KEY, old);
    expect(make('web').visitorToken).toBeNull();
  });

  it('forgets an identified customer\'s held conversation when someone else starts one', () => {
    const storage = new MemoryStorage();
    const f = socketFactory();
    const cust42 = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTQyIn0.c2ln';
    const make = (identity?: string) => new WidgetSession({ origin: 'https://chat.example.com', storage, identity, create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const first = make(cust42);
    first.send('Private');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 17, token: 'tok-42', protocol: 1 });
    const stranger = make();
    stranger.send('Hello, anyone?');
    f.last.open();
    expect(f.last.sent[0].type).toBe('start');
    f.last.frame({ type: 'started', conversation: 18, token: 'tok-anon', visitor_token: 'v1.anon.mac', protocol: 1 });
    expect(storage.getItem(SESSION_KEY)).toContain('tok-anon');
    expect(storage.getItem(SESSION_KEY)).not.toContain('Private');
    expect(storage.getItem(ownerKey())).toBeNull();
    expect(storage.getItem(VISITOR_KEY)).toBe('v1.anon.mac');
  });

  it('offers a returning visitor the name they gave last time', () => {
    const { w, f, storage } = widget();
    expect(w.storedName()).toBe('');
    w.setName('  Dana ');
    w.send('Hi');
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'start', name: 'Dana' });
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', visitor_token: 'v1.visitor.mac', protocol: 1 });
    storage.removeItem(SESSION_KEY);
    expect(widget(storage).w.storedName()).toBe('Dana');
  });

  it('sends the identity the site gave in start only, never in resume, and never stores it', () => {
    const storage = new MemoryStorage();
    const jwt = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTQyIn0.c2ln';
    const f = socketFactory();
    const timers = new FakeTimers();
    const w = new WidgetSession({ origin: 'https://chat.example.com', storage, create: f.create, timers, backoff: new Backoff({ base: 1000, random: () => 0 }), attributes: () => ({ page: 'https://shop/x' }), identity: jwt });
    w.send('Hi');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'start', key: START_KEY, identity: jwt, attributes: { page: 'https://shop/x' } });
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', visitor_token: 'v1.visitor.mac', protocol: 1 });
    // A reconnect resumes the conversation without it.
    f.last.drop();
    timers.advance(60_000);
    expect(f.sockets).toHaveLength(2);
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'resume', token: 'tok', last_seq: 0 });
    expect(f.sockets.flatMap((s) => s.sent).filter((x) => 'identity' in x).map((x) => x.type)).toEqual(['start']);
    expect([...storage.map.values()].some((v) => v.includes(jwt))).toBe(false);
  });

  it('has no identity in start unless the site set one; identify() sets it for the next start', () => {
    const { w, f } = widget();
    w.send('Hi');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'start', key: START_KEY, attributes: { page: 'https://shop/x' } });
    expect('identity' in f.last.sent[0]).toBe(false);
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    // The customer logs in on the site; the finished conversation is left for a new one.
    w.identify('  a.b.c  ');
    w.newConversation();
    w.send('Logged in now');
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'start', identity: 'a.b.c' });
    f.last.frame({ type: 'started', conversation: 18, token: 'tok2', protocol: 1 });
    // …and logs out: the next start has none.
    w.identify(null);
    w.newConversation();
    w.send('Logged out');
    f.last.open();
    expect(f.last.sent[0].type).toBe('start');
    expect('identity' in f.last.sent[0]).toBe(false);
  });

  it('on logout forgets the customer\'s conversation, transcript and name, so the next person sees none of it', () => {
    const { w, f, storage } = widget();
    w.identify('a.b.c');
    w.setName('Dana');
    w.send('My card number ends in 4242');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1, visitor_token: 'v1.x' });
    f.last.frame({ type: 'event', at: 1, kind: 'message', seq: 3, from: 'client', key: 'k', text: 'My card number ends in 4242' });
    expect(storage.getItem(SESSION_KEY)).toContain('4242');
    w.identify(null);
    expect(w.state.token).toBeNull();
    expect(w.state.events).toEqual([]);
    expect(storage.getItem(SESSION_KEY)).toBeNull();
    expect(storage.getItem(NAME_KEY)).toBeNull();
    expect(storage.getItem(VISITOR_KEY)).toBeNull();
    expect(w.storedName()).toBe('');
  });

  it('drops a made-up visitor id left by an older widget', () => {
    const storage = new MemoryStorage();
    storage.setItem(VISITOR_KEY, 'v-1234');
    const { w } = widget(storage);
    expect(w.visitorToken).toBeNull();
    expect(storage.getItem(VISITOR_KEY)).toBeNull();
  });

  it('a resume the server cannot take now is asked again shortly on the same socket', () => {
    const storage = new MemoryStorage();
    const first = widget(storage);
    first.w.send('Hello');
    first.f.last.open();
    first.f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    const { w, f, timers } = widget(storage);
    w.resumeIfAny();
    f.last.open();
    expect(f.last.ofType('resume')).toHaveLength(1);
    f.last.frame({ type: 'error', code: 'unavailable', message: 'the member is behind' });
    expect(f.last.ofType('resume')).toHaveLength(1);
    timers.advance(START_RETRY_MS);
    expect(f.last.ofType('resume')).toEqual([
      { type: 'resume', token: 'tok', last_seq: 0 },
      { type: 'resume', token: 'tok', last_seq: 0 },
    ]);
    f.last.frame({ type: 'resumed', conversation: 17, last_seq: 0, protocol: 1 });
    timers.advance(START_RETRY_MS * 5);
    expect(f.last.ofType('resume')).toHaveLength(2);
  });

  it('a resume refused for the address\'s budget of long replays is asked again later, not given up', () => {
    const storage = new MemoryStorage();
    const first = widget(storage);
    first.w.send('Hello');
    first.f.last.open();
    first.f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    const { w, f, timers } = widget(storage);
    w.resumeIfAny();
    f.last.open();
    f.last.frame({ type: 'error', code: 'rate_limited', message: 'too many long history replays from your address' });
    timers.advance(START_RETRY_MS);
    expect(f.last.ofType('resume')).toHaveLength(1);
    timers.advance(RESUME_LIMITED_RETRY_MS);
    expect(f.last.ofType('resume')).toHaveLength(2);
    f.last.frame({ type: 'resumed', conversation: 17, last_seq: 0, protocol: 1 });
    timers.advance(RESUME_LIMITED_RETRY_MS * 2);
    expect(f.last.ofType('resume')).toHaveLength(2);
  });

  it('restores the operator read mark from resumed', () => {
    const storage = new MemoryStorage();
    const first = widget(storage);
    first.w.send('Hello');
    first.f.last.open();
    first.f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    const { w, f } = widget(storage);
    w.resumeIfAny();
    f.last.open();
    expect(f.last.sent[0]).toMatchObject({ type: 'resume', token: 'tok' });
    f.last.frame({ type: 'resumed', conversation: 17, last_seq: 4, operator_read_upto: 3, protocol: 1 });
    expect(w.state.operatorReadUpto).toBe(3);
  });

  it('starts on the first message, then sends it', () => {
    const { w, f } = widget();
    w.resumeIfAny();
    expect(f.sockets).toHaveLength(0); // nothing stored, nothing to resume: no socket yet
    w.setName('Dana');
    const key = w.send('Hello');
    expect(f.last.url).toBe('wss://chat.example.com/ws/client');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'start', key: START_KEY, name: 'Dana', attributes: { page: 'https://shop/x' } });
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    expect(f.last.sent[1]).toEqual({ type: 'send', key, text: 'Hello' });
  });

  it('a refused start fails the first message instead of leaving it sending, and Retry starts again', async () => {
    const notices: string[] = [];
    const f = socketFactory();
    const timers = new FakeTimers();
    const w = new WidgetSession({ origin: 'https://chat.example.com', storage: new MemoryStorage(), create: f.create, timers, backoff: new Backoff({ base: 1000, random: () => 0 }), onNotice: (code) => notices.push(code) });
    const key = w.send('Hello');
    const upload = w.ensureStarted();
    f.last.open();
    expect(f.last.ofType('start')).toHaveLength(1);
    // A member moving: the same start is sent again shortly, the message still sending.
    f.last.frame({ type: 'error', code: 'unavailable', message: 'try again' });
    expect(w.state.pending[0].state).toBe('sending');
    timers.advance(START_RETRY_MS);
    expect(f.last.ofType('start')).toHaveLength(2);
    // The copy carries the first one's key: the server opens one conversation for both.
    const [first, copy] = f.last.ofType('start');
    expect(copy.key).toBe(first.key);
    // Refused for good: the message fails, waiters hear why, nothing hangs.
    f.last.frame({ type: 'error', code: 'rate_limited', message: 'too many conversations' });
    expect(w.state.pending[0].state).toBe('failed');
    await expect(upload).rejects.toThrow('rate_limited');
    expect(notices).toEqual(['rate_limited']);
    // Retry starts a conversation and sends the message once it has one.
    w.retry(key);
    expect(f.last.ofType('start')).toHaveLength(3);
    // The same start asked again: a copy before the refusal may have opened it.
    expect(f.last.ofType('start')[2].key).toBe(first.key);
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    expect(f.last.ofType('send')).toEqual([{ type: 'send', key, text: 'Hello' }]);
    // Once started, the next conversation is a new start with a new key.
    w.newConversation();
    w.ensureStarted();
    f.last.open();
    expect(f.last.ofType('start')[0].key).not.toBe(first.key);
  });

  it('a start whose answer was lost with its socket is asked again on the next socket with the same key', () => {
    const f = socketFactory();
    const timers = new FakeTimers();
    const w = new WidgetSession({ origin: 'https://chat.example.com', storage: new MemoryStorage(), create: f.create, timers, backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const key = w.send('Hello');
    f.last.open();
    const first = f.last.ofType('start')[0];
    f.last.drop();
    timers.advance(60_000);
    expect(f.sockets).toHaveLength(2);
    f.last.open();
    expect(f.last.ofType('start')).toEqual([first]);
    f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    expect(f.last.ofType('send')).toEqual([{ type: 'send', key, text: 'Hello' }]);
  });

  it('after a reload resumes from the stored seq, shows the cache at once, and gets no duplicates', () => {
    const storage = new MemoryStorage();
    const a = widget(storage);
    a.w.send('Hello');
    a.f.last.open();
    a.f.last.frame({ type: 'started', conversation: 17, token: 'tok', protocol: 1 });
    const key = a.f.last.sent[1].key;
    for (const e of [
      { kind: 'started', seq: 1, channel: 'web' },
      { kind: 'queued', seq: 2, group: 'general' },
      { kind: 'message', seq: 3, from: 'client', key, text: 'Hello' },
      { kind: 'assigned', seq: 4, name: 'Alice' },
      { kind: 'message', seq: 5, from: 'operator', name: 'Alice', text: 'Hi!' },
    ])
      a.f.last.frame({ type: 'event', at: 1, ...e });
    expect(JSON.parse(storage.getItem(SESSION_KEY)!).lastSeq).toBe(5);

    // "reload": a new session on the same storage
    const b = widget(storage);
    expect(b.w.state.events.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5]);
    b.w.resumeIfAny();
    b.f.last.open();
    expect(b.f.last.sent[0]).toEqual({ type: 'resume', token: 'tok', last_seq: 5 });
    b.f.last.frame({ type: 'resumed', conversation: 17, last_seq: 6, protocol: 1 });
    b.f.last.frame({ type: 'event', at: 1, kind: 'message', seq: 5, from: 'operator', text: 'Hi!' }); // overlap: ignored
    b.f.last.frame({ type: 'event', at: 1, kind: 'message', seq: 6, from: 'operator', text: 'Anything else?' });
    expect(b.w.state.events.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it('re-sends a message typed before a reload that was never acknowledged', () => {
    const storage = new MemoryStorage();
    const a = widget(storage);
    a.w.send('first');
    a.f.last.open();
    a.f.last.frame({ type: 'started', conversation: 1, token: 'tok', protocol: 1 });
    a.f.last.drop();
    const key = a.w.send('typed while offline');
    const b = widget(storage);
    b.w.resumeIfAny();
    b.f.last.open();
    b.f.last.frame({ type: 'resumed', conversation: 1, last_seq: 0, protocol: 1 });
    expect(b.f.last.ofType('send').map((x) => x.key)).toContain(key);
  });

  it('replays from the start when its last_seq is ahead, and forgets a dead session', () => {
    const storage = new MemoryStorage();
    storage.setItem(SESSION_KEY, JSON.stringify({ v: 1, token: 'tok', lastSeq: 2, events: [{ kind: 'started', seq: 1, at: 1 }, { kind: 'queued', seq: 2, at: 1 }] }));
    const { w, f } = widget(storage);
    w.resumeIfAny();
    f.last.open();
    f.last.frame({ type: 'error', code: 'invalid', message: 'ahead' });
    expect(f.last.sent.at(-1)).toEqual({ type: 'resume', token: 'tok', last_seq: 0 });
    expect(w.state.events).toEqual([]);
    const notices: string[] = [];
    w.onNotice = (c) => notices.push(c);
    f.last.frame({ type: 'error', code: 'unauthorized', message: 'bad token' });
    expect(w.state.token).toBeNull();
    expect(storage.getItem(SESSION_KEY)).toBeNull();
    expect(notices).toEqual(['session_lost']);
  });

  it('follows the conversation another tab started instead of starting a second one', () => {
    const storage = new MemoryStorage();
    const f = socketFactory();
    const make = () => new WidgetSession({ origin: 'https://chat.example.com', storage, create: f.create, timers: new FakeTimers(), backoff: new Backoff({ base: 1000, random: () => 0 }) });
    const a = make();
    const b = make();
    // Tab C is open too, and will never hear of A's conversation before its visitor writes.
    const c = make();
    a.send('From tab A');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 17, token: 'tok-a', protocol: 1 });
    // Tab B hears of it: it shows and follows that conversation.
    b.storageChanged(SESSION_KEY, storage.getItem(SESSION_KEY));
    expect(b.state.token).toBe('tok-a');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'resume', token: 'tok-a', last_seq: 0 });
    // Tab C never heard of it (no event yet): writing there joins it too, and leaves it
    // stored.
    const key = c.send('From tab C');
    expect(storage.getItem(SESSION_KEY)).toContain('tok-a');
    f.last.open();
    expect(f.last.sent[0]).toEqual({ type: 'resume', token: 'tok-a', last_seq: 0 });
    f.last.frame({ type: 'resumed', last_seq: 2, protocol: 1 });
    // (Tab A's message, stored unacknowledged, goes again with its key: written once.)
    expect(f.last.ofType('send').map((x) => x.text)).toEqual(['From tab A', 'From tab C']);
    expect(f.last.ofType('send').map((x) => x.key)).toContain(key);
    expect(f.sockets.flatMap((s) => s.sent).filter((x) => x.type === 'start')).toHaveLength(1);
  });

  it('keeps what the visitor wrote when their stored conversation is gone, and sends it in a new one', () => {
    const storage = new MemoryStorage();
    storage.setItem(SESSION_KEY, JSON.stringify({ v: 1, token: 'tok-old', lastSeq: 2, events: [{ kind: 'started', seq: 1, at: 1 }, { kind: 'queued', seq: 2, at: 1 }] }));
    const { w, f, timers } = widget(storage);
    w.resumeIfAny();
    f.last.open();
    const key = w.send('Is anyone there?');
    f.last.frame({ type: 'error', code: 'not_found', message: 'no such conversation' });
    expect(w.state.pending.map((p) => [p.key, p.state])).toEqual([[key, 'sending']]);
    timers.advance(60_000);
    f.last.open();
    expect(f.last.sent[0].type).toBe('start');
    f.last.frame({ type: 'started', conversation: 9, token: 'tok-new', protocol: 1 });
    expect(f.last.ofType('send').map((x) => [x.key, x.text])).toEqual([[key, 'Is anyone there?']]);
  });

  it('sends a message answered unavailable or rate_limited again with its key, then shows it failed', () => {
    const { w, f, timers } = widget();
    const key = w.send('x');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 1, token: 'tok', protocol: 1 });
    expect(f.last.ofType('send')).toHaveLength(1);
    f.last.frame({ type: 'error', code: 'unavailable', ref: key });
    expect(w.state.pending[0].state).toBe('sending');
    timers.advance(1000);
    expect(f.last.ofType('send').map((x) => x.key)).toEqual([key, key]);
    for (let i = 2; i <= 6; i++) {
      f.last.frame({ type: 'error', code: 'rate_limited', ref: key });
      timers.advance(20_000);
    }
    expect(w.state.pending[0].state).toBe('failed');
    expect(f.last.ofType('send')).toHaveLength(6);
  });

  it('marks sends as failed on their error, throttles typing, read marks only forward', () => {
    const { w, f, timers } = widget();
    const key = w.send('x');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 1, token: 'tok', protocol: 1 });
    f.last.frame({ type: 'error', code: 'closed', ref: key });
    expect(w.state.pending[0].state).toBe('failed');
    w.typing();
    w.typing();
    timers.advance(3000);
    w.typing();
    expect(f.last.ofType('typing')).toHaveLength(2);
    f.last.frame({ type: 'event', at: 1, kind: 'message', seq: 4, from: 'operator', text: 'hi' });
    w.markRead();
    w.markRead();
    expect(f.last.ofType('read')).toEqual([{ type: 'read', upto: 4 }]);
  });

  it('sends nothing on a socket that does not follow its conversation, and follows it again when the server says it does not', () => {
    const { w, f, timers } = widget();
    const notices: string[] = [];
    w.onNotice = (code) => notices.push(code);
    w.send('first');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 1, token: 'tok', protocol: 1 });
    // A reconnect whose resume the member cannot take now: nothing is sent meanwhile.
    f.last.drop();
    timers.advance(60_000);
    f.last.open();
    expect(f.last.sent).toEqual([{ type: 'resume', token: 'tok', last_seq: 0 }]);
    f.last.frame({ type: 'error', code: 'unavailable', message: 'try again' });
    const key = w.send('while resuming');
    w.typing();
    f.last.frame({ type: 'event', at: 1, kind: 'message', seq: 2, from: 'operator', text: 'hi' });
    w.markRead();
    expect(f.last.sent.map((x) => x.type)).toEqual(['resume']);
    timers.advance(1000);
    f.last.frame({ type: 'resumed', last_seq: 2, protocol: 1 });
    expect(f.last.ofType('send').map((x) => x.key)).toContain(key);
    // The server answers a read mark it could not take (it lost the follow): no banner,
    // and the widget resumes on the socket.
    f.last.frame({ type: 'error', code: 'no_conversation', for: 'read', message: 'send "start" or "resume" first' });
    expect(notices).toEqual([]);
    expect(f.last.sent[f.last.sent.length - 1]).toEqual({ type: 'resume', token: 'tok', last_seq: 2 });
    expect(w.state.pending.find((p) => p.key === key)?.state).toBe('sending');
  });

  it('sends a close again when the socket turned out not to follow, and asks again later each time', () => {
    const { w, f, timers } = widget();
    w.send('x');
    f.last.open();
    f.last.frame({ type: 'started', conversation: 1, token: 'tok', protocol: 1 });
    w.close();
    expect(f.last.ofType('close')).toHaveLength(1);
    f.last.frame({ type: 'error', code: 'no_conversation', message: 'send "start" or "resume" first' });
    expect(f.last.sent.at(-1)).toEqual({ type: 'resume', token: 'tok', last_seq: 0 });
    f.last.frame({ type: 'resumed', last_seq: 1, protocol: 1 });
    expect(f.last.ofType('close')).toHaveLength(2);
    // Failing again and again: the next resume waits a second, then two.
    const resumes = () => f.last.ofType('resume').length;
    f.last.frame({ type: 'error', code: 'no_conversation', message: 'again' });
    expect(resumes()).toBe(1);
    timers.advance(1000);
    expect(resumes()).toBe(2);
    f.last.frame({ type: 'resumed', last_seq: 1, protocol: 1 });
    f.last.frame({ type: 'error', code: 'no_conversation', message: 'again' });
    timers.advance(1000);
    expect(resumes()).toBe(2);
    timers.advance(1000);
    expect(resumes()).toBe(3);
    // Its event ends it: a later refollow does not close twice.
    f.last.frame({ type: 'resumed', last_seq: 1, protocol: 1 });
    f.last.frame({ type: 'event', at: 2, kind: 'closed', seq: 2, by: 'client' });
    const closes = f.last.ofType('close').length;
    f.last.frame({ type: 'error', code: 'no_conversation', message: 'again' });
    f.last.frame({ type: 'resumed', last_seq: 2, protocol: 1 });
    expect(f.last.ofType('close').length).toBe(closes);
  });

  it('reads the emergency notice of its channel, and says nothing when it cannot', async () => {
    const f = socketFactory();
    const answers = [new Response(JSON.stringify({ notice: 'Payments are down', since: 1 })), new Response(JSON.stringify({ notice: null })), new Response('', { status: 404 })];
    const fetcher = vi.fn(async () => answers.shift()!);
    const w = new WidgetSession({ origin: 'https://c.example', storage: new MemoryStorage(), create: f.create, timers: new FakeTimers(), fetcher, channel: 'shop web' });
    await expect(w.emergencyNotice()).resolves.toBe('Payments are down');
    expect((fetcher.mock.calls[0] as unknown as [string])[0]).toBe('https://c.example/notice?channel=shop%20web');
    await expect(w.emergencyNotice()).resolves.toBe(null);
    await expect(w.emergencyNotice()).resolves.toBe(null);
  });

  it('reads the closed notice outside working hours along with the emergency notice', async () => {
    const f = socketFactory();
    const closed = { message: 'We open at 9.', opens_at: 1_800_000_000_000, action: 'reply' };
    const answers = [
      new Response(JSON.stringify({ notice: 'Payments are down', closed })),
      new Response(JSON.stringify({ notice: null, closed: null })),
      new Response(JSON.stringify({ notice: 'Old server' })),
      new Response('', { status: 500 }),
      new Response(JSON.stringify({ notice: null, closed })),
    ];
    const fetcher = vi.fn(async () => answers.shift()!);
    const w = new WidgetSession({ origin: 'https://c.example', storage: new MemoryStorage(), create: f.create, timers: new FakeTimers(), fetcher });
    await expect(w.notices()).resolves.toEqual({ emergency: 'Payments are down', closed });
    expect((fetcher.mock.calls[0] as unknown as [string])[0]).toBe('https://c.example/notice');
    await expect(w.notices()).resolves.toEqual({ emergency: null, closed: null });
    await expect(w.notices()).resolves.toEqual({ emergency: 'Old server', closed: null });
    await expect(w.notices()).resolves.toEqual({ emergency: null, closed: null });
    // The emergency-only reader still answers as before.
    await expect(w.emergencyNotice()).resolves.toBe(null);
  });

  it('parses a closed notice tolerantly', () => {
    expect(parseNotices({ closed: { message: 'Closed', opens_at: null, action: 'wait' } })).toEqual({ emergency: null, closed: { message: 'Closed', opens_at: null, action: 'wait' } });
    expect(parseNotices({ closed: {} })).toEqual({ emergency: null, closed: { message: '', opens_at: null, action: 'reply' } });
    expect(parseNotices(null)).toEqual({ emergency: null, closed: null });
    expect(parseNotices({ notice: 5, closed: 'yes' })).toEqual({ emergency: null, closed: null });
  });

  it('uploads with the client token and the file type', async () => {
    const fetcher = vi.fn(async () => new Response(JSON.stringify({ id: 'a1', name: 'p.png', content_type: 'image/png', size: 3 }), { status: 201 }));
    const f = socketFactory();
    const w = new WidgetSession({ origin: 'https://c.example', storage: new MemoryStorage(), create: f.create, timers: new FakeTimers(), fetcher });
    const up = w.upload(Object.assign(new Blob(['abc']), { name: 'p.png' }));
    f.last.open();
    f.last.frame({ type: 'started', conversation: 1, token: 't/1', protocol: 1 });
    await expect(up).resolves.toMatchObject({ id: 'a1' });
    const [url, init] = fetcher.mock.calls[0] as unknown as [string, RequestInit];
    expect(url).toBe('https://c.example/attachments?token=t%2F1&name=p.png');
    expect((init.headers as Record<string, string>)['Content-Type']).toBe('image/png');
    expect(w.attachmentUrl('a1')).toBe('https://c.example/attachments/a1?token=t%2F1');
  });

  it('does not reconnect for a finished conversation until the visitor rates it', () => {
    const storage = new MemoryStorage();
    storage.setItem(SESSION_KEY, JSON.stringify({ v: 1, token: 'tok', lastSeq: 2, closed: true, events: [{ kind: 'started', seq: 1, at: 1 }, { kind: 'closed', seq: 2, at: 2, by: 'operator' }] }));
    const { w, f } = widget(storage);
    w.resumeIfAny();
    expect(f.sockets).toHaveLength(0);
    w.rate(4, 'ok');
    expect(f.sockets).toHaveLength(1);
    f.last.open();
    expect(f.last.sent).toEqual([{ type: 'resume', token: 'tok', last_seq: 2 }]);
    f.last.frame({ type: 'resumed', conversation: 1, last_seq: 2, protocol: 1 });
    expect(f.last.sent.at(-1)).toEqual({ type: 'rate', score: 4, comment: 'ok' });
  });
});
