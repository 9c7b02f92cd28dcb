/**
 * The visitor's side of one conversation as a pure reducer, plus its persistence: the
 * token, the last processed seq and the recent events are kept in localStorage so a page
 * reload shows the history at once and resumes with last_seq (no gap, no duplicate).
 */
import { mergeBySeq } from '../shared/seq';
import type { Attachment } from '../shared/files';

export interface ClientEvent {
  type?: 'event';
  kind: 'started' | 'queued' | 'with_bot' | 'message' | 'handoff' | 'assigned' | 'transferred' | 'closed' | 'rated' | string;
  seq: number;
  at: number;
  from?: 'client' | 'operator' | 'bot';
  key?: string;
  name?: string;
  text?: string;
  channel?: string;
  group?: string;
  by?: 'client' | 'operator' | 'system';
  score?: number;
  comment?: string;
  attachments?: Attachment[];
  /** A bot message's quick replies (see quickReplies). */
  buttons?: string[];
  /** Kept by this widget only, on its own messages: the last seq it had shown when the
   *  visitor sent it (a message written before a bot message arrived answers nothing). */
  sentAfter?: number;
}

export interface PendingSend {
  key: string;
  text: string;
  attachments: Attachment[];
  at: number;
  state: 'sending' | 'failed';
  error?: string;
  /** Set once the ack arrived: the message is committed (delivered). */
  ackSeq?: number;
  /** The last seq shown when the visitor sent it (set by the reducer). */
  seenSeq?: number;
}

export interface WidgetState {
  token: string | null;
  conversation: number | null;
  /** Last conversation seq processed. */
  lastSeq: number;
  events: readonly ClientEvent[];
  pending: readonly PendingSend[];
  closed: boolean;
  rated: boolean;
  operatorName: string | null;
  operatorTypingUntil: number;
  operatorReadUpto: number;
}

export const MAX_CACHED_EVENTS = 200;

export const emptyWidgetState: WidgetState = {
  token: null,
  conversation: null,
  lastSeq: 0,
  events: [],
  pending: [],
  closed: false,
  rated: false,
  operatorName: null,
  operatorTypingUntil: 0,
  operatorReadUpto: 0,
};

export type WidgetAction =
  | { type: 'started'; token: string; conversation: number }
  | { type: 'event'; event: ClientEvent }
  | { type: 'ack'; key: string; seq: number }
  | { type: 'queue'; message: PendingSend }
  | { type: 'sendFailed'; key: string; error: string }
  | { type: 'retry'; key: string }
  | { type: 'discard'; key: string }
  | { type: 'typing'; now: number; name?: string }
  | { type: 'read'; by: string; upto: number }
  | { type: 'replayFromStart' }
  | { type: 'forget' }
  | { type: 'restore'; state: WidgetState };

function applyEvent(s: WidgetState, ev: ClientEvent): WidgetState {
  if (ev.kind === 'message' && ev.from === 'client' && ev.key) {
    const sent = s.pending.find((p) => p.key === ev.key);
    if (sent?.seenSeq !== undefined) ev = { ...ev, sentAfter: sent.seenSeq };
  }
  const events = mergeBySeq(s.events, [ev]);
  let next: WidgetState = { ...s, events: events.length > MAX_CACHED_EVENTS ? events.slice(-MAX_CACHED_EVENTS) : events, lastSeq: ev.seq };
  switch (ev.kind) {
    case 'assigned':
      next.operatorName = ev.name ?? next.operatorName;
      break;
    case 'transferred':
      next.operatorName = null;
      break;
    case 'message':
      if (ev.from === 'client' && ev.key) next.pending = next.pending.filter((p) => p.key !== ev.key);
      if (ev.from === 'operator') next.operatorTypingUntil = 0;
      break;
    case 'closed':
      next = { ...next, closed: true, operatorTypingUntil: 0 };
      break;
    case 'rated':
      next.rated = true;
      break;
  }
  return next;
}

export function widgetReducer(s: WidgetState, a: WidgetAction): WidgetState {
  switch (a.type) {
    case 'started':
      return { ...emptyWidgetState, token: a.token, conversation: a.conversation, pending: s.pending };
    case 'event':
      if (typeof a.event.seq !== 'number' || a.event.seq <= s.lastSeq) return s; // replayed: drop
      return applyEvent(s, a.event);
    case 'ack':
      // Committed; the message event (either order) removes it from pending. Keep it
      // until then so it stays visible, now marked as delivered.
      if (!s.pending.some((p) => p.key === a.key)) return s;
      return { ...s, pending: s.pending.map((p) => (p.key === a.key ? { ...p, state: 'sending' as const, ackSeq: a.seq } : p)) };
    case 'queue':
      return { ...s, pending: [...s.pending.filter((p) => p.key !== a.message.key), { ...a.message, seenSeq: s.lastSeq }] };
    case 'sendFailed':
      return { ...s, pending: s.pending.map((p) => (p.key === a.key ? { ...p, state: 'failed', error: a.error } : p)) };
    case 'retry':
      return { ...s, pending: s.pending.map((p) => (p.key === a.key ? { ...p, state: 'sending', error: undefined } : p)) };
    case 'discard':
      return { ...s, pending: s.pending.filter((p) => p.key !== a.key) };
    case 'typing':
      return { ...s, operatorTypingUntil: a.now + 4000, operatorName: a.name ?? s.operatorName };
    case 'read':
      if (a.by !== 'operator' || a.upto <= s.operatorReadUpto) return s;
      return { ...s, operatorReadUpto: a.upto };
    case 'replayFromStart':
      return { ...s, events: [], lastSeq: 0, closed: false, rated: false };
    case 'forget':
      return { ...emptyWidgetState };
    case 'restore':
      return a.state;
    default:
      return s;
  }
}

/** The newest seq of an operator message (what a read mark from us covers). */
export function lastOperatorSeq(s: WidgetState): number {
  for (let i = s.events.length - 1; i >= 0; i--) {
    const e = s.events[i];
    if (e.kind === 'message' && e.from === 'operator') return e.seq;
  }
  return 0;
}

/** Whether the channel's bot holds the conversation: it took it (`with_bot`) and has not
 *  handed it to a person yet (`handoff`, then `queued`, `assigned`) or closed it. */
export function withBot(s: WidgetState): boolean {
  for (let i = s.events.length - 1; i >= 0; i--) {
    switch (s.events[i].kind) {
      case 'with_bot':
        return !s.closed;
      case 'handoff':
      case 'queued':
      case 'assigned':
      case 'transferred':
      case 'closed':
        return false;
    }
  }
  return false;
}

/** The quick replies to show: those of the newest bot message, as long as nothing
 *  answered it yet (an operator message, or a customer message sent or being sent after
 *  the bot message was shown: the first message, written before the bot greeted, answers
 *  nothing), the bot did not hand the conversation over, and it is not closed. Null when
 *  there are none. */
export function quickReplies(s: WidgetState): { seq: number; buttons: string[] } | null {
  if (s.closed) return null;
  const answers = (seen: number | undefined, botSeq: number) => seen === undefined || seen >= botSeq;
  for (let i = s.events.length - 1; i >= 0; i--) {
    const e = s.events[i];
    if (e.kind === 'handoff' || e.kind === 'closed') return null;
    if (e.kind !== 'message' || e.from !== 'bot') continue;
    if (!Array.isArray(e.buttons) || !e.buttons.length) return null;
    for (let j = i + 1; j < s.events.length; j++) {
      const later = s.events[j];
      if (later.kind !== 'message') continue;
      if (later.from !== 'client' || answers(later.sentAfter, e.seq)) return null;
    }
    if (s.pending.some((p) => answers(p.seenSeq, e.seq))) return null;
    return { seq: e.seq, buttons: e.buttons };
  }
  return null;
}

/** Operator messages newer than `readUpto` (for an unread badge on the closed widget). */
export function unreadFromOperator(s: WidgetState, readUpto: number): number {
  let n = 0;
  for (const e of s.events) if (e.kind === 'message' && e.from === 'operator' && e.seq > readUpto) n++;
  return n;
}

const STORAGE_VERSION = 1;

export function serialize(s: WidgetState): string | null {
  if (!s.token) return null;
  return JSON.stringify({
    v: STORAGE_VERSION,
    token: s.token,
    conversation: s.conversation,
    lastSeq: s.lastSeq,
    events: s.events.slice(-MAX_CACHED_EVENTS),
    pending: s.pending.filter((p) => p.state === 'sending'),
    closed: s.closed,
    rated: s.rated,
    operatorName: s.operatorName,
  });
}

/** The channel a stored session's conversation was started in, as its cached `started`
 *  event names it; null when unreadable or when that event is no longer cached. */
export function storedChannel(text: string | null): string | null {
  const s = deserialize(text);
  const started = s.token ? s.events.find((e) => e.kind === 'started') : undefined;
  return started && typeof started.channel === 'string' ? started.channel : null;
}

/** Reads a stored session; anything unreadable or inconsistent gives a fresh state. */
export function deserialize(text: string | null): WidgetState {
  if (!text) return emptyWidgetState;
  try {
    const o = JSON.parse(text);
    if (!o || o.v !== STORAGE_VERSION || typeof o.token !== 'string') return emptyWidgetState;
    const lastSeq = Number.isInteger(o.lastSeq) && o.lastSeq >= 0 ? o.lastSeq : 0;
    let events: ClientEvent[] = Array.isArray(o.events) ? o.events.filter((e: any) => e && typeof e.seq === 'number' && typeof e.kind === 'string') : [];
    events = mergeBySeq([], events.filter((e) => e.seq <= lastSeq)) as ClientEvent[];
    // A cache that does not reach lastSeq cannot be trusted to be gap-free: replay all.
    const consistent = lastSeq === 0 || (events.length > 0 && events[events.length - 1].seq === lastSeq);
    const pending: PendingSend[] = Array.isArray(o.pending)
      ? o.pending
          .filter((p: any) => p && typeof p.key === 'string' && typeof p.text === 'string')
          .map((p: any) => ({
            key: p.key,
            text: p.text,
            attachments: Array.isArray(p.attachments) ? p.attachments : [],
            at: Number(p.at) || 0,
            state: 'sending' as const,
            ...(Number.isInteger(p.seenSeq) && p.seenSeq >= 0 ? { seenSeq: p.seenSeq } : {}),
          }))
      : [];
    return {
      ...emptyWidgetState,
      token: o.token,
      conversation: typeof o.conversation === 'number' ? o.conversation : null,
      lastSeq: consistent ? lastSeq : 0,
      events: consistent ? events : [],
      pending,
      closed: consistent && !!o.closed,
      rated: consistent && !!o.rated,
      operatorName: typeof o.operatorName === 'string' ? o.operatorName : null,
    };
  } catch {
    return emptyWidgetState;
  }
}
