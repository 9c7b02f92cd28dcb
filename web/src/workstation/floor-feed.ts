/**
 * Keeps the supervisor's floor up to date: `floor` frames from /ws/supervisor, or, while
 * that socket is unavailable (older server, proxy without WebSocket support), polling
 * /api/queues and /api/operators every few seconds. The socket keeps being retried with
 * backoff; as soon as it delivers a frame, polling stops.
 */
import { Backoff } from '../shared/backoff';
import { ReconnectingSocket, type LinkState, type SocketLike, type Timers, realTimers } from '../shared/socket';
import { floorFromFrame, floorFromRest, type Floor } from './floor';

export interface FloorFeedOptions {
  wsBase: string;
  token: string;
  get: (path: string) => Promise<any>;
  onFloor: (f: Floor) => void;
  onError?: (e: unknown) => void;
  onLink?: (s: LinkState) => void;
  /** A watched conversation's history grew (the socket's `watched` frame). */
  onWatched?: (conversation: number, lastSeq: number) => void;
  /** What the feed is doing: following the socket, or polling while it is down. */
  onMode?: (mode: 'socket' | 'poll') => void;
  create?: (url: string) => SocketLike;
  timers?: Timers;
  pollMs?: number;
}

export class FloorFeed {
  readonly link: ReconnectingSocket;
  private timers: Timers;
  private pollTimer: unknown = null;
  private polling = false;
  private stopped = false;
  mode: 'socket' | 'poll' | 'idle' = 'idle';
  /** The conversation the socket is asked to watch (sent again on every connect). */
  private watched: number | null = null;

  constructor(private readonly opts: FloorFeedOptions) {
    this.timers = opts.timers ?? realTimers;
    this.link = new ReconnectingSocket({
      url: () => opts.wsBase + '/ws/supervisor?token=' + encodeURIComponent(opts.token),
      create: opts.create ?? ((u) => new WebSocket(u) as unknown as SocketLike),
      timers: this.timers,
      backoff: new Backoff({ base: 2000, max: 60000 }),
      idleMs: 10000,
      pingTimeoutMs: 5000,
      onFrame: (f) => {
        if (f?.type === 'watched' && typeof f.conversation === 'number' && typeof f.last_seq === 'number') {
          if (f.conversation === this.watched) opts.onWatched?.(f.conversation, f.last_seq);
          return;
        }
        if (f?.type !== 'floor') return;
        this.link.markHealthy();
        this.setMode('socket');
        opts.onFloor(floorFromFrame(f, this.timers.now()));
      },
      onClose: () => {
        // Fill the gap (or stand in for a missing endpoint) with polling.
        if (!this.stopped) this.setMode('poll');
        return true;
      },
      onOpen: () => {
        // A new socket knows nothing of the last one's watch.
        if (this.watched != null) this.link.send({ type: 'watch', conversation: this.watched });
      },
      onState: opts.onLink,
    });
  }

  /** Asks the socket to announce changes of `conversation` (null: none). */
  watch(conversation: number | null): void {
    if (conversation === this.watched) return;
    this.watched = conversation;
    this.link.send({ type: 'watch', conversation });
  }

  private setMode(mode: 'socket' | 'poll'): void {
    if (this.mode !== mode) this.opts.onMode?.(mode);
    this.mode = mode;
    if (mode === 'poll' && !this.polling) {
      this.polling = true;
      this.poll();
    } else if (mode === 'socket' && this.polling) {
      this.polling = false;
      this.timers.clearTimeout(this.pollTimer);
    }
  }

  async poll(): Promise<void> {
    if (!this.polling || this.stopped) return;
    try {
      const [q, o] = await Promise.all([this.opts.get('/api/queues'), this.opts.get('/api/operators')]);
      if (this.polling && !this.stopped) this.opts.onFloor(floorFromRest(q, o, this.timers.now()));
    } catch (e) {
      this.opts.onError?.(e);
    }
    if (this.polling && !this.stopped) this.pollTimer = this.timers.setTimeout(() => this.poll(), this.opts.pollMs ?? 2000);
  }

  start(): void {
    this.stopped = false;
    this.link.start();
  }

  stop(): void {
    this.stopped = true;
    this.polling = false;
    this.timers.clearTimeout(this.pollTimer);
    this.link.stop();
  }
}
