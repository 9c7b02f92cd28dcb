/** Parsing and validation for the desk's forms (pure, unit-tested). */
import type { AdapterKind } from './types';
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

/** Text that may be sent: not blank (unless there are attachments), at most 4000 characters. */
export function messageProblem(text: string, attachments: number): 'empty' | 'too_long' | null {
  if (!text.trim() && !attachments) return 'empty';
  if ([...text].length > MAX_TEXT) return 'too_long';
  return null;
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

/** An adapter being connected, as typed (`PUT /api/channels/{id}/adapter`). */
export interface AdapterDraft {
  kind: AdapterKind;
  bot_token: string;
  secret: string;
  /** WhatsApp Cloud API: Meta's access token, the app secret (webhook signatures), the
   *  verify token (the subscription check) and the sending phone number's id. */
  access_token: string;
  app_secret: string;
  verify_token: string;
  phone_number_id: string;
  /** Telegram's Bot API or Meta's Graph API address; empty: the server's default. */
  api_base: string;
  outbound_url: string;
}

export function blankAdapter(kind: AdapterKind): AdapterDraft {
  return { kind, bot_token: '', secret: '', access_token: '', app_secret: '', verify_token: '', phone_number_id: '', api_base: '', outbound_url: '' };
}

/** What Telegram takes as a webhook's secret_token (and the server as `secret`). */
export const WEBHOOK_SECRET = /^[A-Za-z0-9_-]{16,256}$/;

/** What the server takes as a WhatsApp secret: 1-256 printable characters, no spaces. */
export const PRINTABLE_SECRET = /^[\x21-\x7e]{1,256}$/;

/** A WhatsApp phone number id (not the number itself): 1-32 digits. */
export const PHONE_NUMBER_ID = /^[0-9]{1,32}$/;

/** The WhatsApp settings that are secrets, checked in this order. */
const WHATSAPP_SECRETS = ['access_token', 'app_secret', 'verify_token'] as const;

export type AdapterProblem =
  | 'bot_token_required'
  | 'secret_invalid'
  | 'url_invalid'
  | `${(typeof WHATSAPP_SECRETS)[number]}_invalid`
  | 'phone_number_id_invalid';

/** An http(s) address the server takes: at most 500 characters, no whitespace. */
export function urlProblem(url: string): 'url_invalid' | null {
  return /^https?:\/\/\S+$/.test(url) && url.length <= 500 ? null : 'url_invalid';
}

/** The body of the adapter's PUT, or what to fix first. The server checks again (and
 *  more: the bot token's characters); its reason is shown then. */
export function adapterBody(d: AdapterDraft): { body: Record<string, string> } | { problem: AdapterProblem } {
  if (d.kind === 'api') {
    const url = d.outbound_url.trim();
    const p = urlProblem(url);
    return p ? { problem: p } : { body: { kind: 'api', outbound_url: url } };
  }
  let body: Record<string, string>;
  if (d.kind === 'whatsapp') {
    body = { kind: 'whatsapp' };
    for (const field of WHATSAPP_SECRETS) {
      const value = d[field].trim();
      if (!PRINTABLE_SECRET.test(value)) return { problem: `${field}_invalid` };
      body[field] = value;
    }
    const phone_number_id = d.phone_number_id.trim();
    if (!PHONE_NUMBER_ID.test(phone_number_id)) return { problem: 'phone_number_id_invalid' };
    body.phone_number_id = phone_number_id;
  } else {
    const bot_token = d.bot_token.trim();
    if (!bot_token) return { problem: 'bot_token_required' };
    if (!WEBHOOK_SECRET.test(d.secret)) return { problem: 'secret_invalid' };
    body = { kind: 'telegram', bot_token, secret: d.secret };
  }
  // Telegram and WhatsApp: the provider's API address, when not the default.
  const base = d.api_base.trim();
  if (base) {
    const p = urlProblem(base);
    if (p) return { problem: p };
    body.api_base = base;
  }
  return { body };
}
