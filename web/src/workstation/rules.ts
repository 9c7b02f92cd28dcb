/**
 * A skill group's relaxation steps and working hours, and the channel weights: the admin
 * forms' text and the API's JSON, both ways (pure, unit-tested).
 */
import { parsePairsStrict, showPairs } from './forms';
import type { ClosedAction, GroupHours, Holiday, HoursRange, RelaxationStep, Weekday } from './types';

export const WEEKDAYS: readonly Weekday[] = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
export const MAX_STEPS = 10;
export const CLOSED_ACTIONS: readonly ClosedAction[] = ['reply', 'wait', 'transfer'];

/** Russian day abbreviations accepted as well (the form is bilingual; JSON says mon…sun). */
const DAY_ALIASES: Record<string, Weekday> = { пн: 'mon', вт: 'tue', ср: 'wed', чт: 'thu', пт: 'fri', сб: 'sat', вс: 'sun' };

/** "09:00" → 540 minutes, "24:00" → 1440; null when not a time of day. */
export function parseClock(text: string): number | null {
  const m = /^(\d{1,2}):(\d{2})$/.exec(text.trim());
  if (!m) return null;
  const h = Number(m[1]);
  const min = Number(m[2]);
  if (min > 59 || h > 24 || (h === 24 && min !== 0)) return null;
  return h * 60 + min;
}

/** 540 → "09:00". */
export function showClock(minutes: number): string {
  return String(Math.floor(minutes / 60)).padStart(2, '0') + ':' + String(minutes % 60).padStart(2, '0');
}

/** "09:00-18:00, 19:00-21:00" → ranges (times normalized to "HH:MM"); null when a
 *  range is malformed or does not end after it starts. */
export function parseRanges(text: string): { open: string; close: string }[] | null {
  const out: { open: string; close: string }[] = [];
  for (const part of text.split(',').map((x) => x.trim())) {
    if (!part) continue;
    const m = /^(\S+?)\s*[-–]\s*(\S+)$/.exec(part);
    const open = m ? parseClock(m[1]) : null;
    const close = m ? parseClock(m[2]) : null;
    if (open == null || close == null || close <= open) return null;
    out.push({ open: showClock(open), close: showClock(close) });
  }
  return out;
}

function day(name: string): Weekday | null {
  const n = name.trim().toLowerCase();
  if ((WEEKDAYS as readonly string[]).includes(n)) return n as Weekday;
  return DAY_ALIASES[n] ?? null;
}

/** "mon-fri", "sat, sun", "fri-mon" (wrapping) → the days; null when a name is unknown. */
export function parseDays(text: string): Weekday[] | null {
  const out: Weekday[] = [];
  for (const part of text.split(',').map((x) => x.trim())) {
    if (!part) continue;
    const [a, b, extra] = part.split(/\s*[-–]\s*/);
    const from = day(a);
    const to = b === undefined ? from : day(b);
    if (!from || !to || extra !== undefined) return null;
    for (let i = WEEKDAYS.indexOf(from); ; i = (i + 1) % 7) {
      if (!out.includes(WEEKDAYS[i])) out.push(WEEKDAYS[i]);
      if (WEEKDAYS[i] === to) break;
    }
  }
  return out.length ? out : null;
}

/** Either the parsed value, or the (1-based) number of the first line not understood. */
export type Parsed<T> = { value: T } | { line: number };

/**
 * The weekly hours, one line per day or run of days: `mon-fri 09:00-18:00`,
 * `sat 10:00-14:00, 15:00-17:00`. A day on no line is closed; a line of days alone adds
 * nothing. Blank lines are skipped.
 */
export function parseWeekly(text: string): Parsed<HoursRange[]> {
  const out: HoursRange[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    const m = /^(.*?[^\d\s,–-])(?:\s+(\d.*))?$/.exec(line);
    const days = m ? parseDays(m[1]) : null;
    const ranges = m ? parseRanges(m[2] ?? '') : null;
    if (!days || !ranges) return { line: i + 1 };
    for (const d of days) for (const r of ranges) out.push({ day: d, ...r });
  }
  return { value: out };
}

/** The weekly hours as the form shows them: days in week order, consecutive days with the
 *  same hours on one line (`mon-fri 09:00-18:00`). */
export function showWeekly(rows: HoursRange[] | undefined): string {
  const byDay = WEEKDAYS.map((d) =>
    (rows ?? [])
      .filter((r) => r.day === d)
      .sort((a, b) => (a.open < b.open ? -1 : a.open > b.open ? 1 : 0))
      .map((r) => r.open + '-' + r.close)
      .join(', '),
  );
  const lines: string[] = [];
  for (let i = 0; i < 7; ) {
    let j = i;
    while (j + 1 < 7 && byDay[j + 1] === byDay[i]) j++;
    if (byDay[i]) lines.push((j > i ? WEEKDAYS[i] + '-' + WEEKDAYS[j] : WEEKDAYS[i]) + ' ' + byDay[i]);
    i = j + 1;
  }
  return lines.join('\n');
}

function realDate(text: string): boolean {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(text);
  if (!m) return false;
  const d = new Date(Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3])));
  return d.getUTCFullYear() === Number(m[1]) && d.getUTCMonth() === Number(m[2]) - 1 && d.getUTCDate() === Number(m[3]);
}

/** Holidays and special days, one date a line: `2026-12-31 10:00-14:00` (its own hours),
 *  `2027-01-01` (closed all day). */
export function parseHolidays(text: string): Parsed<Holiday[]> {
  const out: Holiday[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    const [date, ...rest] = line.split(/\s+/);
    const ranges = parseRanges(rest.join(' '));
    if (!realDate(date) || !ranges) return { line: i + 1 };
    if (!ranges.length) out.push({ date });
    for (const r of ranges) out.push({ date, ...r });
  }
  return { value: out };
}

export function showHolidays(rows: Holiday[] | undefined): string {
  const dates: string[] = [];
  const hours = new Map<string, string[]>();
  for (const h of rows ?? []) {
    if (!hours.has(h.date)) (dates.push(h.date), hours.set(h.date, []));
    if (h.open && h.close) hours.get(h.date)!.push(h.open + '-' + h.close);
  }
  return dates.map((d) => (hours.get(d)!.length ? d + ' ' + hours.get(d)!.join(', ') : d)).join('\n');
}

/** Whether the browser knows the IANA time zone (`Europe/Moscow`, `UTC`). */
export function knownTimeZone(zone: string): boolean {
  if (!zone.trim()) return false;
  try {
    new Intl.DateTimeFormat('en', { timeZone: zone.trim() });
    return true;
  } catch {
    return false;
  }
}

/** The working-hours part of the group form, as typed. */
export interface HoursDraft {
  on: boolean;
  time_zone: string;
  weekly: string;
  holidays: string;
  closed_action: ClosedAction;
  transfer_to: string;
  message: string;
}

export function hoursDraft(h: GroupHours | null | undefined, defaultZone = 'UTC'): HoursDraft {
  return {
    on: !!h,
    time_zone: h?.time_zone ?? defaultZone,
    weekly: h ? showWeekly(h.weekly) : 'mon-fri 09:00-18:00',
    holidays: showHolidays(h?.holidays),
    closed_action: h?.closed_action ?? 'reply',
    transfer_to: h?.transfer_to ?? '',
    message: h?.message ?? '',
  };
}

export type HoursProblem = 'hours_zone' | 'hours_weekly_line' | 'hours_holiday_line' | 'hours_transfer_to' | 'hours_message';

/** The `hours` of a PUT body (null: always open), or what is wrong with the draft. */
export function hoursFromDraft(d: HoursDraft): { value: GroupHours | null } | { problem: HoursProblem; line?: number } {
  if (!d.on) return { value: null };
  if (!knownTimeZone(d.time_zone)) return { problem: 'hours_zone' };
  const weekly = parseWeekly(d.weekly);
  if ('line' in weekly) return { problem: 'hours_weekly_line', line: weekly.line };
  const holidays = parseHolidays(d.holidays);
  if ('line' in holidays) return { problem: 'hours_holiday_line', line: holidays.line };
  if (d.closed_action === 'transfer' && !d.transfer_to) return { problem: 'hours_transfer_to' };
  if (d.closed_action === 'reply' && !d.message.trim()) return { problem: 'hours_message' };
  return {
    value: {
      time_zone: d.time_zone.trim(),
      weekly: weekly.value,
      holidays: holidays.value,
      closed_action: d.closed_action,
      transfer_to: d.closed_action === 'transfer' ? d.transfer_to : null,
      message: d.message.trim(),
    },
  };
}

/** A relaxation step as the form holds it (skills as typed). */
export interface StepDraft {
  after_ms: number;
  /** `billing=2`; empty: the group's own skills; `-`: none at all. */
  skills: string;
  max_level: number;
  overflow: string[];
}

export function stepDrafts(steps: RelaxationStep[] | undefined): StepDraft[] {
  return (steps ?? []).map((s) => ({
    after_ms: s.after_ms,
    skills: s.skills == null ? '' : Object.keys(s.skills).length ? showPairs(s.skills) : '-',
    max_level: s.max_level ?? 0,
    overflow: s.overflow ?? [],
  }));
}

/** A new step: 30 s after the last one. */
export function nextStep(steps: StepDraft[]): StepDraft {
  return { after_ms: (steps.at(-1)?.after_ms ?? 0) + 30_000, skills: '', max_level: 0, overflow: [] };
}

export type StepsProblem = 'steps_too_many' | 'steps_order' | 'step_skills';

/** The `steps` of a PUT body, or what is wrong (with the 1-based step number). */
export function stepsFromDrafts(drafts: StepDraft[]): { value: RelaxationStep[] } | { problem: StepsProblem; step?: number } {
  if (drafts.length > MAX_STEPS) return { problem: 'steps_too_many' };
  const out: RelaxationStep[] = [];
  let last = 0;
  for (let i = 0; i < drafts.length; i++) {
    const d = drafts[i];
    if (!Number.isFinite(d.after_ms) || d.after_ms <= last) return { problem: 'steps_order', step: i + 1 };
    last = d.after_ms;
    const text = d.skills.trim();
    const skills = text === '' ? null : text === '-' ? {} : parsePairsStrict(text, 1, 5);
    if (skills === null && text !== '') return { problem: 'step_skills', step: i + 1 };
    out.push({ after_ms: d.after_ms, skills, max_level: d.max_level, overflow: d.overflow });
  }
  return { value: out };
}

/** `email=2, web=1` → weights (whole, 1-100); null when an entry is not one. */
export function parseWeights(text: string): Record<string, number> | null {
  return parsePairsStrict(text, 1, 100);
}
