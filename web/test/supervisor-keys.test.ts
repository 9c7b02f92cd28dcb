import { describe, expect, it, vi } from 'vitest';
import { listboxTarget, tablistTarget } from '../src/shared/keys';
import { floorFromFrame, floorFromRest, floorPlace, queuedWaitNow, untilNow } from '../src/workstation/floor';
import { Poller } from '../src/workstation/poller';
import { FakeTimers } from './fakes';

describe('listboxTarget', () => {
  it('moves by one, to the ends and by a page, without wrapping', () => {
    expect(listboxTarget('ArrowDown', 3, 10)).toBe(4);
    expect(listboxTarget('ArrowUp', 3, 10)).toBe(2);
    expect(listboxTarget('ArrowDown', 9, 10)).toBe(9);
    expect(listboxTarget('ArrowUp', 0, 10)).toBe(0);
    expect(listboxTarget('Home', 5, 10)).toBe(0);
    expect(listboxTarget('End', 5, 1000)).toBe(999);
    expect(listboxTarget('PageDown', 0, 1000, 8)).toBe(7);
    expect(listboxTarget('PageUp', 3, 1000, 8)).toBe(0);
  });
  it('starts at the first option when none is active, and ignores other keys', () => {
    expect(listboxTarget('ArrowDown', -1, 10)).toBe(0);
    expect(listboxTarget('ArrowUp', -1, 10)).toBe(0);
    expect(listboxTarget('a', 2, 10)).toBeNull();
    expect(listboxTarget('Tab', 2, 10)).toBeNull();
    expect(listboxTarget('ArrowDown', -1, 0)).toBeNull();
  });
});

describe('tablistTarget', () => {
  it('wraps with the arrows and jumps with Home and End', () => {
    expect(tablistTarget('ArrowRight', 0, 5)).toBe(1);
    expect(tablistTarget('ArrowRight', 4, 5)).toBe(0);
    expect(tablistTarget('ArrowLeft', 0, 5)).toBe(4);
    expect(tablistTarget('Home', 3, 5)).toBe(0);
    expect(tablistTarget('End', 1, 5)).toBe(4);
    expect(tablistTarget('ArrowDown', 1, 5)).toBeNull();
    expect(tablistTarget('Enter', 1, 5)).toBeNull();
  });
});

describe('queued conversations on the floor', () => {
  const frame = {
    type: 'floor',
    at: 1000,
    queues: [
      {
        group: 'general',
        name: 'General',
        waiting: 1,
        offered: 1,
        longest_wait_ms: 75000,
        sla_ms: 60000,
        within_sla: 1,
        conversations: [
          { conversation: 12, state: 'offered', visitor: 'Dana', waiting_ms: 75000 },
          { conversation: 14, state: 'waiting', visitor: 'Lee', waiting_ms: 9000 },
          { state: 'waiting' }, // malformed: dropped
        ],
      },
      { group: 'billing', name: 'Billing', waiting: 0, offered: 0, longest_wait_ms: 0 },
    ],
    operators: [{ id: 'alice', name: 'Alice', presence: 'online', presence_since: 1, load: 1, capacity: 2, active: [3, 7] }],
  };
  it('are normalized from frames and from /api/queues, empty when not listed', () => {
    const f = floorFromFrame(frame, 5000);
    const general = f.queues.find((q) => q.group === 'general')!;
    expect(general.conversations.map((c) => [c.conversation, c.state, c.visitor])).toEqual([
      [12, 'offered', 'Dana'],
      [14, 'waiting', 'Lee'],
    ]);
    expect(f.queues.find((q) => q.group === 'billing')!.conversations).toEqual([]);
    const r = floorFromRest({ queues: frame.queues }, { operators: frame.operators }, 5000);
    expect(r.queues.find((q) => q.group === 'general')!.conversations).toHaveLength(2);
    expect(queuedWaitNow(general.conversations[1], f, 8000)).toBe(12000);
  });
  it('carry why a waiting conversation is not offered, and how many could take one', () => {
    const f = floorFromFrame(
      {
        at: 1000,
        queues: [
          {
            group: 'general',
            name: 'General',
            waiting: 2,
            offered: 0,
            longest_wait_ms: 9000,
            available: 1,
            conversations: [
              { conversation: 3, state: 'waiting', waiting_ms: 9000, visitor: 'Ann', why: 'everyone_passed', next_round_at: 31000 },
              { conversation: 4, state: 'waiting', waiting_ms: 100, visitor: 'Bea', why: 'nobody_online' },
            ],
          },
          { group: 'billing', name: 'Billing', waiting: 0, offered: 0, longest_wait_ms: 0 },
        ],
        operators: [],
      },
      5000,
    );
    const general = f.queues.find((q) => q.group === 'general')!;
    expect(general.available).toBe(1);
    expect(general.conversations.map((c) => [c.why, c.next_round_at])).toEqual([
      ['everyone_passed', 31000],
      ['nobody_online', undefined],
    ]);
    // An older server says nothing: nothing is made up.
    expect(f.queues.find((q) => q.group === 'billing')!.available).toBeNull();
  });
  it('carry the relaxation step and the next one, and the group\'s working hours', () => {
    const f = floorFromFrame(
      {
        at: 1000,
        queues: [
          {
            group: 'general',
            name: 'General',
            waiting: 2,
            offered: 0,
            longest_wait_ms: 9000,
            hours: { open: false, next_change_at: 61000 },
            conversations: [
              { conversation: 3, state: 'waiting', waiting_ms: 9000, visitor: 'Ann', step: 1, next_step_at: 21000 },
              { conversation: 4, state: 'waiting', waiting_ms: 100, visitor: 'Bea', step: 2, next_step_at: null },
              { conversation: 5, state: 'waiting', waiting_ms: 50, visitor: 'Cy' },
            ],
          },
          { group: 'billing', name: 'Billing', waiting: 0, offered: 0, longest_wait_ms: 0, hours: { open: true } },
          { group: 'tech', name: 'Tech', waiting: 0, offered: 0, longest_wait_ms: 0, hours: { next_change_at: 5 } },
        ],
        operators: [],
      },
      5000,
    );
    const general = f.queues.find((q) => q.group === 'general')!;
    expect(general.conversations.map((c) => [c.step, c.next_step_at])).toEqual([
      [1, 21000],
      [2, null],
      [undefined, undefined],
    ]);
    expect(general.hours).toEqual({ open: false, next_change_at: 61000 });
    expect(f.queues.find((q) => q.group === 'billing')!.hours).toEqual({ open: true, next_change_at: null });
    // Malformed (no open flag): no badge rather than a guess.
    expect(f.queues.find((q) => q.group === 'tech')!.hours).toBeNull();
    // Countdowns by the local clock: the snapshot (server 1000) arrived at local 5000.
    expect(untilNow(21000, f, 5000)).toBe(20000);
    expect(untilNow(21000, f, 15000)).toBe(10000);
    expect(untilNow(21000, f, 99000)).toBe(0);
  });
  it('give each conversation a place that changes when the floor moves it', () => {
    const f = floorFromFrame(frame, 5000);
    expect(floorPlace(f, 12)).toBe('queue:general:offered');
    expect(floorPlace(f, 14)).toBe('queue:general:waiting');
    expect(floorPlace(f, 7)).toBe('operator:alice');
    expect(floorPlace(f, 99)).toBe('none');
    expect(floorPlace(null, 12)).toBe('');
  });
});

describe('Poller', () => {
  const flush = async () => {
    for (let i = 0; i < 5; i++) await Promise.resolve();
  };
  it('fetches at once, then every interval after the previous fetch ended, and not after stop', async () => {
    const timers = new FakeTimers();
    const fetch = vi.fn(async () => {});
    const p = new Poller({ fetch, intervalMs: 2000, timers });
    p.start();
    await flush();
    expect(fetch).toHaveBeenCalledTimes(1);
    timers.advance(1999);
    await flush();
    expect(fetch).toHaveBeenCalledTimes(1);
    timers.advance(1);
    await flush();
    expect(fetch).toHaveBeenCalledTimes(2);
    p.stop();
    timers.advance(60_000);
    await flush();
    expect(fetch).toHaveBeenCalledTimes(2);
    expect(timers.pending()).toEqual([]);
    p.kick();
    await flush();
    expect(fetch).toHaveBeenCalledTimes(2);
  });
  it('never runs two fetches at once: a kick during a fetch becomes one fetch after it', async () => {
    const timers = new FakeTimers();
    let release: () => void = () => {};
    let running = 0;
    let most = 0;
    const fetch = vi.fn(
      () =>
        new Promise<void>((ok) => {
          running++;
          most = Math.max(most, running);
          release = () => {
            running--;
            ok();
          };
        }),
    );
    const p = new Poller({ fetch, intervalMs: 2000, timers });
    p.start();
    p.kick();
    p.kick();
    timers.advance(10_000); // a slow server: no timer piles up requests meanwhile
    expect(fetch).toHaveBeenCalledTimes(1);
    release();
    await flush();
    expect(fetch).toHaveBeenCalledTimes(2); // the kicks, coalesced
    release();
    await flush();
    expect(fetch).toHaveBeenCalledTimes(2);
    expect(most).toBe(1);
    p.stop();
  });
  it('skips ticks while inactive, keeps going after a failed fetch, and without an interval only fetches on kick', async () => {
    const timers = new FakeTimers();
    let visible = false;
    const fetch = vi.fn(async () => {
      throw new Error('network');
    });
    const p = new Poller({ fetch, intervalMs: 2000, timers, active: () => visible });
    p.start(); // the first fetch is always made
    await flush();
    timers.advance(6000);
    await flush();
    expect(fetch).toHaveBeenCalledTimes(1);
    visible = true;
    timers.advance(2000);
    await flush();
    expect(fetch).toHaveBeenCalledTimes(2);
    timers.advance(2000);
    await flush();
    expect(fetch).toHaveBeenCalledTimes(3);
    p.stop();

    const once = vi.fn(async () => {});
    const q = new Poller({ fetch: once, intervalMs: 0, timers });
    q.start();
    await flush();
    timers.advance(60_000);
    await flush();
    expect(once).toHaveBeenCalledTimes(1);
    q.kick();
    await flush();
    expect(once).toHaveBeenCalledTimes(2);
    expect(timers.pending()).toEqual([]);
    q.stop();
  });
});
