/** Parsing and validation for the desk's forms (pure, unit-tested). */
import { SMTP_SECURITIES, type AdapterKind } from './types';
export const MAX_TAGS = 10;
export const MAX_TAG_LENGTH = 40;
export const MAX_TEXT = 4000;

/** "billing, Refund #vip" → ["billing", "refund", "vip"]; duplicates dropped. */
export function parseTags(input: string): string[] {
  const out: string[] = [];
  for (const raw of input.split(/[,;\s]+/)) {
    const tag = raw.replace(/^#+/, '').trim().toLowerCase();
    if (tag && !out.includes(tag)) out.push(tag);
  }
  return out;
}

export function tagsProblem(tags: string[]): 'too_many_tags' | 'tag_too_long' | null {
  if (tags.length > MAX_TAGS) return 'too_many_tags';
  if (tags.some((t) => [...t].length > MAX_TAG_LENGTH)) return 'tag_too_long';
  return null;
}

/** The providers that take less text than MAX_TEXT, by adapter kind, in characters
 *  (docs/channel-api.md: Messenger 2000; the others take at least 4000). */
export const PROVIDER_TEXT_LIMITS: Partial<Record<AdapterKind, number>> = { messenger: 2000 };

/** The counter shows from this many characters before a provider's own limit. */
export const COUNTER_MARGIN = 200;

/** The adapters whose customers are sent files too (email: as attachments; Telegram,
 *  WhatsApp, Messenger and VK from routing rules 8); Viber and the Channel API get text
 *  only for now. */
export const FILES_CARRIED: readonly AdapterKind[] = ['email', 'telegram', 'whatsapp', 'messenger', 'vk'];

/** The providers whose message with a file carries no text (Messenger's Send API takes
 *  an attachment or a text, not both). */
export const NO_TEXT_WITH_FILES: readonly AdapterKind[] = ['messenger'];

/** The providers that send fewer files in one message than the core takes
 *  (MAX_ATTACHMENTS_PER_MESSAGE): WhatsApp, one. */
export const PROVIDER_FILE_LIMITS: Partial<Record<AdapterKind, number>> = { whatsapp: 1, messenger: 1 };

/** The providers that send the text of a message with files as their caption, and
 *  the longest caption they take, in characters. */
export const PROVIDER_CAPTION_LIMITS: Partial<Record<AdapterKind, number>> = { telegram: 1024, whatsapp: 1024 };

/** What a conversation's customer can be sent, by its channel's adapter (null: the web
 *  chat): the longest text in characters, whether files (the server refuses them
 *  with `invalid` where they are not carried), and, where the provider has limits of
 *  its own on a message with files (null: none), the most files in one message and the
 *  longest text going with them as their caption. */
export function carried(adapter: AdapterKind | null | undefined): { maxText: number; files: boolean; maxFiles: number | null; maxCaption: number | null } {
  return {
    maxText: (adapter && PROVIDER_TEXT_LIMITS[adapter]) || MAX_TEXT,
    files: adapter == null || FILES_CARRIED.includes(adapter),
    maxFiles: (adapter && PROVIDER_FILE_LIMITS[adapter]) || null,
    maxCaption: (adapter && PROVIDER_CAPTION_LIMITS[adapter]) || null,
  };
}

/** Characters as the server counts them (code points, not UTF-16 units), of the text
 *  as it is sent (trimmed). */
export function textLength(text: string): number {
  return [...text.trim()].length;
}

export type MessageProblem = 'empty' | 'too_long' | 'files_not_carried' | 'too_many_files' | 'text_with_file' | 'caption_too_long';

/** Text that may be sent through `adapter` (null: the web chat): not blank (unless
 *  there are attachments), files only where they are carried and no more in one message
 *  than the provider sends, at most what its provider takes (with files, as their
 *  caption). Checked in the server's order: the first to fix is named. */
export function messageProblem(text: string, attachments: number, adapter: AdapterKind | null = null): MessageProblem | null {
  if (!text.trim() && !attachments) return 'empty';
  const can = carried(adapter);
  if (attachments && !can.files) return 'files_not_carried';
  if (attachments && can.maxFiles != null && attachments > can.maxFiles) return 'too_many_files';
  if (attachments && adapter && NO_TEXT_WITH_FILES.includes(adapter) && text.trim()) return 'text_with_file';
  if (attachments && can.maxCaption != null && textLength(text) > can.maxCaption) return 'caption_too_long';
  if (textLength(text) > can.maxText) return 'too_long';
  return null;
}

/** The longest text a message through `adapter` may have: with files, where the
 *  provider sends it as their caption, the caption's limit. */
export function textLimit(adapter: AdapterKind | null, attachments = 0): number {
  const can = carried(adapter);
  return attachments && can.maxCaption != null ? Math.min(can.maxCaption, can.maxText) : can.maxText;
}

/** The composer's character count, shown only within COUNTER_MARGIN of a provider's own
 *  limit, with files the caption's (null otherwise: the web chat, and providers taking
 *  MAX_TEXT unless files going with a caption limit are attached). */
export function textCounter(text: string, adapter: AdapterKind | null, attachments = 0): { length: number; limit: number; over: boolean } | null {
  const limit = textLimit(adapter, attachments);
  const length = textLength(text);
  if (limit >= MAX_TEXT || length < limit - COUNTER_MARGIN) return null;
  return { length, limit, over: length > limit };
}

/** The longest recipient `POST /api/channels/{id}/test` takes, in UTF-8 bytes. */
export const MAX_RECIPIENT_BYTES = 200;

/** A test message through a channel's adapter: a recipient of 1-200 bytes (through
 *  email, an email address) and a text the provider takes. */
export function testMessageProblem(recipient: string, text: string, adapter: AdapterKind): 'recipient_invalid' | 'recipient_not_email' | MessageProblem | null {
  const bytes = new TextEncoder().encode(recipient.trim()).length;
  if (bytes < 1 || bytes > MAX_RECIPIENT_BYTES) return 'recipient_invalid';
  if (adapter === 'email' && !isEmailAddress(recipient.trim())) return 'recipient_not_email';
  return messageProblem(text, 0, adapter);
}

/** An email address as the server takes one (a channel's mailbox, a customer's):
 *  `local@domain`, ASCII, at most 254 characters, the local part at most 64 without
 *  spaces or specials, the domain of letters, digits, dots and hyphens with a dot inside. */
export function isEmailAddress(address: string): boolean {
  const at = address.lastIndexOf('@');
  if (at < 0 || address.length > 254) return false;
  const local = address.slice(0, at);
  const domain = address.slice(at + 1);
  return (
    /^[\x21-\x7e]{1,64}$/.test(local) &&
    !/[<>"@(),;:\\[\]]/.test(local) &&
    /^[A-Za-z0-9.-]+$/.test(domain) &&
    domain.includes('.') &&
    !domain.startsWith('.') &&
    !domain.endsWith('.')
  );
}

/** Ids for skill groups, operators, channels and logins: letters, digits, '.', '_' and '-'. */
export function idProblem(id: string): 'id_required' | 'id_invalid' | null {
  if (!id.trim()) return 'id_required';
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(id)) return 'id_invalid';
  return null;
}

export function capacityProblem(n: number): 'capacity_range' | null {
  return Number.isInteger(n) && n >= 1 && n <= 100 ? null : 'capacity_range';
}

export function passwordProblem(p: string): 'password_short' | null {
  return [...p].length >= 10 ? null : 'password_short';
}

/** `billing=4, ru=3` as a map (entries without a number are left out). */
export function parsePairs(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const part of text.split(',')) {
    const [k, v] = part.split('=').map((x) => x.trim());
    if (k && v !== undefined && v !== '' && Number.isFinite(Number(v))) out[k] = Number(v);
  }
  return out;
}

/** Like parsePairs, but null when any non-empty part is not `key=whole number` in
 *  [min, max]: for settings where a silently dropped entry would mislead. */
export function parsePairsStrict(text: string, min: number, max: number): Record<string, number> | null {
  const parts = text
    .split(',')
    .map((x) => x.trim())
    .filter(Boolean);
  const out: Record<string, number> = {};
  for (const part of parts) {
    const m = /^([^=\s][^=]*?)\s*=\s*(\d+)$/.exec(part);
    if (!m) return null;
    const n = Number(m[2]);
    if (!Number.isInteger(n) || n < min || n > max) return null;
    out[m[1]] = n;
  }
  return out;
}

export function showPairs(map: Record<string, number> | undefined | null): string {
  return Object.entries(map ?? {})
    .map(([k, n]) => k + '=' + n)
    .join(', ');
}

/** An adapter being connected, as typed (`PUT /api/channels/{id}/adapter`): every
 *  kind's settings, of which the kind chosen uses some. */
export interface AdapterDraft {
  kind: AdapterKind;
  /** Telegram: the bot token and the webhook secret (VK: the callback secret key). */
  bot_token: string;
  secret: string;
  /** WhatsApp Cloud API and Messenger: Meta's app secret (webhook signatures) and the
   *  verify token (the subscription check); WhatsApp and VK: the access token. */
  access_token: string;
  app_secret: string;
  verify_token: string;
  /** WhatsApp: the sending phone number's id. */
  phone_number_id: string;
  /** Messenger: the page access token. */
  page_token: string;
  /** Viber: the bot's auth token (it also signs the callbacks) and the name replies are
   *  sent under. */
  auth_token: string;
  sender_name: string;
  /** VK: the Callback API's confirmation string and the community's id. */
  confirmation: string;
  group_id: string;
  /** Email: the support mailbox and the From name of replies; the SMTP relay they go
   *  out through (the port empty: 587; `smtp_security` one of SMTP_SECURITIES), signed
   *  in to when a user name is given. */
  address: string;
  display_name: string;
  smtp_host: string;
  smtp_port: string;
  smtp_security: string;
  smtp_username: string;
  smtp_password: string;
  /** The provider's API address; empty: the server's default. */
  api_base: string;
  outbound_url: string;
}

export function blankAdapter(kind: AdapterKind): AdapterDraft {
  return {
    kind,
    bot_token: '',
    secret: '',
    access_token: '',
    app_secret: '',
    verify_token: '',
    phone_number_id: '',
    page_token: '',
    auth_token: '',
    sender_name: '',
    confirmation: '',
    group_id: '',
    address: '',
    display_name: '',
    smtp_host: '',
    smtp_port: '',
    smtp_security: 'starttls',
    smtp_username: '',
    smtp_password: '',
    api_base: '',
    outbound_url: '',
  };
}

/** What Telegram takes as a webhook's secret_token (and the server as `secret`). */
export const WEBHOOK_SECRET = /^[A-Za-z0-9_-]{16,256}$/;

/** What the server takes as a messenger's secret (a token, an app secret, a verify
 *  token): 1-256 printable ASCII characters, no spaces. */
export const PRINTABLE_SECRET = /^[\x21-\x7e]{1,256}$/;

/** A WhatsApp phone number id (not the number itself): 1-32 digits. */
export const PHONE_NUMBER_ID = /^[0-9]{1,32}$/;

/** A VK Callback API confirmation string: 1-64 letters and digits. */
export const VK_CONFIRMATION = /^[A-Za-z0-9]{1,64}$/;

/** A VK community id: 1-20 digits. */
export const VK_GROUP_ID = /^[0-9]{1,20}$/;

/** Viber's limit on the name replies are sent under, in characters. */
export const MAX_SENDER_NAME = 28;

/** The longest From name of an email channel's replies, in characters. */
export const MAX_DISPLAY_NAME = 64;

/** An SMTP relay's host: a name or an IP address (v6 too), at most 253 characters. */
export const SMTP_HOST = /^[A-Za-z0-9.:-]{1,253}$/;

export type AdapterProblem =
  | 'bot_token_required'
  | 'secret_invalid'
  | 'url_invalid'
  | 'access_token_invalid'
  | 'app_secret_invalid'
  | 'verify_token_invalid'
  | 'phone_number_id_invalid'
  | 'page_token_invalid'
  | 'auth_token_invalid'
  | 'sender_name_invalid'
  | 'vk_secret_invalid'
  | 'confirmation_invalid'
  | 'group_id_invalid'
  | 'address_invalid'
  | 'display_name_invalid'
  | 'smtp_host_invalid'
  | 'smtp_port_invalid'
  | 'smtp_security_invalid'
  | 'smtp_username_invalid'
  | 'smtp_password_invalid';

/** A messenger adapter's setting in the PUT's body: the draft's field, whether it is
 *  trimmed first, what it must be, and the problem named when it is not. */
interface AdapterRule {
  field: Exclude<keyof AdapterDraft, 'kind' | 'api_base' | 'outbound_url'>;
  trim: boolean;
  ok: (value: string) => boolean;
  problem: AdapterProblem;
}

const secretRule = (field: AdapterRule['field'], problem: AdapterProblem): AdapterRule => ({ field, trim: true, ok: (v) => PRINTABLE_SECRET.test(v), problem });
const patternRule = (field: AdapterRule['field'], pattern: RegExp, problem: AdapterProblem): AdapterRule => ({ field, trim: true, ok: (v) => pattern.test(v), problem });

/** What each messenger adapter is set with (besides its optional API address), checked
 *  in this order: the first to fix is named. */
const ADAPTER_RULES: Record<Exclude<AdapterKind, 'api' | 'email'>, AdapterRule[]> = {
  telegram: [
    // The server checks the token's characters; its reason is shown then.
    { field: 'bot_token', trim: true, ok: (v) => v !== '', problem: 'bot_token_required' },
    { field: 'secret', trim: false, ok: (v) => WEBHOOK_SECRET.test(v), problem: 'secret_invalid' },
  ],
  whatsapp: [
    secretRule('access_token', 'access_token_invalid'),
    secretRule('app_secret', 'app_secret_invalid'),
    secretRule('verify_token', 'verify_token_invalid'),
    patternRule('phone_number_id', PHONE_NUMBER_ID, 'phone_number_id_invalid'),
  ],
  messenger: [secretRule('page_token', 'page_token_invalid'), secretRule('app_secret', 'app_secret_invalid'), secretRule('verify_token', 'verify_token_invalid')],
  viber: [
    secretRule('auth_token', 'auth_token_invalid'),
    // Characters (code points), as the server counts them, not UTF-16 units.
    { field: 'sender_name', trim: true, ok: (v) => v !== '' && [...v].length <= MAX_SENDER_NAME, problem: 'sender_name_invalid' },
  ],
  vk: [
    secretRule('access_token', 'access_token_invalid'),
    secretRule('secret', 'vk_secret_invalid'),
    patternRule('confirmation', VK_CONFIRMATION, 'confirmation_invalid'),
    patternRule('group_id', VK_GROUP_ID, 'group_id_invalid'),
  ],
};

/** An http(s) address the server takes: at most 500 characters, no whitespace. */
export function urlProblem(url: string): 'url_invalid' | null {
  return /^https?:\/\/\S+$/.test(url) && url.length <= 500 ? null : 'url_invalid';
}

/** The body of the adapter's PUT, or what to fix first. The server checks again (and
 *  more: the bot token's characters); its reason is shown then. */
export function adapterBody(d: AdapterDraft): { body: Record<string, string | number> } | { problem: AdapterProblem } {
  if (d.kind === 'api') {
    const url = d.outbound_url.trim();
    const p = urlProblem(url);
    return p ? { problem: p } : { body: { kind: 'api', outbound_url: url } };
  }
  if (d.kind === 'email') return emailBody(d);
  const body: Record<string, string> = { kind: d.kind };
  for (const rule of ADAPTER_RULES[d.kind]) {
    const value = rule.trim ? d[rule.field].trim() : d[rule.field];
    if (!rule.ok(value)) return { problem: rule.problem };
    body[rule.field] = value;
  }
  // The provider's API address, when not the default.
  const base = d.api_base.trim();
  if (base) {
    const p = urlProblem(base);
    if (p) return { problem: p };
    body.api_base = base;
  }
  return { body };
}

/** An email adapter's body, checked in the form's order. The optional settings go only
 *  when given (the server's defaults otherwise: no From name, port 587). A user name
 *  signs in to the relay and needs its password, typed again like every secret shown
 *  masked: the PUT replaces the whole adapter. A password without a user name is
 *  refused rather than dropped unsaid. */
function emailBody(d: AdapterDraft): { body: Record<string, string | number> } | { problem: AdapterProblem } {
  const address = d.address.trim();
  if (!isEmailAddress(address)) return { problem: 'address_invalid' };
  // Characters (code points), as the server counts them; no control characters.
  const displayName = d.display_name.trim();
  if ([...displayName].length > MAX_DISPLAY_NAME || /\p{Cc}/u.test(displayName)) return { problem: 'display_name_invalid' };
  const host = d.smtp_host.trim();
  if (!SMTP_HOST.test(host)) return { problem: 'smtp_host_invalid' };
  const port = d.smtp_port.trim();
  if (port && !(/^[0-9]{1,5}$/.test(port) && Number(port) >= 1 && Number(port) <= 65535)) return { problem: 'smtp_port_invalid' };
  if (!(SMTP_SECURITIES as readonly string[]).includes(d.smtp_security)) return { problem: 'smtp_security_invalid' };
  const username = d.smtp_username.trim();
  const password = d.smtp_password.trim();
  if ((username || password) && !PRINTABLE_SECRET.test(username)) return { problem: 'smtp_username_invalid' };
  if (username && !PRINTABLE_SECRET.test(password)) return { problem: 'smtp_password_invalid' };
  const body: Record<string, string | number> = { kind: 'email', address };
  if (displayName) body.display_name = displayName;
  body.smtp_host = host;
  if (port) body.smtp_port = Number(port);
  body.smtp_security = d.smtp_security;
  if (username) Object.assign(body, { smtp_username: username, smtp_password: password });
  return { body };
}
