/**
 * Exponential backoff with "equal jitter": the n-th delay is drawn uniformly from
 * [d/2, d] where d = min(max, base * factor^n). Never zero, so a server that accepts and
 * drops connections is not hammered, and spread out, so many clients that lost the same
 * server do not come back in lock-step.
 */
export interface BackoffOptions {
  base?: number;
  max?: number;
  factor?: number;
  random?: () => number;
}

export class Backoff {
  readonly base: number;
  readonly max: number;
  readonly factor: number;
  private readonly random: () => number;
  private n = 0;

  constructor(opts: BackoffOptions = {}) {
    this.base = opts.base ?? 1000;
    this.max = opts.max ?? 30000;
    this.factor = opts.factor ?? 2;
    this.random = opts.random ?? Math.random;
  }

  /** How many delays were handed out since the last reset. */
  get attempt(): number {
    return this.n;
  }

  /** The ceiling for the next delay, without jitter. */
  ceiling(): number {
    return Math.min(this.max, this.base * Math.pow(this.factor, this.n));
  }

  next(): number {
    const d = this.ceiling();
    this.n++;
    const r = Math.min(Math.max(this.random(), 0), 1);
    return Math.round(d / 2 + (r * d) / 2);
  }

  reset(): void {
    this.n = 0;
  }
}
