/**
 * The widget's connection: start or resume over /ws/client, persistence of the session,
 * re-sending unacknowledged messages with their keys, typing and read marks, uploads.
 */
import { Backoff } from '../shared/backoff';
import { uid } from '../shared/ids';
import { ReconnectingSocket, type LinkState, type SocketLike, type Timers, realTimers } from '../shared/socket';
import { createStore, type Store } from '../shared/store';
import { contentTypeOf, type Attachment } from '../shared/files';
import { deserialize, serialize, storedChannel, widgetReducer, lastOperatorSeq, type WidgetAction, type WidgetState } from './widget-state';

export const SESSION_KEY = 'switchboard.widget.session';
/** Where a widget keeps its conversation: its channel's own key, so two widgets of
 *  different channels on one site keep theirs apart (the default channel keeps the
 *  plain key). The visitor's token and name are the person's, shared by both. */
export function sessionKey(channel?: string): string {
  return channel ? `${SESSION_KEY}.${channel}` : SESSION_KEY;
}
export const VISITOR_KEY = 'switchboard.widget.visitor';
/** Whose conversation the session under `sessionKey(channel)` is, when it was started
 *  with a customer's identity: their `iss` and `sub` (see `identityOwner`). Such a session is shown
 *  and resumed only once the page identifies that customer again. */
export const OWNER_KEY = 'switchboard.widget.owner';
export function ownerKey(channel?: string): string {
  return channel ? `${OWNER_KEY}.${channel}` : OWNER_KEY;
}

/** Whether a `visitor_token` (`v1.<payload>.<mac>`) stands for a verified customer
 *  (`customer:…`), as one from a start with an identity does. */
function namesCustomer(token: string): boolean {
  const payload = token.split('.')[1];
  if (!payload) return false;
  try {
    const claims = JSON.parse(atob(payload.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(payload.length / 4) * 4, '=')));
    return typeof claims?.visitor === 'string' && claims.visitor.startsWith('customer:');
  } catch {
    return false;
  }
}

/** The customer an identity token names, to match a stored session against: `iss` and
 *  `sub` of its (unverified: only the server verifies it) payload; null when unreadable. */
export function identityOwner(token: string | null): string | null {
  const payload = token?.split('.')[1];
  if (!payload) return null;
  try {
    const json = atob(payload.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(payload.length / 4) * 4, '='));
    const claims = JSON.parse(json);
    return claims && typeof claims.sub === 'string' && claims.sub ? `${typeof claims.iss === 'string' ? claims.iss : ''}|${claims.sub}` : null;
  } catch {
    return null;
  }
}
/** How many of the operator's messages the visitor has seen (per channel as the session). */
export const SEEN_KEY = 'switchboard.widget.seen';
/** Written by every widget of a build with per-channel keys: a browser that has it does
 *  not take a conversation over from the plain key again (see `WidgetSession.stored`). */
export const KEYS_MARK = 'switchboard.widget.keys';
/** The name the visitor gave last time: offered again on their next conversation. */
export const NAME_KEY = 'switchboard.widget.name';
/** How soon a `start` the server could not take now (`unavailable`) is sent again. */
export const START_RETRY_MS = 1000;
/** How many times a message answered `unavailable` or `rate_limited` is sent again on
 *  its own before it shows as failed (the visitor may then retry it). */
export const MAX_SEND_RETRIES = 5;
/** The first wait before a message refused for the socket's rate is sent again. */
export const SEND_LIMITED_RETRY_MS = 2000;
/** How long a resume refused for the address's budget of long replays waits. */
export const RESUME_LIMITED_RETRY_MS = 10_000;

/** A usable identity token: a non-empty string (trimmed), else null. One the server
 *  cannot verify is still passed on, so staff see why (`identity: "unverified: …"`). */
function identityToken(token: unknown): string | null {
  return typeof token === 'string' && token.trim() ? token.trim() : null;
}

export interface KV {
  getItem(k: string): string | null;
  setItem(k: string, v: string): void;
  removeItem(k: string): void;
  /** Listing (as `localStorage` has): lets a sign-out find every channel's session. */
  readonly length?: number;
  key?(i: number): string | null;
}

export interface WidgetSessionOptions {
  /** http(s) origin of the public listener, e.g. https://chat.example.com */
  origin: string;
  storage?: KV | null;
  create?: (url: string) => SocketLike;
  timers?: Timers;
  backoff?: Backoff;
  fetcher?: (url: string, init?: RequestInit) => Promise<Response>;
  onNotice?: (code: string, message?: string) => void;
  onLink?: (s: LinkState) => void;
  /** Extra attributes for start (page URL, language). */
  attributes?: () => Record<string, string>;
  channel?: string;
  /** The customer's identity as the embedding site signed it (a JWT), sent as `identity`
   *  in the next `start` (see identify()). */
  identity?: string | null;
}

/** Outside the group's working hours: what the customer is told, when it opens again
 *  (ms since the epoch; null: not known), and what happens to what they write (`reply`:
 *  the message is the answer and the chat closes, `wait`, `transfer`). */
export interface ClosedNotice {
  message: string;
  opens_at: number | null;
  action: string;
}

export interface Notices {
  emergency: string | null;
  closed: ClosedNotice | null;
}

const NO_NOTICES: Notices = { emergency: null, closed: null };

/** `GET /notice`'s body; an older server has no `closed`, a malformed part is ignored. */
export function parseNotices(body: any): Notices {
  const c = body?.closed;
  return {
    emergency: typeof body?.notice === 'string' ? body.notice : null,
    closed:
      c && typeof c === 'object'
        ? {
            message: typeof c.message === 'string' ? c.message : '',
            opens_at: typeof c.opens_at === 'number' ? c.opens_at : null,
            action: typeof c.action === 'string' ? c.action : 'reply',
          }
        : null,
  };
}

function safeStorage(storage: KV | null | undefined): KV | null {
  if (!storage) return null;
  try {
    const k = '__sb_probe__';
    storage.setItem(k, '1');
    storage.removeItem(k);
    return storage;
  } catch {
    return null;
  }
}

export class WidgetSession {
  readonly store: Store<WidgetState, WidgetAction>;
  readonly link: ReconnectingSocket;
  /** The identity the server signed for this visitor at their first start; it links
   *  their conversations for the operator's client card. Null until then. */
  visitorToken: string | null;
  private storage: KV | null;
  private timers: Timers;
  private wantStart = false;
  /** The key of the start being asked for: every copy of it (after `unavailable`, or on
   *  a new socket when the answer was lost) carries the same one, so the server opens
   *  one conversation however many copies reach it. A new start gets a new key. */
  private startKey: string | null = null;
  private visitorName = '';
  /** The site's credential for its customer: kept in memory only, never in storage. */
  private identity: string | null;
  /** Whose the current conversation is, when it was started with an identity. */
  private owner: string | null = null;
  /** A stored conversation of an identified customer this page has not identified (yet):
   *  neither shown nor resumed, and left in storage, until `identify` names its owner. */
  private held: { text: string | null; owner: string } | null = null;
  /** The `start` being asked for carries an identity. */
  private startIdentified = false;
  /** Messages sent again on their own after `unavailable` or `rate_limited`, by key. */
  private sendRetries = new Map<string, number>();
  /** The conversation this tab last stored (or loaded): the one it may remove. */
  private storedToken: string | null = null;
  /** Whose the conversation being started is (decided when its `start` is sent). */
  private startOwner: string | null = null;
  /** `close` and `rate` frames sent and not answered by their event yet: sent again
   *  when the socket turns out not to follow the conversation. */
  private unansweredControl: Record<string, unknown>[] = [];
  /** Resumes asked again on this socket in a row (see `refollow`): each waits longer. */
  private refollows = 0;
  private resuming = false;
  private lastTypingSent = 0;
  private lastReadSent = 0;
  private startWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  /** Control frames (close, rate) waiting for the socket to follow the conversation. */
  private queued: Record<string, unknown>[] = [];
  private following = false;
  /** This widget resumed the conversation stored under the plain key (see `stored`). */
  adoptedPlain = false;
  readMarksSupported = true;
  /** Listeners the UI sets: connection state, and notices (error codes, `session_lost`). */
  onLink: ((s: LinkState) => void) | undefined;
  onNotice: ((code: string, message?: string) => void) | undefined;
  linkState: LinkState;

  constructor(private readonly opts: WidgetSessionOptions) {
    this.onLink = opts.onLink;
    this.onNotice = opts.onNotice;
    this.storage = safeStorage(opts.storage);
    this.timers = opts.timers ?? realTimers;
    this.identity = identityToken(opts.identity);
    // Only a server-signed token is kept: an id the browser made up proves nothing.
    const stored = this.read(VISITOR_KEY);
    // Nor one an earlier build stored after a verified start: it stands for a customer.
    this.visitorToken = stored && stored.startsWith('v1.') && stored.length <= 2048 && !namesCustomer(stored) ? stored : null;
    if (stored && !this.visitorToken) this.write(VISITOR_KEY, null);
    // An identified customer's conversation comes back only to that customer: after a
    // logout that did not tell the widget (a reload, a redirect), the next person on
    // this browser sees nothing of it.
    const text = this.stored();
    const owner = this.read(ownerKey(this.opts.channel));
    if (owner && owner !== identityOwner(this.identity)) {
      this.held = { text, owner };
      this.store = createStore(widgetReducer, deserialize(null));
    } else {
      this.owner = owner;
      this.store = createStore(widgetReducer, deserialize(text));
      this.storedToken = this.store.get().token;
    }
    this.store.subscribe((s) => this.persist(s));
    this.link = new ReconnectingSocket({
      url: () => opts.origin.replace(/^http/, 'ws') + '/ws/client',
      create: opts.create ?? ((u) => new WebSocket(u) as unknown as SocketLike),
      timers: this.timers,
      backoff: opts.backoff ?? new Backoff({ base: 1000, max: 30000 }),
      idleMs: 25000,
      onOpen: () => this.onOpen(),
      onFrame: (f) => this.onFrame(f),
      onState: (s) => {
        this.linkState = s;
        this.onLink?.(s);
      },
    });
    this.linkState = this.link.state;
  }

  /** The channel this widget starts its conversations in (`data-channel`), if set. */
  get channel(): string | undefined {
    return this.opts.channel;
  }

  private read(k: string): string | null {
    try {
      return this.storage?.getItem(k) ?? null;
    } catch {
      return null;
    }
  }

  private write(k: string, v: string | null): void {
    try {
      if (v == null) this.storage?.removeItem(k);
      else this.storage?.setItem(k, v);
    } catch {
      /* quota or privacy mode: the session lasts for this page only */
    }
  }

  private persist(s: WidgetState): void {
    // A held conversation stays as stored until its owner is identified or dropped.
    if (this.held) return;
    const text = serialize(s);
    if (!text) {
      this.owner = null;
      // Only what this tab stored is removed: a conversation another tab started, which
      // this one has not taken up yet, stays (see `ensureStarted`).
      if (this.storedToken == null) return;
      this.storedToken = null;
    } else {
      this.storedToken = s.token;
    }
    this.write(sessionKey(this.opts.channel), text);
    this.write(ownerKey(this.opts.channel), text ? this.owner : null);
  }

  /** Another tab wrote this widget's session (`storage` event): a conversation it
   *  started while this one has none open is this tab's too (shown and followed), so
   *  that writing here does not start a second one and overwrite it. */
  storageChanged(key: string | null, value: string | null): void {
    if (key !== sessionKey(this.opts.channel) || this.held || !value) return;
    // An identified customer's, when this tab is not identified as them: not shown.
    const owner = this.read(ownerKey(this.opts.channel));
    if (owner && owner !== identityOwner(this.identity)) return;
    const theirs = deserialize(value);
    // Not a finished one, nor while this tab's own start is under way.
    if (!theirs.token || theirs.closed || theirs.token === this.state.token || this.wantStart) return;
    if (this.state.token && !this.state.closed) return;
    this.adopt(theirs);
  }

  /** Takes over `theirs`, a conversation another tab started, and follows it. */
  private adopt(theirs: WidgetState): void {
    const waiting = this.state.pending.filter((p) => p.state === 'sending' && p.ackSeq == null);
    this.link.stop();
    this.wantStart = false;
    this.startKey = null;
    this.following = false;
    this.owner = this.read(ownerKey(this.opts.channel));
    this.storedToken = theirs.token;
    this.store.dispatch({ type: 'restore', state: theirs });
    // What this tab's visitor wrote meanwhile goes into that conversation.
    for (const p of waiting) this.store.dispatch({ type: 'queue', message: { ...p, seenSeq: undefined } });
    for (const w of this.startWaiters.splice(0)) w.resolve();
    if (!theirs.closed || waiting.length) this.link.start();
  }

  /** Forgets a held conversation of another customer (someone else starts one here). */
  private dropHeld(): void {
    if (!this.held) return;
    const { owner } = this.held;
    this.held = null;
    // Unless another tab has stored a conversation there since.
    if (this.read(ownerKey(this.opts.channel)) !== owner) return;
    this.write(sessionKey(this.opts.channel), null);
    this.write(ownerKey(this.opts.channel), null);
    this.write(this.opts.channel ? `${SEEN_KEY}.${this.opts.channel}` : SEEN_KEY, null);
  }

  /** This widget's stored session. Once, on the first load of a build with per-channel
   *  keys in this browser (no `KEYS_MARK` yet), a widget with a `data-channel` that has
   *  none of its own takes over the one under the plain key if that conversation was
   *  started in its channel (its cached `started` event says so): earlier builds kept
   *  every widget's there. It copies it, and what was seen of it, under its own keys and
   *  leaves the plain key as it is (a widget without `data-channel` may be using it). */
  private stored(): string | null {
    const key = sessionKey(this.opts.channel);
    const own = this.read(key);
    const upgraded = this.read(KEYS_MARK) != null;
    this.write(KEYS_MARK, '1');
    if (own || !this.opts.channel || upgraded) return own;
    const plain = this.read(SESSION_KEY);
    if (storedChannel(plain) !== this.opts.channel) return null;
    this.write(key, plain);
    const seen = this.read(SEEN_KEY);
    if (seen != null && this.read(`${SEEN_KEY}.${this.opts.channel}`) == null) this.write(`${SEEN_KEY}.${this.opts.channel}`, seen);
    this.adoptedPlain = true;
    return plain;
  }

  get state(): WidgetState {
    return this.store.get();
  }

  /** Resumes a stored conversation, if there is one that is still open (a finished one
   *  needs no socket until the visitor rates it or starts anew). */
  resumeIfAny(): void {
    if (this.state.token && !this.state.closed) this.link.start();
  }

  private onOpen(): void {
    this.following = false;
    const s = this.state;
    if (s.token) {
      this.resuming = true;
      this.link.send({ type: 'resume', token: s.token, last_seq: s.lastSeq });
    } else if (this.wantStart) {
      const frame: Record<string, unknown> = { type: 'start' };
      if (!this.startKey) this.startKey = uid();
      frame.key = this.startKey;
      if (this.visitorToken) frame.visitor_token = this.visitorToken;
      if (this.opts.channel) frame.channel = this.opts.channel;
      if (this.visitorName) frame.name = this.visitorName;
      if (this.identity) frame.identity = this.identity;
      this.startIdentified = !!this.identity;
      this.startOwner = this.identity ? identityOwner(this.identity) ?? 'unreadable' : null;
      const attrs = this.opts.attributes?.();
      if (attrs && Object.keys(attrs).length) frame.attributes = attrs;
      this.link.send(frame);
    }
  }

  onFrame(f: any): void {
    if (!f || typeof f.type !== 'string') return;
    switch (f.type) {
      case 'started':
        this.wantStart = false;
        this.startKey = null;
        this.following = true;
        this.link.markHealthy();
        // Started with an identity: the conversation is that customer's, and so is the
        // visitor token the server gave (it stands for them for a year), which is kept in
        // memory only; the identity brings it back on their next visit.
        this.owner = this.startOwner;
        this.store.dispatch({ type: 'started', token: f.token, conversation: f.conversation });
        if (typeof f.visitor_token === 'string' && f.visitor_token.startsWith('v1.')) {
          this.visitorToken = f.visitor_token;
          if (!this.startIdentified) this.write(VISITOR_KEY, f.visitor_token);
        }
        if (this.visitorName) this.write(NAME_KEY, this.visitorName);
        this.lastReadSent = 0;
        for (const w of this.startWaiters.splice(0)) w.resolve();
        this.flush();
        break;
      case 'resumed':
        this.resuming = false;
        this.following = true;
        // The operator's read mark is committed: a reload or reconnect keeps the ✓✓.
        if (typeof f.operator_read_upto === 'number') this.store.dispatch({ type: 'read', by: 'operator', upto: f.operator_read_upto });
        this.link.markHealthy();
        this.flush();
        break;
      case 'event':
        this.refollows = 0;
        if (f.kind === 'closed') this.unansweredControl = this.unansweredControl.filter((c) => c.type !== 'close');
        if (f.kind === 'rated') this.unansweredControl = this.unansweredControl.filter((c) => c.type !== 'rate');
        this.store.dispatch({ type: 'event', event: f });
        break;
      case 'ack':
        this.refollows = 0;
        this.sendRetries.delete(f.key);
        this.store.dispatch({ type: 'ack', key: f.key, seq: f.seq });
        break;
      case 'typing':
        if (f.from === 'operator') this.store.dispatch({ type: 'typing', now: this.timers.now(), name: f.name });
        break;
      case 'read':
        if (typeof f.upto === 'number') this.store.dispatch({ type: 'read', by: f.by, upto: f.upto });
        break;
      case 'error':
        this.onError(f);
        break;
      default:
        break;
    }
  }

  private onError(f: { code: string; ref?: unknown; for?: unknown; message?: string }): void {
    const ref = f.ref == null ? '' : String(f.ref);
    // A typing or read mark that could not be taken: nothing the visitor needs to hear.
    if (f.for === 'typing' || f.for === 'read') {
      if (f.for === 'read' && (f.code === 'unknown_type' || f.code === 'bad_frame')) this.readMarksSupported = false;
      if (f.code === 'no_conversation') this.refollow();
      return;
    }
    // This socket does not follow the conversation after all (following it failed on the
    // server after it said `started` or `resumed`): follow it again; what is pending
    // goes out once it does.
    if (f.code === 'no_conversation' && this.state.token) {
      if (ref && this.state.pending.some((p) => p.key === ref)) {
        this.refollow();
        return;
      }
      if (!ref) {
        this.refollow();
        return;
      }
    }
    if (this.resuming && (f.code === 'unauthorized' || f.code === 'not_found')) {
      // The stored conversation is gone (expired token, wiped server): start over. What
      // the visitor wrote and no server took yet goes into the new conversation.
      this.resuming = false;
      const unsent = this.state.pending.filter((p) => p.state === 'sending' && p.ackSeq == null);
      this.store.dispatch({ type: 'forget' });
      this.link.stop();
      this.onNotice?.('session_lost');
      if (unsent.length) {
        for (const p of unsent) this.store.dispatch({ type: 'queue', message: { ...p, seenSeq: undefined } });
        this.ensureStarted().catch(() => {});
      }
      return;
    }
    if (this.resuming && f.code === 'invalid') {
      // Our last_seq is ahead of the conversation: drop the copy and replay everything.
      this.store.dispatch({ type: 'replayFromStart' });
      this.link.send({ type: 'resume', token: this.state.token, last_seq: 0 });
      return;
    }
    if (this.resuming && !ref && (f.code === 'unavailable' || f.code === 'rate_limited')) {
      // The stream cannot be resumed on this member now (it is behind, or moving), or
      // this address replayed long histories too often lately: ask again, on this
      // socket, instead of following nothing (later when it was the budget).
      this.timers.setTimeout(
        () => {
          if (this.resuming && this.state.token && this.link.connected) {
            this.link.send({ type: 'resume', token: this.state.token, last_seq: this.state.lastSeq });
          }
        },
        f.code === 'rate_limited' ? RESUME_LIMITED_RETRY_MS : START_RETRY_MS,
      );
      return;
    }
    if (!ref && this.wantStart && !this.state.token) {
      // The answer to our `start` (before `started`, nothing else is sent).
      if (f.code === 'unavailable') {
        // Not taken now (a member moving): ask again shortly, on this socket.
        this.timers.setTimeout(() => {
          if (this.wantStart && !this.state.token && this.link.connected) this.onOpen();
        }, START_RETRY_MS);
        return;
      }
      // Refused (blocked, rate limited, an unknown channel): the visitor's messages
      // say so and can be sent again, instead of waiting for a conversation that
      // will not come.
      // The key stays: this copy may have been refused after an earlier one opened the
      // conversation (its answer lost), and Retry must find that one, not open another.
      this.wantStart = false;
      for (const w of this.startWaiters.splice(0)) w.reject(new Error(f.code));
      for (const p of this.state.pending) {
        if (p.state === 'sending') this.store.dispatch({ type: 'sendFailed', key: p.key, error: f.code });
      }
      this.onNotice?.(f.code, f.message);
      return;
    }
    const pending = ref ? this.state.pending.find((p) => p.key === ref) : undefined;
    if (pending && (f.code === 'unavailable' || f.code === 'rate_limited')) {
      // Not taken now (a member moving, or this socket's frames over their rate): sent
      // again with the same key (protocol.md §5) a little later, a few times.
      const tries = (this.sendRetries.get(ref) ?? 0) + 1;
      if (tries <= MAX_SEND_RETRIES) {
        this.sendRetries.set(ref, tries);
        this.timers.setTimeout(() => {
          const p = this.state.pending.find((x) => x.key === ref);
          if (p && p.state === 'sending' && p.ackSeq == null && this.following) this.link.send(this.frameFor(p));
        }, f.code === 'rate_limited' ? SEND_LIMITED_RETRY_MS * tries : START_RETRY_MS * tries);
        return;
      }
    }
    if (ref && this.state.pending.some((p) => p.key === ref)) {
      this.sendRetries.delete(ref);
      this.store.dispatch({ type: 'sendFailed', key: ref, error: f.code });
      this.onNotice?.(f.code, f.message);
      return;
    }
    if (this.resuming && !ref && this.state.token) {
      // A resume refused for another reason (the server could not read the stream now):
      // asked again, later each time, rather than following nothing for good.
      this.resuming = false;
      this.refollow();
    }
    this.onNotice?.(f.code, f.message);
  }

  /** Resumes on this socket, which turned out not to follow the conversation: at once
   *  the first time, then after 1, 2, 4 … up to 10 s while it keeps failing (reset by
   *  the next ack or event). `close` and `rate` frames not answered go again after. */
  private refollow(): void {
    if (this.resuming || !this.state.token || !this.link.connected) return;
    this.following = false;
    this.resuming = true;
    this.queued.unshift(...this.unansweredControl.splice(0));
    const delay = this.refollows === 0 ? 0 : Math.min(1000 * 2 ** (this.refollows - 1), 10_000);
    this.refollows++;
    const token = this.state.token;
    const ask = () => {
      if (this.resuming && this.state.token === token && this.link.connected) this.link.send({ type: 'resume', token, last_seq: this.state.lastSeq });
    };
    if (delay === 0) ask();
    else this.timers.setTimeout(ask, delay);
  }

  private frameFor(p: { key: string; text: string; attachments: Attachment[] }) {
    const frame: Record<string, unknown> = { type: 'send', key: p.key, text: p.text };
    if (p.attachments.length) frame.attachments = p.attachments.map((a) => a.id);
    return frame;
  }

  private flush(): void {
    for (const f of this.queued.splice(0)) this.link.send(f);
    for (const p of this.state.pending) if (p.state === 'sending' && p.ackSeq == null) this.link.send(this.frameFor(p));
  }

  setName(name: string): void {
    this.visitorName = name.trim().slice(0, 100);
  }

  /** Sets (or, with null or '', clears) the customer's identity token the site signed;
   *  it goes in the next `start` only (a conversation already started keeps its visitor;
   *  `resume` never carries it). Held in memory, never written to storage. Clearing it
   *  (the customer logged out) also forgets what this browser kept of them: the visitor
   *  token a verified start tied to that customer, the conversation with its transcript
   *  and the name they gave. On a shared computer the next person starts anonymous and
   *  sees nothing of theirs. */
  identify(token: string | null | undefined): void {
    const had = this.identity;
    this.identity = identityToken(token);
    const who = identityOwner(this.identity);
    if (this.held && who === this.held.owner) {
      // Its owner is back: their conversation (as stored now) is shown and resumed.
      const { owner } = this.held;
      this.held = null;
      if (this.read(ownerKey(this.opts.channel)) === owner) {
        const theirs = deserialize(this.read(sessionKey(this.opts.channel)));
        this.owner = owner;
        this.storedToken = theirs.token;
        this.store.dispatch({ type: 'restore', state: theirs });
        this.resumeIfAny();
      }
      return;
    }
    // Another customer identified, or a logout: a held conversation is not theirs.
    if (this.held) this.dropHeld();
    // Another customer than the one whose conversation this is: as a logout, then theirs.
    const another = this.owner != null && who != null && who !== this.owner;
    if ((had && !this.identity) || another) {
      this.visitorToken = null;
      this.write(VISITOR_KEY, null);
      this.newConversation();
      // Every channel's conversation on this site, not only this widget's: the next
      // person's visit to another page's widget must not resume it.
      for (const k of this.sessionKeys()) {
        this.write(k, null);
        this.write(k.replace(SESSION_KEY, OWNER_KEY), null);
      }
      this.write(NAME_KEY, null);
      this.visitorName = '';
    }
  }

  /** The stored conversations' keys: this widget's, and every channel's the storage lists. */
  private sessionKeys(): string[] {
    const keys = [sessionKey(this.opts.channel)];
    try {
      const s = this.storage;
      if (s && typeof s.length === 'number' && typeof s.key === 'function') {
        for (let i = 0; i < s.length; i++) {
          const k = s.key(i);
          if (k && (k === SESSION_KEY || k.startsWith(SESSION_KEY + '.')) && !keys.includes(k)) keys.push(k);
        }
      }
    } catch {
      /* a storage that cannot be listed: this widget's key only */
    }
    return keys;
  }

  /** The name this visitor gave on an earlier conversation in this browser, if any. */
  storedName(): string {
    return (this.read(NAME_KEY) ?? '').slice(0, 100);
  }

  /** Starts a conversation if there is none; resolves once the server confirmed it. */
  ensureStarted(): Promise<void> {
    // Someone starts a conversation here who was not identified as the held one's owner.
    this.dropHeld();
    // Another tab started one meanwhile (its `storage` event not seen yet): that one.
    if (!this.state.token && !this.wantStart) {
      const theirs = deserialize(this.read(sessionKey(this.opts.channel)));
      const owner = this.read(ownerKey(this.opts.channel));
      if (theirs.token && !theirs.closed && (owner == null || owner === identityOwner(this.identity))) this.adopt(theirs);
    }
    if (this.state.token) {
      this.link.start();
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      this.startWaiters.push({ resolve, reject });
      if (!this.wantStart) {
        this.wantStart = true;
        if (this.link.state.status === 'stopped') this.link.start();
        else if (this.link.connected) this.onOpen();
      }
    });
  }

  send(text: string, attachments: Attachment[] = []): string {
    const key = 'c-' + uid();
    this.store.dispatch({ type: 'queue', message: { key, text, attachments, at: this.timers.now(), state: 'sending' } });
    if (this.state.token) {
      this.link.start();
      // Only on a socket that follows the conversation; else it goes out once one does.
      if (this.following) this.link.send(this.frameFor({ key, text, attachments }));
    } else {
      this.ensureStarted().catch(() => {});
    }
    return key;
  }

  retry(key: string): void {
    const p = this.state.pending.find((x) => x.key === key);
    if (!p) return;
    this.store.dispatch({ type: 'retry', key });
    if (!this.state.token) {
      // Its conversation never started: start it; `started` sends what is pending.
      this.ensureStarted().catch(() => {});
      return;
    }
    this.link.start();
    if (this.following) this.link.send(this.frameFor(p));
  }

  discard(key: string): void {
    this.store.dispatch({ type: 'discard', key });
  }

  typing(): void {
    const now = this.timers.now();
    if (!this.state.token || !this.following || this.state.closed || now - this.lastTypingSent < 3000) return;
    if (this.link.send({ type: 'typing' })) this.lastTypingSent = now;
  }

  /** Read mark up to the newest operator message (only when it moves forward). */
  markRead(): void {
    const upto = lastOperatorSeq(this.state);
    if (!this.readMarksSupported || !this.following || !upto || upto <= this.lastReadSent) return;
    if (this.link.send({ type: 'read', upto })) this.lastReadSent = upto;
  }

  /** Sends now if the socket follows the conversation, else once it does. */
  private control(frame: Record<string, unknown>): void {
    if (this.following && this.link.send(frame)) {
      this.unansweredControl.push(frame);
      return;
    }
    this.queued.push(frame);
    if (this.state.token) this.link.start();
  }

  close(): void {
    this.control({ type: 'close' });
  }

  rate(score: number, comment: string): void {
    const frame: Record<string, unknown> = { type: 'rate', score };
    if (comment.trim()) frame.comment = comment.trim();
    this.control(frame);
  }

  /** Forgets the finished conversation; the next message starts a new one. */
  newConversation(): void {
    this.link.stop();
    this.startKey = null;
    this.queued = [];
    this.unansweredControl = [];
    this.sendRetries.clear();
    this.following = false;
    this.store.dispatch({ type: 'forget' });
    this.lastReadSent = 0;
  }

  /** What a customer is told before writing: the emergency notice in force for this
   *  widget's channel (an outage), and, outside its group's working hours, the closed
   *  notice. Both null when none or unreachable. */
  async notices(): Promise<Notices> {
    const fetcher = this.opts.fetcher ?? ((u: string, i?: RequestInit) => fetch(u, i));
    try {
      const res = await fetcher(this.opts.origin + '/notice' + (this.opts.channel ? '?channel=' + encodeURIComponent(this.opts.channel) : ''));
      if (!res.ok) return NO_NOTICES;
      return parseNotices(await res.json());
    } catch {
      return NO_NOTICES;
    }
  }

  /** The emergency notice alone (see notices()); null when none or unreachable. */
  async emergencyNotice(): Promise<string | null> {
    return (await this.notices()).emergency;
  }

  async upload(file: Blob & { name: string }): Promise<Attachment> {
    await this.ensureStarted();
    const url = this.opts.origin + '/attachments?token=' + encodeURIComponent(this.state.token!) + '&name=' + encodeURIComponent(file.name);
    const fetcher = this.opts.fetcher ?? ((u: string, i?: RequestInit) => fetch(u, i));
    const res = await fetcher(url, { method: 'POST', body: file, headers: { 'Content-Type': contentTypeOf(file) } });
    const data = await res.json().catch(() => null);
    if (!res.ok) throw new Error(data?.code ?? (res.status === 413 ? 'too_large' : res.status === 415 ? 'unsupported_type' : 'upload_failed'));
    return data as Attachment;
  }

  attachmentUrl(id: string): string {
    return this.opts.origin + '/attachments/' + encodeURIComponent(id) + '?token=' + encodeURIComponent(this.state.token ?? '');
  }
}
