import { describe, expect, it } from 'vitest';
import { Backoff } from '../src/shared/backoff';
import { mergeBySeq, lowerBound, lastSeq } from '../src/shared/seq';
import { checkAttachment, contentTypeOf, formatBytes, MAX_ATTACHMENT_BYTES } from '../src/shared/files';
import { formatClock, formatDateTime, formatDuration, formatWhen, secondsLeft } from '../src/shared/format';
import { visibleRange, scrollToRow } from '../src/shared/virtual';
import { createStore } from '../src/shared/store';

describe('Backoff', () => {
  it('grows exponentially up to the cap, with jitter in [d/2, d]', () => {
    const lo = new Backoff({ base: 1000, max: 8000, random: () => 0 });
    expect([1, 2, 3, 4, 5, 6].map(() => lo.next())).toEqual([500, 1000, 2000, 4000, 4000, 4000]);
    const hi = new Backoff({ base: 1000, max: 8000, random: () => 1 });
    expect([1, 2, 3, 4, 5].map(() => hi.next())).toEqual([1000, 2000, 4000, 8000, 8000]);
  });
  it('is never zero and resets', () => {
    const b = new Backoff({ base: 200, random: () => 0 });
    b.next();
    b.next();
    expect(b.attempt).toBe(2);
    b.reset();
    expect(b.attempt).toBe(0);
    expect(b.next()).toBe(100);
  });
  it('spreads clients out (different random draws give different delays)', () => {
    const draws = [0.1, 0.5, 0.9].map((r) => new Backoff({ base: 1000, random: () => r }).next());
    expect(new Set(draws).size).toBe(3);
  });
});

describe('mergeBySeq', () => {
  const e = (seq: number, text = String(seq)) => ({ seq, text });
  it('appends in order and drops duplicates', () => {
    const a = mergeBySeq([e(1), e(2)], [e(2, 'again'), e(3)]);
    expect(a.map((x) => x.seq)).toEqual([1, 2, 3]);
    expect(a[1].text).toBe('2');
  });
  it('inserts out-of-order entries at their place', () => {
    const a = mergeBySeq([e(1), e(4)], [e(3), e(2), e(5)]);
    expect(a.map((x) => x.seq)).toEqual([1, 2, 3, 4, 5]);
  });
  it('returns the same array when nothing is new', () => {
    const list = [e(1), e(2)];
    expect(mergeBySeq(list, [e(1), e(2)])).toBe(list);
    expect(mergeBySeq(list, [])).toBe(list);
  });
  it('does not mutate its input', () => {
    const list = [e(1)];
    mergeBySeq(list, [e(2)]);
    expect(list.length).toBe(1);
  });
  it('handles a replay of a whole history (idempotent)', () => {
    const hist = Array.from({ length: 50 }, (_, i) => e(i + 1));
    const once = mergeBySeq([], hist);
    expect(mergeBySeq(once, hist)).toBe(once);
    expect(lastSeq(once)).toBe(50);
    expect(lowerBound(once, 25)).toBe(24);
  });
});

describe('attachments', () => {
  it('matches the server limits', () => {
    expect(checkAttachment({ name: 'a.png', type: 'image/png', size: 10 })).toBeNull();
    expect(checkAttachment({ name: 'a.png', type: 'image/png', size: 0 })).toBe('empty');
    expect(checkAttachment({ name: 'a.png', type: 'image/png', size: MAX_ATTACHMENT_BYTES })).toBeNull();
    expect(checkAttachment({ name: 'a.png', type: 'image/png', size: MAX_ATTACHMENT_BYTES + 1 })).toBe('too_large');
    expect(checkAttachment({ name: 'a.exe', type: 'application/x-msdownload', size: 10 })).toBe('unsupported_type');
    expect(checkAttachment({ name: 'a.svg', type: 'image/svg+xml', size: 10 })).toBe('unsupported_type');
  });
  it('guesses the type from the extension when the browser gives none', () => {
    expect(contentTypeOf({ name: 'Report.DOCX', type: '', size: 1 })).toBe('application/vnd.openxmlformats-officedocument.wordprocessingml.document');
    expect(contentTypeOf({ name: 'x', type: '', size: 1 })).toBe('application/octet-stream');
    expect(contentTypeOf({ name: 'n.txt', type: 'text/plain;charset=utf-8', size: 1 })).toBe('text/plain');
    expect(checkAttachment({ name: 'scan.pdf', type: '', size: 5 })).toBeNull();
  });
  it('formats sizes', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(2048)).toBe('2.0 KB');
    expect(formatBytes(3 * 1024 * 1024)).toBe('3.0 MB');
  });
});

describe('format', () => {
  it('formats durations', () => {
    expect(formatDuration(0)).toBe('0:00');
    expect(formatDuration(7_000)).toBe('0:07');
    expect(formatDuration(245_000)).toBe('4:05');
    expect(formatDuration(3_723_000)).toBe('1:02:03');
    expect(formatDuration(-5)).toBe('0:00');
  });
  it('dates a message older than today, not one from today', () => {
    const now = new Date(2026, 11, 2, 15, 0).getTime();
    const earlier = new Date(2026, 11, 2, 9, 30).getTime();
    const yesterday = new Date(2026, 11, 1, 23, 50).getTime();
    expect(formatWhen(earlier, 'en', now)).toBe(formatClock(earlier, 'en'));
    expect(formatWhen(yesterday, 'en', now)).toBe(formatDateTime(yesterday, 'en'));
    expect(formatWhen(yesterday, 'en', now)).not.toBe(formatClock(yesterday, 'en'));
  });
  it('counts seconds left, rounding up', () => {
    expect(secondsLeft(10_500, 10_000)).toBe(1);
    expect(secondsLeft(10_000, 10_000)).toBe(0);
    expect(secondsLeft(9_000, 10_000)).toBe(0);
    expect(secondsLeft(40_000, 10_000)).toBe(30);
  });
});

describe('virtual list', () => {
  it('renders only the visible window plus overscan for 1,000 rows', () => {
    const r = visibleRange(5800, 600, 58, 1000, 5);
    expect(r.start).toBe(95);
    expect(r.end).toBe(100 + 12 + 5);
    expect(r.end - r.start).toBeLessThan(40);
    expect(r.padTop + (r.end - r.start) * 58 + r.padBottom).toBe(1000 * 58);
  });
  it('clamps at both ends', () => {
    expect(visibleRange(0, 600, 58, 3)).toEqual({ start: 0, end: 3, padTop: 0, padBottom: 0 });
    const end = visibleRange(1e9, 600, 58, 1000);
    expect(end.end).toBe(1000);
    expect(visibleRange(0, 600, 58, 0)).toEqual({ start: 0, end: 0, padTop: 0, padBottom: 0 });
  });
  it('scrolls a row into view only when needed', () => {
    expect(scrollToRow(10, 0, 300, 50)).toBe(250);
    expect(scrollToRow(2, 0, 300, 50)).toBeNull();
    expect(scrollToRow(0, 100, 300, 50)).toBe(0);
  });
});

describe('store', () => {
  it('notifies only on change', () => {
    const s = createStore((n: number, a: number) => (a === 0 ? n : n + a), 1);
    const seen: number[] = [];
    const off = s.subscribe((v) => seen.push(v));
    s.dispatch(0);
    s.dispatch(2);
    off();
    s.dispatch(3);
    expect(seen).toEqual([3]);
    expect(s.get()).toBe(6);
  });
});
