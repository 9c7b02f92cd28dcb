import type { Attachment } from '../shared/files';

export type Presence = 'online' | 'away' | 'break' | 'offline';
export const PRESENCES: readonly Presence[] = ['online', 'away', 'break', 'offline'];
export type Role = 'operator' | 'supervisor' | 'admin';

/** A conversation history entry in the staff view (protocol.md §3.4). */
export interface Entry {
  kind: 'started' | 'queued' | 'with_bot' | 'message' | 'handoff' | 'assigned' | 'transferred' | 'closed' | 'rated' | 'note' | string;
  /** For `note`: the login of the staff member who wrote it. */
  author?: string;
  seq: number;
  at: number;
  channel?: string;
  visitor?: { name?: string; attributes?: Record<string, string> };
  group?: string;
  from?: string;
  key?: string;
  text?: string;
  name?: string;
  operator?: string;
  to_operator?: string;
  to_group?: string;
  comment?: string;
  by?: string;
  resolution?: string;
  tags?: string[];
  score?: number;
  attachments?: Attachment[];
  /** A bot message's quick replies. */
  buttons?: string[];
  /** `handoff`: why the bot handed the conversation over (`group`: to whom), and what it
   *  learned (name → value). */
  reason?: string;
  context?: Record<string, string>;
}

export interface Offer {
  offer: number;
  conversation: number;
  group: string;
  deadline: number;
  visitor?: string;
  at?: number;
  /** When the offer was made (server clock; in `hello` offers). */
  made_at?: number;
  /** Local time the offer event arrived (for a countdown immune to clock skew). */
  receivedAt?: number;
  /** Milliseconds left by the server's clock when the offer arrived. */
  leftAtReceipt?: number;
  /** The conversation's channel, when its customer started waiting (server clock), and
   *  their first message. */
  channel?: string;
  waiting_since?: number;
  preview?: string | null;
  /** How long the customer had waited when the offer arrived (server clock). */
  waitedAtReceipt?: number;
}

export interface Hello {
  type: 'hello';
  operator: string;
  name: string;
  capacity: number;
  groups: string[];
  presence: Presence;
  presence_since?: number;
  /** Why the presence was set for the operator (`disconnected`), if it was. */
  presence_reason?: string | null;
  /** No offer until then (wrap-up after a close), ms since the epoch; null when not. */
  wrap_up_until?: number | null;
  /** The reasons a break may be taken for (empty: a plain break). */
  pause_reasons?: string[];
  active: number[];
  /** Where the visitor and the operators have read each active conversation to. */
  read_marks?: { conversation: number; client_read_upto: number; operator_read_upto: number }[];
  offers: Offer[];
  /** Protocol 1: the one feed's newest seq. */
  seq?: number;
  /** Protocol 2: the newest seq of every feed the socket follows. */
  cursor?: Record<string, number>;
  protocol: number;
  /** The server's clock when the snapshot was taken. */
  now?: number;
}

export interface FeedEvent {
  type: 'event';
  kind: 'offer' | 'offer_withdrawn' | 'assigned' | 'conversation' | 'released' | 'presence' | string;
  /** Protocol 2: the feed this event is in (`r`, `c0`…); its `seq` counts in that feed. */
  feed?: string;
  seq: number;
  at: number;
  offer?: number;
  conversation?: number;
  group?: string;
  deadline?: number;
  visitor?: string;
  reason?: string;
  history_upto?: number;
  history?: Entry[];
  entry?: Entry;
  /** `presence`: the new presence; `delivery`: the outbox entry's new status. */
  status?: Presence | DeliveryStatus;
  /** `delivery`: the conversation's history entry whose status changed. */
  entry_seq?: number;
  /** `offer`: the conversation's channel, start and first message. */
  channel?: string;
  waiting_since?: number;
  preview?: string | null;
  /** `wrap_up`: until when (null: it ended). */
  until?: number | null;
  /** `configured`: the operator's new name, capacity and groups. */
  name?: string;
  capacity?: number;
  groups?: string[];
}

export interface LoginInfo {
  token: string;
  login: string;
  role: Role;
  operator: string | null;
  expires_in?: number;
}

export interface SkillGroup {
  id: string;
  name: string;
  policy: string;
  offer_timeout_ms: number;
  sla_ms?: number;
  /** Queue order and pacing (rules 5). */
  routing?: GroupRouting;
  /** Relaxation steps 1..n (step 0, the group's own skills from arrival, is implicit). */
  steps?: RelaxationStep[];
  /** Working hours; null or absent: always open. */
  hours?: GroupHours | null;
}

/** From `after_ms` of waiting on, what a conversation of the group needs. */
export interface RelaxationStep {
  after_ms: number;
  /** Replaces the group's required skills from this step on; null keeps them. */
  skills: Record<string, number> | null;
  /** Caps every required level at this (0: no cap). */
  max_level: number;
  /** Other groups whose operators may also take it from this step on. */
  overflow: string[];
}

export type Weekday = 'mon' | 'tue' | 'wed' | 'thu' | 'fri' | 'sat' | 'sun';
export type ClosedAction = 'reply' | 'wait' | 'transfer';

/** Open from `open` to `close` ("09:00", "24:00") on a weekday. */
export interface HoursRange {
  day: Weekday;
  open: string;
  close: string;
}

/** A date with its own hours; without open and close, closed all day. */
export interface Holiday {
  date: string;
  open?: string;
  close?: string;
}

export interface GroupHours {
  time_zone: string;
  weekly: HoursRange[];
  holidays: Holiday[];
  closed_action: ClosedAction;
  transfer_to: string | null;
  message: string;
  /** Computed by the server (read-only): open now, and when that changes next. */
  open_now?: boolean;
  next_change_at?: number | null;
}

export interface AttributePriority {
  attribute: string;
  value: string;
  priority: number;
}

export interface GroupRouting {
  attribute_priorities: AttributePriority[];
  ageing_ms: number;
  wrap_up_ms: number;
  /** A returning customer goes first to their last operator within this time. */
  sticky_ms?: number;
  /** A silent customer is reminded, then their conversation closed, after these. */
  inactivity_remind_ms?: number;
  inactivity_close_ms?: number;
  inactivity_message?: string;
  required_skills?: Record<string, number>;
}

export interface OperatorStatus {
  id: string;
  name: string;
  capacity: number;
  groups: string[];
  presence: Presence;
  presence_since: number;
  load: number;
  active: number | number[];
  offers?: number;
  /** Per channel kind limits and the kinds taken (rules 5). */
  channel_limits?: Record<string, number>;
  channels?: string[];
  skills?: Record<string, number>;
}

/** A login as GET /api/users lists it (admins only; no password hashes). */
export interface UserInfo {
  login: string;
  role: Role;
  operator: string | null;
}

export interface Channel {
  id: string;
  kind: string;
  name: string;
  default_group: string;
  /** The priority its conversations start at (0-100). */
  priority?: number;
  /** Only the allow list may start here, and what a refused customer is told. */
  allow_only?: boolean;
  blocked_message?: string;
  /** How the channel reaches its provider; null: no adapter (the web chat). */
  adapter?: AdapterKind | null;
}

export type AdapterKind = 'telegram' | 'whatsapp' | 'messenger' | 'viber' | 'vk' | 'email' | 'api';

/** The adapter kinds the admin can connect, in the order offered. */
export const ADAPTER_KINDS: readonly AdapterKind[] = ['telegram', 'whatsapp', 'messenger', 'viber', 'vk', 'email', 'api'];

/** How an email channel's replies reach its SMTP relay: STARTTLS on a plain connection
 *  (the default, port 587), TLS from the start (465), or neither (a relay on the LAN). */
export type SmtpSecurity = 'starttls' | 'tls' | 'none';

export const SMTP_SECURITIES: readonly SmtpSecurity[] = ['starttls', 'tls', 'none'];

/** A channel's adapter as `GET/PUT /api/channels/{id}/adapter` shows it: secrets masked,
 *  except `token` and `signing_secret` in the answer of the PUT that made them. */
export interface AdapterView {
  kind: AdapterKind;
  bot_token?: string;
  secret?: string;
  access_token?: string;
  app_secret?: string;
  verify_token?: string;
  phone_number_id?: string;
  page_token?: string;
  auth_token?: string;
  sender_name?: string;
  confirmation?: string;
  group_id?: string;
  api_base?: string;
  webhook_path?: string;
  outbound_url?: string;
  token?: string;
  signing_secret?: string;
  inbound_path?: string;
  /** Email: the support mailbox (its mail comes in through the node's SMTP listener),
   *  the From name of replies, and the relay they go out through (the password masked,
   *  "" when there is none). */
  address?: string;
  display_name?: string;
  smtp_host?: string;
  smtp_port?: number;
  smtp_security?: SmtpSecurity;
  smtp_username?: string;
  smtp_password?: string;
}

/** An outbox entry's status (docs/channel-api.md); `failed` and `unknown` are dead letters. */
export type DeliveryStatus = 'pending' | 'sending' | 'sent' | 'delivered' | 'read' | 'failed' | 'unknown';

/** One outbox entry: history entry `seq` of a messenger conversation, to its customer. */
export interface Delivery {
  conversation: number;
  seq: number;
  channel: string;
  recipient: string;
  status: DeliveryStatus;
  attempts: number;
  provider_id: string | null;
  reason: string;
  queued_at: number;
  updated_at: number;
}

/** A block or allow rule (`GET /api/access`). */
export interface AccessRuleRow {
  list: 'block' | 'allow';
  channel: string | null;
  kind: 'ip' | 'visitor';
  value: string;
  note: string;
  by: string;
  since: number;
}

export interface Template {
  id: string;
  title: string;
  text: string;
  group: string | null;
  owner: string | null;
  favourite: boolean;
}

export interface ConversationDoc {
  conversation: number;
  channel: string;
  group: string;
  visitor: { id?: string | null; name: string; attributes: Record<string, string> };
  status: { state: string; operator?: string };
  created_at: number;
  last_seq: number;
  history: Entry[];
  earlier?: { conversation: number; created_at: number; state: string }[];
  /** The outbox entries (messenger conversations; empty for the web chat). */
  deliveries?: Delivery[];
}

export interface Candidate {
  operator: string;
  load: number;
  capacity: number;
  excluded: string | null;
  score: number | null;
}

export interface DecisionRecord {
  offer: number;
  conversation: number;
  group: string;
  policy: string;
  policy_version: number;
  at: number;
  candidates: Candidate[];
  chosen: string;
  /** The relaxation step the conversation was at (groups with steps). */
  step?: number;
}

/** A row of `GET /api/my/conversations`. */
export interface MyConversation {
  conversation: number;
  state: 'with_bot' | 'queued' | 'assigned' | 'closed';
  channel: string;
  group: string;
  visitor: string;
  created_at: number;
  closed_at: number | null;
  last_at: number | null;
  last_seq: number;
  rated: boolean;
  mine: boolean;
  preview: { from: 'client' | 'operator' | 'bot'; name?: string; text: string; attachments: number; at: number } | null;
}

/** One group of `GET /api/kpis`. */
export interface GroupKpis {
  group: string;
  name: string;
  entered: number;
  answered: number;
  answered_in_sla: number;
  abandoned: number;
  handled: number;
  rated: number;
  avg_wait_ms: number | null;
  service_level: number | null;
  avg_handle_ms: number | null;
  csat: number | null;
}
