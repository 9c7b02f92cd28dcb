import { Backoff } from './backoff';

/** The part of the browser WebSocket this module uses (a fake one in tests). */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export const OPEN = 1;

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  now(): number;
}

export const realTimers: Timers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
  now: () => Date.now(),
};

export type LinkStatus = 'connecting' | 'open' | 'reconnecting' | 'stopped';

export interface LinkState {
  status: LinkStatus;
  /** Failed attempts since the last healthy connection. */
  attempt: number;
  /** When the next attempt starts (ms since epoch), while reconnecting. */
  retryAt: number | null;
  /** Whether a socket of this link was ever healthy (a handshake frame arrived). */
  everHealthy: boolean;
  lastCloseCode: number | null;
}

export interface ReconnectingSocketOptions {
  url: () => string;
  create: (url: string) => SocketLike;
  onOpen?: () => void;
  onFrame: (frame: any) => void;
  onState?: (state: LinkState) => void;
  /** Called when a socket closes; return false to stop reconnecting. */
  onClose?: (code: number, healthy: boolean) => boolean | void;
  backoff?: Backoff;
  timers?: Timers;
  /** Send an application ping after this much silence... */
  idleMs?: number;
  /** ...and reconnect when nothing at all arrives this long after it (default: idleMs).
   *  A network that went silent without a reset is found within idleMs + pingTimeoutMs. */
  pingTimeoutMs?: number;
  ping?: () => unknown;
}

/**
 * One WebSocket at a time, reconnected with jittered exponential backoff. The backoff is
 * reset only by markHealthy() (called when the server's handshake frame arrives), so a
 * server that accepts and immediately drops connections still sees growing delays.
 * Frames from a socket that has been replaced are ignored.
 */
export class ReconnectingSocket {
  private ws: SocketLike | null = null;
  private gen = 0;
  private retry: unknown = null;
  private idle: unknown = null;
  private lastFrameAt = 0;
  /** When the last ping went out (null: none since the socket opened). */
  private pingSentAt: number | null = null;
  private healthy = false;
  private readonly backoff: Backoff;
  private readonly timers: Timers;
  state: LinkState = { status: 'stopped', attempt: 0, retryAt: null, everHealthy: false, lastCloseCode: null };

  constructor(private readonly opts: ReconnectingSocketOptions) {
    this.backoff = opts.backoff ?? new Backoff();
    this.timers = opts.timers ?? realTimers;
  }

  get connected(): boolean {
    return !!this.ws && this.ws.readyState === OPEN;
  }

  private setState(patch: Partial<LinkState>): void {
    this.state = { ...this.state, ...patch };
    this.opts.onState?.(this.state);
  }

  start(): void {
    if (this.state.status !== 'stopped') return;
    this.open();
  }

  private open(): void {
    this.timers.clearTimeout(this.retry);
    this.retry = null;
    const my = ++this.gen;
    this.healthy = false;
    let ws: SocketLike;
    this.setState({ status: this.state.everHealthy || this.state.attempt ? 'reconnecting' : 'connecting', retryAt: null });
    try {
      ws = this.opts.create(this.opts.url());
    } catch {
      this.scheduleRetry(1006);
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (my !== this.gen) return;
      this.lastFrameAt = this.timers.now();
      this.pingSentAt = null;
      this.armIdle(my);
      this.opts.onOpen?.();
    };
    ws.onmessage = (ev) => {
      if (my !== this.gen) return;
      this.lastFrameAt = this.timers.now();
      let frame: unknown;
      try {
        frame = JSON.parse(String(ev.data));
      } catch {
        return;
      }
      this.opts.onFrame(frame);
    };
    ws.onerror = () => {
      /* a close event follows */
    };
    ws.onclose = (ev) => {
      if (my !== this.gen) return;
      this.ws = null;
      this.timers.clearTimeout(this.idle);
      const go = this.opts.onClose?.(ev.code, this.healthy);
      if (go === false || this.state.status === 'stopped') {
        this.setState({ status: 'stopped', lastCloseCode: ev.code, retryAt: null });
        return;
      }
      this.scheduleRetry(ev.code);
    };
  }

  private scheduleRetry(code: number): void {
    const delay = this.backoff.next();
    this.retry = this.timers.setTimeout(() => this.open(), delay);
    this.setState({ status: 'reconnecting', attempt: this.backoff.attempt, retryAt: this.timers.now() + delay, lastCloseCode: code });
  }

  private armIdle(my: number): void {
    const idleMs = this.opts.idleMs;
    if (!idleMs) return;
    const deadline = this.opts.pingTimeoutMs ?? idleMs;
    this.timers.clearTimeout(this.idle);
    this.idle = this.timers.setTimeout(() => {
      if (my !== this.gen || !this.ws) return;
      const now = this.timers.now();
      const waiting = this.pingSentAt != null && this.pingSentAt >= this.lastFrameAt;
      if (waiting && now - (this.pingSentAt ?? now) >= deadline) {
        // Nothing answered the ping: a half-open connection (the network went away
        // without a reset). Start over.
        this.drop();
        return;
      }
      if (!waiting && now - this.lastFrameAt >= idleMs) this.ping(now);
      this.armIdle(my);
    }, Math.max(250, Math.min(1000, idleMs / 4)));
  }

  private ping(now: number): void {
    if (this.send(this.opts.ping ? this.opts.ping() : { type: 'ping' })) this.pingSentAt = now;
  }

  /** Pings now and reconnects if nothing answers within the ping deadline (e.g. the
   *  browser came back online: is this socket still alive?). */
  probe(): void {
    if (this.ws && this.opts.idleMs && (this.pingSentAt == null || this.pingSentAt < this.lastFrameAt)) this.ping(this.timers.now());
  }

  /** The server's handshake arrived: the link is healthy, reset the backoff. */
  markHealthy(): void {
    this.healthy = true;
    this.backoff.reset();
    this.setState({ status: 'open', attempt: 0, retryAt: null, everHealthy: true });
  }

  send(frame: unknown): boolean {
    if (!this.ws || this.ws.readyState !== OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Closes the current socket and reconnects after the backoff delay. */
  drop(): void {
    const ws = this.ws;
    if (!ws) return;
    this.gen++;
    this.ws = null;
    this.timers.clearTimeout(this.idle);
    try {
      ws.close(4000, 'reconnect');
    } catch {
      /* already closed */
    }
    this.scheduleRetry(4000);
  }

  /** Skips the remaining wait (e.g. the browser came back online, or the user asked),
   *  and starts the backoff over: the next failure waits the base delay again. */
  retryNow(): void {
    if (this.state.status !== 'reconnecting' || this.ws) return;
    this.backoff.reset();
    this.open();
  }

  /** Replaces the socket right away (e.g. to resume from a different point). */
  restart(): void {
    const ws = this.ws;
    this.gen++;
    this.ws = null;
    this.timers.clearTimeout(this.idle);
    if (ws) {
      try {
        ws.close(1000, 'restart');
      } catch {
        /* already closed */
      }
    }
    this.open();
  }

  stop(): void {
    this.gen++;
    this.timers.clearTimeout(this.retry);
    this.timers.clearTimeout(this.idle);
    const ws = this.ws;
    this.ws = null;
    this.setState({ status: 'stopped', retryAt: null });
    if (ws) {
      try {
        ws.close(1000, 'bye');
      } catch {
        /* already closed */
      }
    }
  }
}
