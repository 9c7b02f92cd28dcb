/** Reply templates: search, ordering and placeholder filling (all client-side). */
import type { Template } from './types';

export interface PlaceholderValues {
  clientName?: string;
  operatorName?: string;
  conversationId?: number | string;
}

/** Normalizes for matching: lower case, ё→е, no diacritics, single spaces. */
export function normalize(s: string): string {
  return s
    .toLowerCase()
    .replace(/ё/g, 'е')
    .normalize('NFD')
    .replace(/[\u0300-\u036f]/g, '')
    .replace(/\s+/g, ' ')
    .trim();
}

/**
 * Templates matching every word of the query (in title or text), ranked: favourites
 * first, then title matches before text-only matches, then by title.
 */
export function searchTemplates(templates: readonly Template[], query: string, onlyFavourites = false): Template[] {
  const words = normalize(query).split(' ').filter(Boolean);
  const scored: { t: Template; score: number; title: string }[] = [];
  for (const t of templates) {
    if (onlyFavourites && !t.favourite) continue;
    const title = normalize(t.title);
    const text = normalize(t.text);
    let score = 0;
    let ok = true;
    for (const w of words) {
      if (title.includes(w)) score += title.startsWith(w) ? 3 : 2;
      else if (text.includes(w)) score += 1;
      else {
        ok = false;
        break;
      }
    }
    if (!ok) continue;
    if (t.favourite) score += 100;
    scored.push({ t, score, title });
  }
  // Code-point order: the same result whatever the runtime's locale.
  const cmp = (x: string, y: string) => (x < y ? -1 : x > y ? 1 : 0);
  scored.sort((a, b) => b.score - a.score || cmp(a.title, b.title) || cmp(a.t.id, b.t.id));
  return scored.map((x) => x.t);
}

const PLACEHOLDER = /\{\{\s*([a-z]+\.[a-z]+)\s*\}\}/gi;

/**
 * Fills {{client.name}}, {{operator.name}} and {{conversation.id}}. Unknown placeholders
 * are left as they are; a known one without a value becomes the fallback, or stays as
 * written when the fallback is null (so the composer can flag it before sending).
 */
export function fillPlaceholders(text: string, v: PlaceholderValues, fallback: string | null = ''): string {
  return text.replace(PLACEHOLDER, (m, name: string) => {
    const or = (value: string | undefined) => value || (fallback ?? m);
    switch (name.toLowerCase()) {
      case 'client.name':
        return or(v.clientName);
      case 'operator.name':
        return or(v.operatorName);
      case 'conversation.id':
        return v.conversationId != null ? String(v.conversationId) : fallback ?? m;
      default:
        return m;
    }
  });
}

/** Placeholders left in a text (to warn before sending). */
export function unfilledPlaceholders(text: string): string[] {
  return [...text.matchAll(PLACEHOLDER)].map((m) => m[0]);
}

export type TemplateScope = 'all' | 'favourites' | 'shared' | 'personal';

export function byScope(templates: readonly Template[], scope: TemplateScope): Template[] {
  switch (scope) {
    case 'favourites':
      return templates.filter((t) => t.favourite);
    case 'shared':
      return templates.filter((t) => t.group != null);
    case 'personal':
      return templates.filter((t) => t.group == null);
    default:
      return templates.slice();
  }
}

/**
 * An id for a new template: ASCII, at most 64 bytes (the server's limit), and unique
 * enough that two operators' personal templates never collide (ids are global).
 */
export function templateId(title: string, now: number, random: () => number = Math.random): string {
  const slug = normalize(title)
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-+|-+$/g, '')
    .slice(0, 40)
    .replace(/-+$/, '');
  const suffix = Math.floor(random() * 36 ** 4)
    .toString(36)
    .padStart(4, '0');
  return (slug || 'template') + '-' + now.toString(36) + suffix;
}

export const TEMPLATE_TITLE_MAX = 100;
export const TEMPLATE_TEXT_MAX = 4000;

export function validateTemplate(title: string, text: string): 'title_required' | 'title_too_long' | 'text_required' | 'text_too_long' | null {
  if (!title.trim()) return 'title_required';
  if ([...title].length > TEMPLATE_TITLE_MAX) return 'title_too_long';
  if (!text.trim()) return 'text_required';
  if ([...text].length > TEMPLATE_TEXT_MAX) return 'text_too_long';
  return null;
}
