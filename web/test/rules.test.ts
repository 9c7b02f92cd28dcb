import { describe, expect, it } from 'vitest';
import {
  hoursDraft,
  hoursFromDraft,
  knownTimeZone,
  MAX_STEPS,
  nextStep,
  parseClock,
  parseDays,
  parseHolidays,
  parseRanges,
  parseWeekly,
  parseWeights,
  showClock,
  showHolidays,
  showWeekly,
  stepDrafts,
  stepsFromDrafts,
  type HoursDraft,
} from '../src/workstation/rules';
import { parsePairs, parsePairsStrict, showPairs } from '../src/workstation/forms';
import { Api } from '../src/workstation/api';
import type { GroupHours, RelaxationStep } from '../src/workstation/types';

describe('times of day', () => {
  it('parses "HH:MM" up to 24:00, and nothing else', () => {
    expect(parseClock('09:00')).toBe(540);
    expect(parseClock(' 9:30 ')).toBe(570);
    expect(parseClock('00:00')).toBe(0);
    expect(parseClock('24:00')).toBe(1440);
    for (const bad of ['24:01', '25:00', '9', '09:60', '9.30', '', 'ab:cd', '09:5']) expect([bad, parseClock(bad)]).toEqual([bad, null]);
  });
  it('shows minutes as "HH:MM"', () => {
    expect(showClock(540)).toBe('09:00');
    expect(showClock(1440)).toBe('24:00');
    expect(showClock(75)).toBe('01:15');
  });
  it('parses ranges that end after they start, normalizing the times', () => {
    expect(parseRanges('9:00-18:00, 19:00 – 24:00')).toEqual([
      { open: '09:00', close: '18:00' },
      { open: '19:00', close: '24:00' },
    ]);
    expect(parseRanges('')).toEqual([]);
    expect(parseRanges('18:00-09:00')).toBeNull();
    expect(parseRanges('09:00-09:00')).toBeNull();
    expect(parseRanges('09:00')).toBeNull();
  });
});

describe('weekly hours', () => {
  it('reads days, runs of days (wrapping) and Russian abbreviations', () => {
    expect(parseDays('mon-fri')).toEqual(['mon', 'tue', 'wed', 'thu', 'fri']);
    expect(parseDays('Sat, sun')).toEqual(['sat', 'sun']);
    expect(parseDays('fri-mon')).toEqual(['fri', 'sat', 'sun', 'mon']);
    expect(parseDays('пн-ср')).toEqual(['mon', 'tue', 'wed']);
    expect(parseDays('monday')).toBeNull();
    expect(parseDays('mon-tue-wed')).toBeNull();
  });
  it('turns rows into one entry per day and range, and says which line is wrong', () => {
    expect(parseWeekly('mon-wed 09:00-18:00\n\nsat 10:00-12:00, 13:00-15:00\nsun')).toEqual({
      value: [
        { day: 'mon', open: '09:00', close: '18:00' },
        { day: 'tue', open: '09:00', close: '18:00' },
        { day: 'wed', open: '09:00', close: '18:00' },
        { day: 'sat', open: '10:00', close: '12:00' },
        { day: 'sat', open: '13:00', close: '15:00' },
      ],
    });
    expect(parseWeekly('')).toEqual({ value: [] });
    expect(parseWeekly('mon-fri 09:00-18:00\nfunday 10:00-12:00')).toEqual({ line: 2 });
    expect(parseWeekly('mon 18:00-09:00')).toEqual({ line: 1 });
    expect(parseWeekly('09:00-18:00')).toEqual({ line: 1 });
  });
  it('shows consecutive days with the same hours on one line, and reads back the same', () => {
    const rows = parseWeekly('sat 10:00-14:00\nmon-fri 09:00-13:00, 14:00-18:00\nsun 00:00-24:00');
    if (!('value' in rows)) throw new Error('not parsed');
    const text = showWeekly(rows.value);
    expect(text).toBe('mon-fri 09:00-13:00, 14:00-18:00\nsat 10:00-14:00\nsun 00:00-24:00');
    expect(parseWeekly(text)).toEqual({ value: expect.arrayContaining(rows.value) });
    expect(showWeekly([{ day: 'tue', open: '09:00', close: '12:00' }, { day: 'thu', open: '09:00', close: '12:00' }])).toBe('tue 09:00-12:00\nthu 09:00-12:00');
    expect(showWeekly([])).toBe('');
  });
});

describe('holidays', () => {
  it('reads a date with its own hours, or alone for closed all day', () => {
    expect(parseHolidays('2026-12-31 10:00-14:00\n2027-01-01')).toEqual({
      value: [{ date: '2026-12-31', open: '10:00', close: '14:00' }, { date: '2027-01-01' }],
    });
    expect(parseHolidays('2026-02-30')).toEqual({ line: 1 });
    expect(parseHolidays('2026-12-31\n31.12.2026')).toEqual({ line: 2 });
    expect(parseHolidays('2026-12-31 14:00-10:00')).toEqual({ line: 1 });
  });
  it('shows one line per date', () => {
    const rows = [{ date: '2026-12-31', open: '10:00', close: '12:00' }, { date: '2027-01-01' }, { date: '2026-12-31', open: '13:00', close: '14:00' }];
    expect(showHolidays(rows)).toBe('2026-12-31 10:00-12:00, 13:00-14:00\n2027-01-01');
    expect(showHolidays(undefined)).toBe('');
  });
});

describe('working hours form', () => {
  const saved: GroupHours = {
    time_zone: 'Europe/Moscow',
    weekly: [
      { day: 'mon', open: '09:00', close: '18:00' },
      { day: 'tue', open: '09:00', close: '18:00' },
    ],
    holidays: [{ date: '2027-01-01' }],
    closed_action: 'transfer',
    transfer_to: 'sales',
    message: 'We are closed.',
    open_now: false,
    next_change_at: 1_800_000_000_000,
  };
  it('round-trips, leaving out what the server computes', () => {
    const d = hoursDraft(saved);
    expect(d).toEqual({ on: true, time_zone: 'Europe/Moscow', weekly: 'mon-tue 09:00-18:00', holidays: '2027-01-01', closed_action: 'transfer', transfer_to: 'sales', message: 'We are closed.' });
    const { open_now, next_change_at, ...body } = saved;
    expect(hoursFromDraft(d)).toEqual({ value: body });
  });
  it('is null when switched off, and starts from a sensible draft', () => {
    const d = hoursDraft(null, 'Asia/Tokyo');
    expect(d.on).toBe(false);
    expect(d.time_zone).toBe('Asia/Tokyo');
    expect(hoursFromDraft(d)).toEqual({ value: null });
    // Switched on with no weekly line at all: closed all week (allowed).
    expect(hoursFromDraft({ ...d, on: true, weekly: '', message: 'Closed' })).toMatchObject({ value: { weekly: [], closed_action: 'reply', transfer_to: null } });
  });
  it('says what is wrong', () => {
    const d: HoursDraft = { ...hoursDraft(saved), closed_action: 'reply' };
    expect(hoursFromDraft({ ...d, time_zone: 'Mars/Olympus' })).toEqual({ problem: 'hours_zone' });
    expect(hoursFromDraft({ ...d, weekly: 'mon 09:00-18:00\nxyz' })).toEqual({ problem: 'hours_weekly_line', line: 2 });
    expect(hoursFromDraft({ ...d, holidays: 'tomorrow' })).toEqual({ problem: 'hours_holiday_line', line: 1 });
    expect(hoursFromDraft({ ...d, closed_action: 'transfer', transfer_to: '' })).toEqual({ problem: 'hours_transfer_to' });
    expect(hoursFromDraft({ ...d, message: '  ' })).toEqual({ problem: 'hours_message' });
    // transfer_to only goes with transfer.
    expect(hoursFromDraft(d)).toMatchObject({ value: { closed_action: 'reply', transfer_to: null } });
  });
  it('knows IANA time zones', () => {
    expect(knownTimeZone('UTC')).toBe(true);
    expect(knownTimeZone('Europe/Moscow')).toBe(true);
    expect(knownTimeZone('')).toBe(false);
    expect(knownTimeZone('Nowhere/Special')).toBe(false);
  });
});

describe('relaxation steps form', () => {
  const steps: RelaxationStep[] = [
    { after_ms: 30_000, skills: null, max_level: 3, overflow: [] },
    { after_ms: 60_000, skills: { billing: 2, ru: 1 }, max_level: 0, overflow: ['sales'] },
    { after_ms: 120_000, skills: {}, max_level: 0, overflow: ['sales', 'tech'] },
  ];
  it('round-trips: empty keeps the group skills, "-" needs none', () => {
    const drafts = stepDrafts(steps);
    expect(drafts.map((d) => d.skills)).toEqual(['', 'billing=2, ru=1', '-']);
    expect(stepsFromDrafts(drafts)).toEqual({ value: steps });
    expect(stepDrafts(undefined)).toEqual([]);
    expect(stepsFromDrafts([])).toEqual({ value: [] });
  });
  it('adds a step 30 s after the last one', () => {
    expect(nextStep([])).toEqual({ after_ms: 30_000, skills: '', max_level: 0, overflow: [] });
    expect(nextStep(stepDrafts(steps)).after_ms).toBe(150_000);
  });
  it('needs strictly increasing times after 0, at most 10 steps, and well-formed skills', () => {
    const d = stepDrafts(steps);
    expect(stepsFromDrafts([{ ...d[0], after_ms: 0 }])).toEqual({ problem: 'steps_order', step: 1 });
    expect(stepsFromDrafts([d[0], { ...d[1], after_ms: 30_000 }])).toEqual({ problem: 'steps_order', step: 2 });
    expect(stepsFromDrafts([d[0], { ...d[1], skills: 'billing=9' }])).toEqual({ problem: 'step_skills', step: 2 });
    expect(stepsFromDrafts([{ ...d[0], skills: 'billing' }])).toEqual({ problem: 'step_skills', step: 1 });
    const many = Array.from({ length: MAX_STEPS + 1 }, (_, i) => ({ ...d[0], after_ms: (i + 1) * 1000 }));
    expect(stepsFromDrafts(many)).toEqual({ problem: 'steps_too_many' });
    expect(stepsFromDrafts(many.slice(0, MAX_STEPS))).toMatchObject({ value: expect.any(Array) });
  });
});

describe('key=number pairs', () => {
  it('parse leniently for skills, strictly where a dropped entry would mislead', () => {
    expect(parsePairs('billing=4, ru=x, en=')).toEqual({ billing: 4 });
    expect(parsePairsStrict(' email = 2 , web=1 ', 1, 100)).toEqual({ email: 2, web: 1 });
    expect(parsePairsStrict('', 1, 100)).toEqual({});
    expect(parsePairsStrict('email=2, web', 1, 100)).toBeNull();
    expect(parsePairsStrict('email=1.5', 1, 100)).toBeNull();
    expect(showPairs({ email: 2, web: 1 })).toBe('email=2, web=1');
    expect(showPairs(null)).toBe('');
  });
  it('channel weights are whole numbers from 1 to 100', () => {
    expect(parseWeights('email=2, chat=100')).toEqual({ email: 2, chat: 100 });
    expect(parseWeights('email=0')).toBeNull();
    expect(parseWeights('email=101')).toBeNull();
    expect(parseWeights('email=-1')).toBeNull();
  });
});

describe('Api errors', () => {
  const api = (status: number, body: string) => new Api('', async () => new Response(body, { status }));
  it('take the reason from {code, message} and from a bare {error}', async () => {
    await expect(api(400, JSON.stringify({ code: 'bad_request', message: 'after_ms must increase' })).get('/x')).rejects.toMatchObject({ status: 400, code: 'bad_request', message: 'after_ms must increase' });
    await expect(api(400, JSON.stringify({ error: 'at most 10 steps' })).get('/x')).rejects.toMatchObject({ status: 400, code: 'http_400', message: 'at most 10 steps' });
    await expect(api(404, '').get('/x')).rejects.toMatchObject({ code: 'not_found' });
  });
  it('a 401 to a request made with the token ends the session; one without a token does not', async () => {
    const ended: string[] = [];
    const unauthorized = JSON.stringify({ code: 'unauthorized', message: "this login's sessions ended or its role changed; log in again" });
    const a = api(401, unauthorized);
    a.onUnauthorized = () => ended.push('ended');
    await expect(a.get('/api/queues')).rejects.toMatchObject({ status: 401 });
    expect(ended).toEqual([]);
    a.token = 'T';
    await expect(a.get('/api/queues')).rejects.toMatchObject({ status: 401, code: 'unauthorized' });
    expect(ended).toEqual(['ended']);
    await expect(api(403, '{"code":"forbidden","message":"no"}').get('/x')).rejects.toMatchObject({ status: 403 });
    expect(ended).toEqual(['ended']);
    // A slow answer to a request of an earlier session ends nothing of the new one.
    let answer: (r: Response) => void = () => {};
    const slow = new Api('', () => new Promise<Response>((resolve) => (answer = resolve)));
    const seen: string[] = [];
    slow.onUnauthorized = () => seen.push('ended');
    slow.token = 'old';
    const pending = slow.get('/api/templates');
    slow.token = 'new';
    answer(new Response(unauthorized, { status: 401 }));
    await expect(pending).rejects.toMatchObject({ status: 401 });
    expect(seen).toEqual([]);
  });
});
