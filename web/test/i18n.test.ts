import { describe, expect, it } from 'vitest';
import { detectLang, interpolate, translator, storedLang, storeLang, LANG_STORAGE_KEY, type Phrase } from '../src/shared/i18n';
import { DICTS, describeError, exclusionText, stateText } from '../src/workstation/strings';
import { WIDGET_DICTS } from '../src/widget/strings';
import { MemoryStorage } from './fakes';

describe('detectLang', () => {
  it('prefers the stored choice', () => {
    expect(detectLang('ru', ['en-US'])).toBe('ru');
    expect(detectLang('en', ['ru-RU'])).toBe('en');
  });
  it('falls back to the browser languages, then English', () => {
    expect(detectLang(null, ['ru-RU', 'en'])).toBe('ru');
    expect(detectLang(null, ['de-DE', 'en-GB'])).toBe('en');
    expect(detectLang(null, ['de-DE'])).toBe('en');
    expect(detectLang('xx', undefined)).toBe('en');
  });
  it('reads and writes the choice, tolerating broken storage', () => {
    const m = new MemoryStorage();
    storeLang(m, 'ru');
    expect(m.getItem(LANG_STORAGE_KEY)).toBe('ru');
    expect(storedLang(m)).toBe('ru');
    const broken = {
      getItem: () => {
        throw new Error('denied');
      },
      setItem: () => {
        throw new Error('denied');
      },
    };
    expect(storedLang(broken)).toBeNull();
    expect(() => storeLang(broken, 'en')).not.toThrow();
  });
});

describe('translator', () => {
  it('interpolates parameters and leaves unknown ones', () => {
    expect(interpolate('Hi {name}, {x}', { name: 'Dana' })).toBe('Hi Dana, {x}');
  });
  it('chooses Russian plural forms', () => {
    const t = translator(DICTS, 'ru');
    expect(t('unread_n', { n: 1 })).toBe('1 непрочитанное сообщение');
    expect(t('unread_n', { n: 3 })).toBe('3 непрочитанных сообщения');
    expect(t('unread_n', { n: 5 })).toBe('5 непрочитанных сообщений');
    expect(t('unread_n', { n: 21 })).toBe('21 непрочитанное сообщение');
  });
  it('chooses English plural forms', () => {
    const t = translator(DICTS, 'en');
    expect(t('seconds_left', { n: 1 })).toBe('1 second left');
    expect(t('seconds_left', { n: 2 })).toBe('2 seconds left');
  });
  it('falls back to English, then to the key', () => {
    const dicts = { en: { a: 'A', b: 'B' }, ru: { a: 'А' } } as any;
    const t = translator(dicts, 'ru');
    expect(t('a')).toBe('А');
    expect(t('b')).toBe('B');
    expect(t('zzz' as any)).toBe('zzz');
  });
  it('translates error codes and router exclusions', () => {
    const t = translator(DICTS, 'en');
    expect(describeError(t, 'offer_gone', 'x')).toBe('The offer is no longer available.');
    expect(describeError(t, 'weird_code', 'server text')).toBe('server text');
    expect(exclusionText(t, 'at_capacity')).toBe('at capacity');
    expect(exclusionText(translator(DICTS, 'ru'), 'on_break')).toBe('на перерыве');
    expect(exclusionText(t, 'something new')).toBe('something new');
  });
  it('names conversation states, a bot\'s included, and shows an unknown one as it came', () => {
    const t = translator(DICTS, 'en');
    expect(stateText(t, 'with_bot')).toBe('With the bot');
    expect(stateText(translator(DICTS, 'ru'), 'with_bot')).toBe('У бота');
    expect(stateText(t, 'queued')).toBe('Queued');
    expect(stateText(t, 'parked')).toBe('parked');
    expect(stateText(t, 'constructor')).toBe('constructor');
  });
  it('matches exclusions by their stable code, not by words in them', () => {
    const t = translator(DICTS, 'en');
    const codes = { offline: 'offline', away: 'away', on_break: 'on a break', passed: 'already passed on this conversation', at_capacity: 'at capacity' };
    for (const [code, text] of Object.entries(codes)) expect(exclusionText(t, code)).toBe(text);
    // Not codes: shown as they came, never guessed from a word inside.
    expect(exclusionText(t, 'went offline briefly')).toBe('went offline briefly');
    expect(exclusionText(t, 'capacity')).toBe('capacity');
    expect(exclusionText(t, 'toString')).toBe('toString');
  });
});

function placeholders(p: Phrase): string[] {
  const texts = typeof p === 'string' ? [p] : Object.values(p);
  return [...new Set(texts.flatMap((s) => [...(s ?? '').matchAll(/\{(\w+)\}/g)].map((m) => m[1])))].sort();
}

describe.each([
  ['workstation', DICTS],
  ['widget', WIDGET_DICTS],
])('%s dictionaries', (_name, dicts: any) => {
  it('have the same keys in every language', () => {
    expect(Object.keys(dicts.ru).sort()).toEqual(Object.keys(dicts.en).sort());
  });
  it('use the same parameters in every language', () => {
    for (const k of Object.keys(dicts.en)) expect([k, placeholders(dicts.ru[k])]).toEqual([k, placeholders(dicts.en[k])]);
  });
  it('have no empty strings', () => {
    for (const lang of ['en', 'ru']) for (const [k, v] of Object.entries(dicts[lang])) expect([lang, k, !!v]).toEqual([lang, k, true]);
  });
  it('give Russian plurals all three forms', () => {
    for (const [k, v] of Object.entries(dicts.ru)) if (typeof v !== 'string') expect([k, !!(v as any).one && !!(v as any).few && !!(v as any).many]).toEqual([k, true]);
  });
});
