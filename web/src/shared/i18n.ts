/**
 * Dictionary-based translations. Every UI string goes through a dictionary; a string may
 * have `{name}` parameters, and plural entries are objects with CLDR categories
 * (`one`, `few`, `many`, `other`) chosen by Intl.PluralRules.
 */
export type Lang = 'en' | 'ru';
export const LANGS: readonly Lang[] = ['en', 'ru'];
export const LANG_STORAGE_KEY = 'switchboard.lang';

export type PluralForms = { one: string; few?: string; many?: string; other: string };
export type Phrase = string | PluralForms;
export type Dictionary = Record<string, Phrase>;

/** Stored choice first, then the browser's languages, then English. */
export function detectLang(stored: string | null | undefined, languages: readonly string[] | undefined): Lang {
  if (stored === 'en' || stored === 'ru') return stored;
  for (const l of languages ?? []) {
    const base = l.toLowerCase().split(/[-_]/)[0];
    if (base === 'ru') return 'ru';
    if (base === 'en') return 'en';
  }
  return 'en';
}

export function interpolate(text: string, params?: Record<string, string | number>): string {
  if (!params) return text;
  return text.replace(/\{(\w+)\}/g, (m, k: string) => (k in params ? String(params[k]) : m));
}

const pluralRules = new Map<string, Intl.PluralRules>();

export function pluralCategory(lang: Lang, n: number): string {
  let r = pluralRules.get(lang);
  if (!r) {
    r = new Intl.PluralRules(lang);
    pluralRules.set(lang, r);
  }
  return r.select(n);
}

export type Translate<K extends string> = (key: K, params?: Record<string, string | number>) => string;

/**
 * Builds the lookup for one language. Missing keys fall back to English and then to the
 * key itself, so a gap in a translation never blanks the UI.
 */
export function translator<K extends string>(dicts: Record<Lang, Record<K, Phrase>>, lang: Lang): Translate<K> {
  const dict = dicts[lang] ?? dicts.en;
  return (key, params) => {
    const phrase = dict[key] ?? dicts.en[key];
    if (phrase == null) return key;
    if (typeof phrase === 'string') return interpolate(phrase, params);
    const n = Number(params?.n ?? 0);
    const cat = pluralCategory(lang, n) as keyof PluralForms;
    return interpolate(phrase[cat] ?? phrase.other, params);
  };
}

/** Reads the stored language (tolerating storage that throws, e.g. in sandboxed frames). */
export function storedLang(storage: Pick<Storage, 'getItem'> | undefined): string | null {
  try {
    return storage?.getItem(LANG_STORAGE_KEY) ?? null;
  } catch {
    return null;
  }
}

export function storeLang(storage: Pick<Storage, 'setItem'> | undefined, lang: Lang): void {
  try {
    storage?.setItem(LANG_STORAGE_KEY, lang);
  } catch {
    /* storage unavailable: the choice lasts for this page only */
  }
}
