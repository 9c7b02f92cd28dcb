/**
 * Re-fetches something while it is on screen: every `intervalMs` after the previous fetch
 * finished (never two at once, so a slow server is not piled up on), at once on kick()
 * (something changed), skipping ticks while `active()` says no (a hidden tab), and
 * nothing at all after stop(). With `intervalMs` 0 it only fetches on start() and kick().
 */
import { realTimers, type Timers } from '../shared/socket';

export interface PollerOptions {
  fetch: () => Promise<unknown>;
  intervalMs: number;
  timers?: Timers;
  active?: () => boolean;
}

export class Poller {
  private timer: unknown = null;
  private inFlight = false;
  private again = false;
  private stopped = true;
  private readonly timers: Timers;

  constructor(private readonly opts: PollerOptions) {
    this.timers = opts.timers ?? realTimers;
  }

  get running(): boolean {
    return !this.stopped;
  }

  /** Fetches now, then keeps polling. */
  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    void this.run(true);
  }

  /** Fetch now; a kick while a fetch is in flight becomes one fetch right after it. */
  kick(): void {
    if (this.stopped) return;
    if (this.inFlight) {
      this.again = true;
      return;
    }
    void this.run(true);
  }

  stop(): void {
    this.stopped = true;
    this.again = false;
    this.timers.clearTimeout(this.timer);
    this.timer = null;
  }

  private async run(forced: boolean): Promise<void> {
    this.timers.clearTimeout(this.timer);
    this.timer = null;
    if (this.stopped) return;
    if (forced || !this.opts.active || this.opts.active()) {
      this.inFlight = true;
      try {
        await this.opts.fetch();
      } catch {
        /* the caller shows its own errors; keep polling */
      }
      this.inFlight = false;
      if (this.stopped) return;
      if (this.again) {
        this.again = false;
        return this.run(true);
      }
    }
    if (this.opts.intervalMs > 0) this.timer = this.timers.setTimeout(() => void this.run(false), this.opts.intervalMs);
  }
}
