/**
 * Glue between the operator socket and the state reducer: one reconnecting socket
 * speaking protocol 2 (one feed per group of the cluster), resume with ?cursor=, dedupe, resume_gap recovery, request/response matching by
 * `ref`, re-sending unacknowledged messages with their original idempotency keys, and a
 * bounded queue of history requests (so a reconnect never fires a burst of requests).
 */
import { Backoff } from '../shared/backoff';
import { uid } from '../shared/ids';
import { ReconnectingSocket, type LinkState, type SocketLike, type Timers, realTimers } from '../shared/socket';
import type { Attachment } from '../shared/files';
import { createStore, type Store } from '../shared/store';
import { initialOpState, opReducer, type OpAction, type OpState } from './operator-state';
import type { Delivery, Presence } from './types';

export interface OperatorSessionOptions {
  /** Base for the socket URL, e.g. ws://host:port */
  wsBase: string;
  token: string;
  create?: (url: string) => SocketLike;
  timers?: Timers;
  backoff?: Backoff;
  /** Asked when a socket closes before its hello: is the token still good? */
  checkAuth?: () => Promise<'ok' | 'unauthorized' | 'unknown'>;
  onAuthLost?: () => void;
  onLink?: (s: LinkState) => void;
  onNotice?: (code: string, message: string, what?: string) => void;
  maxHistoryInFlight?: number;
  requestTimeoutMs?: number;
  /** Where the replies not acknowledged yet are kept (the tab's `sessionStorage`), under
   *  `storageKey`: a reload sends them again with their keys instead of losing them. */
  storage?: Pick<Storage, 'getItem' | 'setItem' | 'removeItem'> | null;
  storageKey?: string;
}

/** Replies kept over a reload at most. */
const MAX_KEPT_REPLIES = 50;

interface Waiter {
  what: string;
  resolve: (frame: any) => void;
  reject: (err: FrameError) => void;
  timer: unknown;
}

/** How many times a reply answered `unavailable` or `rate_limited` is sent again on its
 *  own (after 1, 2, 4, 8, 16 s) before it shows as not sent, with Retry. */
export const MAX_SEND_RETRIES = 5;
/** How many times a history refused for now is asked again (after 1, 2, 4, 8, 16 s). */
export const MAX_HISTORY_RETRIES = 5;

export class FrameError extends Error {
  constructor(
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

export class OperatorSession {
  readonly store: Store<OpState, OpAction>;
  readonly link: ReconnectingSocket;
  private refN = 0;
  private waiters = new Map<string, Waiter>();
  /** Replies sent again on their own after `unavailable` or `rate_limited`, by key. */
  private sendRetries = new Map<string, number>();
  private historyInFlight = new Set<number>();
  /** History requests refused for now (`unavailable`, `forbidden`): tries so far, and
   *  when the next may go. */
  private historyRetries = new Map<number, number>();
  private historyNotBefore = new Map<number, number>();
  private lastTypingSent = new Map<number, number>();
  private lastReadSent = new Map<number, number>();
  private timers: Timers;
  /** Read marks are a newer protocol feature; stop sending them if the server refuses. */
  readMarksSupported = true;
  linkState: LinkState;

  constructor(private readonly opts: OperatorSessionOptions) {
    this.timers = opts.timers ?? realTimers;
    this.store = createStore(opReducer, initialOpState);
    this.restorePending();
    let kept = this.store.get().pending;
    this.store.subscribe((s) => {
      if (s.pending !== kept) {
        kept = s.pending;
        this.keepPending(s.pending);
      }
    });
    this.link = new ReconnectingSocket({
      url: () => this.url(),
      create: opts.create ?? ((u) => new WebSocket(u) as unknown as SocketLike),
      timers: this.timers,
      backoff: opts.backoff ?? new Backoff({ base: 1000, max: 30000 }),
      // The protocol's ping after 10 s of silence, answered within 5 s or the socket is
      // taken for dead: a silent network shows as reconnecting within 15 s.
      idleMs: 10000,
      pingTimeoutMs: 5000,
      onFrame: (f) => this.onFrame(f),
      onClose: (code, healthy) => this.onClose(code, healthy),
      onState: (s) => {
        this.linkState = s;
        if (s.status !== 'open') this.failWaiters('disconnected');
        opts.onLink?.(s);
      },
    });
    this.linkState = this.link.state;
  }

  /** The replies a reload of this tab left unacknowledged: queued again, to go with their
   *  keys after the hello (a copy the server took already is not written twice). */
  private restorePending(): void {
    const { storage, storageKey } = this.opts;
    if (!storage || !storageKey) return;
    let kept: unknown;
    try {
      kept = JSON.parse(storage.getItem(storageKey) ?? '[]');
    } catch {
      kept = [];
    }
    if (!Array.isArray(kept)) return;
    for (const p of kept.slice(0, MAX_KEPT_REPLIES)) {
      if (!p || typeof p.key !== 'string' || typeof p.conversation !== 'number' || typeof p.text !== 'string') continue;
      const attachments = Array.isArray(p.attachments) ? p.attachments.filter((a: any) => a && typeof a.id === 'string') : [];
      this.dispatch({ type: 'queueSend', message: { key: p.key, conversation: p.conversation, text: p.text, attachments, at: Number(p.at) || 0, state: 'sending' } });
    }
  }

  private keepPending(pending: OpState['pending']): void {
    const { storage, storageKey } = this.opts;
    if (!storage || !storageKey) return;
    const list = Object.values(pending).slice(-MAX_KEPT_REPLIES);
    try {
      if (list.length) storage.setItem(storageKey, JSON.stringify(list.map(({ key, conversation, text, attachments, at }) => ({ key, conversation, text, attachments, at }))));
      else storage.removeItem(storageKey);
    } catch {
      /* full or private mode: kept for this page only */
    }
  }

  url(): string {
    const s = this.store.get();
    let u = this.opts.wsBase + '/ws/operator?token=' + encodeURIComponent(this.opts.token) + '&protocol=2';
    if (s.cursor != null) {
      const parts = Object.entries(s.cursor).map(([feed, seq]) => feed + '.' + seq);
      if (parts.length > 0) u += '&cursor=' + parts.join(',');
    }
    return u;
  }

  start(): void {
    this.link.start();
  }

  stop(): void {
    this.link.stop();
    this.failWaiters('stopped');
  }

  private dispatch(a: OpAction): void {
    this.store.dispatch(a);
  }

  private onClose(code: number, healthy: boolean): boolean {
    this.historyInFlight.clear();
    if (code === 4001) {
      this.opts.onAuthLost?.();
      return false;
    }
    if (!healthy && this.opts.checkAuth) {
      // The upgrade is refused before any frame when the token is bad: ask REST why.
      this.opts.checkAuth().then((r) => {
        if (r === 'unauthorized') {
          this.link.stop();
          this.opts.onAuthLost?.();
        }
      });
    }
    return true;
  }

  private failWaiters(reason: string): void {
    for (const [ref, w] of this.waiters) {
      this.timers.clearTimeout(w.timer);
      w.reject(new FrameError('disconnected', reason));
      this.waiters.delete(ref);
    }
  }

  onFrame(f: any): void {
    if (!f || typeof f.type !== 'string') return;
    switch (f.type) {
      case 'hello':
        this.link.markHealthy();
        this.dispatch({ type: 'hello', hello: f, now: this.timers.now() });
        this.resendPending();
        this.pumpHistory();
        break;
      case 'event':
        this.dispatch({ type: 'event', event: f, now: this.timers.now() });
        this.pumpHistory();
        break;
      case 'offer_preview':
        if (typeof f.offer === 'number' && typeof f.preview === 'string') this.dispatch({ type: 'offerPreview', offer: f.offer, preview: f.preview });
        break;
      case 'history':
        this.historyInFlight.delete(f.conversation);
        this.historyRetries.delete(f.conversation);
        this.dispatch({
          type: 'history',
          conversation: f.conversation,
          entries: f.entries ?? [],
          clientReadUpto: typeof f.client_read_upto === 'number' ? f.client_read_upto : undefined,
        });
        this.settle(f.ref, f);
        this.pumpHistory();
        break;
      case 'ack':
        this.sendRetries.delete(f.key);
        this.dispatch({ type: 'ack', key: f.key, conversation: f.conversation, seq: f.seq });
        this.settle(f.ref, f);
        break;
      case 'ok':
        this.settle(f.ref, f);
        break;
      case 'typing':
        if (f.from === 'client' && typeof f.conversation === 'number') {
          this.dispatch({ type: 'typing', conversation: f.conversation, now: this.timers.now() });
        }
        break;
      case 'read':
        if (typeof f.conversation === 'number' && typeof f.upto === 'number') {
          this.dispatch({ type: 'read', conversation: f.conversation, by: f.by, upto: f.upto });
        }
        break;
      case 'error':
        this.onError(f);
        break;
      default:
        break; // pong and frame types from newer servers
    }
  }

  private onError(f: { code: string; message?: string; ref?: unknown; for?: string }): void {
    if (f.code === 'resume_gap') {
      // Our resume point fell out of the retained feed: rebuild from a fresh hello.
      this.historyInFlight.clear();
      this.dispatch({ type: 'reset' });
      this.opts.onNotice?.('resume_gap', f.message ?? '');
      this.link.restart();
      return;
    }
    const ref = f.ref == null ? '' : String(f.ref);
    // typing and read marks carry no ref; racing a release they get not_assigned: harmless.
    if (!ref && f.code === 'not_assigned') return;
    // An error answering a read mark or a typing signal (frames that take no `ref`) names
    // the frame in `for`; a server that does not know read marks echoes the `ref` we
    // add to them. Such a server stops being sent them; anything else about them is not
    // the person's concern.
    const forRead = ref.startsWith('read:') || (!ref && f.for === 'read');
    if (forRead || (!ref && f.for === 'typing')) {
      if (forRead && (f.code === 'unknown_type' || f.code === 'bad_frame')) this.readMarksSupported = false;
      return;
    }
    if (ref.startsWith('hist:')) {
      const id = Number(ref.slice(5));
      this.historyInFlight.delete(id);
      const tries = this.historyRetries.get(id) ?? 0;
      if ((f.code === 'unavailable' || f.code === 'forbidden') && tries < MAX_HISTORY_RETRIES) {
        // A shard moving or catching up (a conversation just given to this operator may
        // not be readable as theirs on every member yet): asked again, later each time.
        this.historyRetries.set(id, tries + 1);
        this.historyNotBefore.set(id, this.timers.now() + 1000 * 2 ** tries);
        this.timers.setTimeout(() => {
          // Due now, whatever the clock's last millisecond says.
          this.historyNotBefore.delete(id);
          this.pumpHistory();
        }, 1000 * 2 ** tries);
        return;
      }
      this.historyRetries.delete(id);
      this.dispatch({ type: 'historyRequested', conversation: id });
    }
    const pending = this.store.get().pending[ref];
    if (pending && (f.code === 'unavailable' || f.code === 'rate_limited') && (this.sendRetries.get(ref) ?? 0) < MAX_SEND_RETRIES) {
      // Not taken now (a member moving, or this socket's frames over their rate): sent
      // again with the same key (protocol.md §5), later each time; a second copy is
      // harmless.
      const tries = (this.sendRetries.get(ref) ?? 0) + 1;
      this.sendRetries.set(ref, tries);
      this.timers.setTimeout(() => {
        const p = this.store.get().pending[ref];
        if (p && p.state === 'sending') this.link.send(this.sendFrame(p.key, p.conversation, p.text, p.attachments));
      }, 1000 * 2 ** (tries - 1));
      // Nothing to tell the operator yet: it shows as sending.
      return;
    } else if (pending) {
      this.sendRetries.delete(ref);
      this.dispatch({ type: 'sendFailed', key: ref, error: f.code });
    }
    const w = this.waiters.get(ref);
    if (w) {
      this.waiters.delete(ref);
      this.timers.clearTimeout(w.timer);
      w.reject(new FrameError(f.code, f.message ?? f.code));
      return;
    }
    this.opts.onNotice?.(f.code, f.message ?? '', pending ? 'send' : undefined);
  }

  private settle(ref: unknown, frame: unknown): void {
    if (ref == null) return;
    const w = this.waiters.get(String(ref));
    if (!w) return;
    this.waiters.delete(String(ref));
    this.timers.clearTimeout(w.timer);
    w.resolve(frame);
  }

  /** Sends a frame with a fresh ref and resolves with its ok/ack/history reply. */
  request(frame: Record<string, unknown>, what: string): Promise<any> {
    const ref = 'r' + ++this.refN;
    return new Promise((resolve, reject) => {
      if (!this.link.send({ ...frame, ref })) {
        reject(new FrameError('disconnected', 'not connected'));
        return;
      }
      const timer = this.timers.setTimeout(() => {
        if (this.waiters.delete(ref)) reject(new FrameError('timeout', what + ': no answer'));
      }, this.opts.requestTimeoutMs ?? 15000);
      this.waiters.set(ref, { what, resolve, reject, timer });
    });
  }

  private pumpHistory(): void {
    const max = this.opts.maxHistoryInFlight ?? 3;
    const s = this.store.get();
    const now = this.timers.now();
    for (const id of s.needHistory) {
      if (this.historyInFlight.size >= max) break;
      if (this.historyInFlight.has(id) || (this.historyNotBefore.get(id) ?? 0) > now) continue;
      this.historyNotBefore.delete(id);
      if (!this.link.send({ type: 'history', conversation: id, ref: 'hist:' + id })) break;
      this.historyInFlight.add(id);
    }
  }

  private resendPending(): void {
    for (const p of Object.values(this.store.get().pending)) {
      if (p.state !== 'sending') continue;
      this.link.send(this.sendFrame(p.key, p.conversation, p.text, p.attachments));
    }
  }

  private sendFrame(key: string, conversation: number, text: string, attachments: Attachment[]) {
    const frame: Record<string, unknown> = { type: 'send', conversation, key, text, ref: key };
    if (attachments.length) frame.attachments = attachments.map((a) => a.id);
    return frame;
  }

  // ---- commands ----

  /** Ends a wrap-up early: offers may come again at once. */
  ready() {
    return this.request({ type: 'ready' }, 'ready');
  }

  /** A break for one of the configured reasons. */
  takeBreak(reason: string) {
    return this.request({ type: 'presence', status: 'break', reason }, 'presence');
  }

  setPresence(status: Presence) {
    return this.request({ type: 'presence', status }, 'presence');
  }

  accept(offer: number) {
    return this.request({ type: 'accept', offer }, 'accept');
  }

  decline(offer: number, reason?: string) {
    return this.request(reason ? { type: 'decline', offer, reason } : { type: 'decline', offer }, 'decline');
  }

  /** Queues a message; it is (re)sent until acknowledged, with the same key each time. */
  sendMessage(conversation: number, text: string, attachments: Attachment[] = []): string {
    const key = 'op-' + uid();
    this.dispatch({
      type: 'queueSend',
      message: { key, conversation, text, attachments, at: this.timers.now(), state: 'sending' },
    });
    this.link.send(this.sendFrame(key, conversation, text, attachments));
    this.lastTypingSent.delete(conversation);
    return key;
  }

  retry(key: string): void {
    const p = this.store.get().pending[key];
    if (!p) return;
    this.sendRetries.delete(key);
    this.dispatch({ type: 'queueSend', message: { ...p, state: 'sending', error: undefined } });
    this.link.send(this.sendFrame(p.key, p.conversation, p.text, p.attachments));
  }

  discard(key: string): void {
    this.sendRetries.delete(key);
    this.dispatch({ type: 'discard', key });
  }

  /** The operator has read the replies their released conversations did not take. */
  dismissUnsent(): void {
    this.dispatch({ type: 'dismissUnsent' });
  }

  /** Typing signal, at most one every 3 seconds per conversation. */
  typing(conversation: number): void {
    const now = this.timers.now();
    if (now - (this.lastTypingSent.get(conversation) ?? 0) < 3000) return;
    if (this.link.send({ type: 'typing', conversation })) this.lastTypingSent.set(conversation, now);
  }

  /** Tells the visitor we read up to `upto` (only when it moves forward). */
  markRead(conversation: number, upto: number): void {
    if (!this.readMarksSupported || upto <= (this.lastReadSent.get(conversation) ?? 0)) return;
    if (this.link.send({ type: 'read', conversation, upto, ref: 'read:' + conversation })) {
      this.lastReadSent.set(conversation, upto);
    }
  }

  transfer(conversation: number, target: { operator?: string; group?: string }, comment: string) {
    const frame: Record<string, unknown> = { type: 'transfer', conversation };
    if (target.operator) frame.to_operator = target.operator;
    else frame.to_group = target.group;
    if (comment) frame.comment = comment;
    return this.request(frame, 'transfer');
  }

  close(conversation: number, resolution: string, tags: string[]) {
    const frame: Record<string, unknown> = { type: 'close', conversation };
    if (resolution) frame.resolution = resolution;
    if (tags.length) frame.tags = tags;
    return this.request(frame, 'close');
  }

  /** Outbox statuses read over REST (`deliveries` of GET /api/conversations/{id}); the
   *  feed's `delivery` events keep them current from then on. */
  setDeliveries(conversation: number, deliveries: Delivery[]): void {
    if (deliveries.length) this.dispatch({ type: 'deliveries', conversation, deliveries });
  }

  select(conversation: number | null): void {
    this.dispatch({ type: 'select', conversation });
  }

  setViewing(viewing: boolean): void {
    this.dispatch({ type: 'viewing', viewing });
  }
}
