/**
 * The supervisor's live floor: queues and operators. It comes from `floor` frames of
 * /ws/supervisor, or (where that socket is unavailable) from polling /api/queues and
 * /api/operators; both are normalized into the same shape.
 */
import type { Presence } from './types';

/** A queued conversation as the floor lists it (the first 100 of a queue). */
export interface QueuedConv {
  conversation: number;
  state: 'waiting' | 'offered';
  waiting_ms: number;
  visitor: string;
  /** Why a waiting conversation is not offered: `closed` (working hours), `nobody_online`,
   *  `everyone_full`, `everyone_passed` (then `next_round_at`), `routing`; absent when
   *  offered or unknown. */
  why?: string;
  next_round_at?: number;
  /** Its priority now (rules 5; higher is offered first); 0 when none. */
  priority: number;
  /** The relaxation step it is at, and when the next one starts (server clock; null:
   *  the last step); absent when its group has no steps. */
  step?: number;
  next_step_at?: number | null;
}

/** A group's working hours as the floor reports them: open now, and until when. */
export interface QueueHours {
  open: boolean;
  next_change_at: number | null;
}

export interface QueueRow {
  group: string;
  name: string;
  waiting: number;
  offered: number;
  longest_wait_ms: number;
  sla_ms: number | null;
  within_sla: number | null;
  /** Operators who could take a conversation of the group now (online, with room); null
   *  when the source does not say. */
  available: number | null;
  /** Queued conversations in queue order; empty when the source does not list them. */
  conversations: QueuedConv[];
  /** Working hours; null when the group has none (or the source does not say). */
  hours: QueueHours | null;
}

export interface OperatorRow {
  id: string;
  name: string;
  presence: Presence;
  presence_since: number;
  /** Why the presence was set for them (`disconnected`), or null. */
  presence_reason: string | null;
  /** In wrap-up until then (server clock), or null. */
  wrap_up_until: number | null;
  load: number;
  capacity: number;
  /** Conversation ids held, when the source lists them. */
  active: number[] | null;
  activeCount: number;
  groups: string[];
}

/** An emergency notice in force (`floor.emergencies`). */
export interface EmergencyRow {
  channel?: string;
  group?: string;
  message: string;
  by: string;
  since: number;
}

export interface Floor {
  /** Snapshot time as the source stamped it. */
  at: number;
  /** When this client received it (for extrapolating waits without clock skew). */
  receivedAt: number;
  source: 'socket' | 'poll';
  queues: QueueRow[];
  operators: OperatorRow[];
  /** Notices in force; null when the source does not say (polling). */
  emergencies: EmergencyRow[] | null;
}

function num(v: unknown, d = 0): number {
  return typeof v === 'number' && Number.isFinite(v) ? v : d;
}

function normalizeQueued(raw: unknown): QueuedConv[] {
  if (!Array.isArray(raw)) return [];
  return raw
    .filter((c) => c && typeof c.conversation === 'number')
    .map((c) => ({
      conversation: c.conversation,
      state: c.state === 'offered' ? 'offered' : 'waiting',
      waiting_ms: num(c.waiting_ms),
      visitor: typeof c.visitor === 'string' ? c.visitor : '',
      why: typeof c.why === 'string' ? c.why : undefined,
      next_round_at: typeof c.next_round_at === 'number' ? c.next_round_at : undefined,
      priority: num(c.priority),
      step: typeof c.step === 'number' ? c.step : undefined,
      next_step_at: typeof c.next_step_at === 'number' ? c.next_step_at : c.next_step_at === null ? null : undefined,
    }));
}

export function normalizeQueues(raw: any[]): QueueRow[] {
  return (raw ?? [])
    .map((q) => ({
      group: String(q.group),
      name: String(q.name ?? q.group),
      waiting: num(q.waiting),
      offered: num(q.offered),
      longest_wait_ms: num(q.longest_wait_ms),
      sla_ms: typeof q.sla_ms === 'number' ? q.sla_ms : null,
      within_sla: typeof q.within_sla === 'number' ? q.within_sla : null,
      available: typeof q.available === 'number' ? q.available : null,
      conversations: normalizeQueued(q.conversations),
      hours: q.hours && typeof q.hours.open === 'boolean' ? { open: q.hours.open, next_change_at: typeof q.hours.next_change_at === 'number' ? q.hours.next_change_at : null } : null,
    }))
    .sort((a, b) => (a.group < b.group ? -1 : a.group > b.group ? 1 : 0));
}

export function normalizeOperators(raw: any[]): OperatorRow[] {
  return (raw ?? [])
    .map((o) => {
      const active = Array.isArray(o.active) ? o.active.filter((x: unknown) => typeof x === 'number') : null;
      return {
        id: String(o.id),
        name: String(o.name ?? o.id),
        presence: (o.presence ?? 'offline') as Presence,
        presence_since: num(o.presence_since),
        presence_reason: typeof o.presence_reason === 'string' ? o.presence_reason : null,
        wrap_up_until: typeof o.wrap_up_until === 'number' ? o.wrap_up_until : null,
        load: num(o.load),
        capacity: num(o.capacity, 1),
        active,
        activeCount: active ? active.length : num(o.active),
        groups: Array.isArray(o.groups) ? o.groups.map(String) : [],
      };
    })
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.id < b.id ? -1 : 1));
}

export function floorFromFrame(f: any, now: number): Floor {
  const emergencies = Array.isArray(f.emergencies)
    ? f.emergencies
        .filter((e: any) => e && typeof e.message === 'string')
        .map((e: any) => ({ channel: e.channel, group: e.group, message: e.message, by: String(e.by ?? ''), since: num(e.since) }))
    : null;
  return { at: num(f.at, now), receivedAt: now, source: 'socket', queues: normalizeQueues(f.queues), operators: normalizeOperators(f.operators), emergencies };
}

export function floorFromRest(queues: any, operators: any, now: number): Floor {
  return { at: now, receivedAt: now, source: 'poll', queues: normalizeQueues(queues?.queues), operators: normalizeOperators(operators?.operators), emergencies: null };
}

/** SLA share in percent for the queue, or null when the server does not report an SLA. */
export function slaPercent(q: QueueRow): number | null {
  if (q.sla_ms == null || q.within_sla == null) return null;
  const total = q.waiting + q.offered;
  if (!total) return 100;
  return Math.round((100 * q.within_sla) / total);
}

/** Longest wait as of `now`, extrapolated from the snapshot time. */
export function longestWaitNow(q: QueueRow, floor: Floor, now: number): number {
  if (!q.waiting && !q.offered) return 0;
  return q.longest_wait_ms + Math.max(0, now - floor.receivedAt);
}

export function totals(floor: Floor) {
  let waiting = 0;
  let offered = 0;
  for (const q of floor.queues) {
    waiting += q.waiting;
    offered += q.offered;
  }
  // Load and capacity of the same operators (those online): an operator away or on a
  // break still holding conversations would otherwise show a load past the capacity.
  const present = floor.operators.filter((o) => o.presence === 'online');
  const online = present.length;
  const load = present.reduce((n, o) => n + o.load, 0);
  const capacity = present.reduce((n, o) => n + o.capacity, 0);
  return { waiting, offered, online, load, capacity };
}

/** How long ago a moment of the server's clock was, as of `now` (the snapshot's skew
 *  removed); never negative. */
export function sinceNow(at: number, floor: Floor, now: number): number {
  return Math.max(0, now - (at - floor.at + floor.receivedAt));
}

/** Time left until a moment of the server's clock, as of `now` (the snapshot's skew
 *  removed); never negative. */
export function untilNow(at: number, floor: Floor, now: number): number {
  return Math.max(0, at - floor.at + floor.receivedAt - now);
}

/** How long a queued conversation has waited as of `now`, extrapolated from the snapshot. */
export function queuedWaitNow(c: QueuedConv, floor: Floor, now: number): number {
  return c.waiting_ms + Math.max(0, now - floor.receivedAt);
}

/**
 * Where the floor shows a conversation: queued in a group (and whether it is offered),
 * held by an operator, or nowhere (closed, or beyond the listed part of a queue). The
 * string changes exactly when the floor's view of that conversation changes, so an
 * inspector can re-fetch on it.
 */
export function floorPlace(floor: Floor | null, id: number): string {
  if (!floor) return '';
  for (const q of floor.queues) {
    const c = q.conversations.find((x) => x.conversation === id);
    if (c) return 'queue:' + q.group + ':' + c.state;
  }
  for (const o of floor.operators) if (o.active?.includes(id)) return 'operator:' + o.id;
  return 'none';
}
