import { describe, expect, it } from 'vitest';
import { byScope, fillPlaceholders, normalize, searchTemplates, templateId, unfilledPlaceholders, validateTemplate } from '../src/workstation/templates';
import {
  adapterBody,
  blankAdapter,
  capacityProblem,
  carried,
  idProblem,
  isEmailAddress,
  messageProblem,
  parseTags,
  passwordProblem,
  tagsProblem,
  testMessageProblem,
  textCounter,
  urlProblem,
  type AdapterDraft,
  type MessageProblem,
} from '../src/workstation/forms';
import { DICTS, messageProblemText } from '../src/workstation/strings';
import { translator } from '../src/shared/i18n';
import { floorFromRest, longestWaitNow, slaPercent, totals, floorFromFrame } from '../src/workstation/floor';
import { tabsFor } from '../src/workstation/app';
import type { Template } from '../src/workstation/types';

const tpl = (id: string, title: string, text: string, extra: Partial<Template> = {}): Template => ({ id, title, text, group: 'general', owner: null, favourite: false, ...extra });
const all = [
  tpl('greet', 'Greeting', 'Hello {{client.name}}, I am {{operator.name}}.'),
  tpl('refund', 'Refund policy', 'Refunds take 5 days.', { group: 'billing' }),
  tpl('bye', 'Goodbye', 'Thanks for contacting us! Your ticket is #{{conversation.id}}.', { favourite: true }),
  tpl('mine', 'Моё приветствие', 'Здравствуйте, {{client.name}}! Всё ещё ждёте?', { group: null, owner: 'alice' }),
];

describe('template search', () => {
  it('puts favourites first, then title matches before text matches', () => {
    expect(searchTemplates(all, '').map((t) => t.id)).toEqual(['bye', 'greet', 'refund', 'mine']);
    expect(searchTemplates(all, 'refund').map((t) => t.id)).toEqual(['refund']);
    expect(searchTemplates(all, 'thanks').map((t) => t.id)).toEqual(['bye']);
  });
  it('needs every word, in any order, case-insensitively', () => {
    expect(searchTemplates(all, 'POLICY refunds').map((t) => t.id)).toEqual(['refund']);
    expect(searchTemplates(all, 'refund hello')).toEqual([]);
  });
  it('treats ё as е and ignores diacritics', () => {
    expect(searchTemplates(all, 'всё ещё').map((t) => t.id)).toEqual(['mine']);
    expect(searchTemplates(all, 'МОЕ').map((t) => t.id)).toEqual(['mine']);
    expect(normalize('  Café  Ёлка ')).toBe('cafe елка');
  });
  it('filters by scope', () => {
    expect(byScope(all, 'favourites').map((t) => t.id)).toEqual(['bye']);
    expect(byScope(all, 'personal').map((t) => t.id)).toEqual(['mine']);
    expect(byScope(all, 'shared')).toHaveLength(3);
    expect(searchTemplates(all, '', true).map((t) => t.id)).toEqual(['bye']);
  });
});

describe('placeholders', () => {
  it('fills the three placeholders', () => {
    expect(fillPlaceholders(all[0].text, { clientName: 'Dana', operatorName: 'Alice' })).toBe('Hello Dana, I am Alice.');
    expect(fillPlaceholders(all[2].text, { conversationId: 17 })).toBe('Thanks for contacting us! Your ticket is #17.');
  });
  it('tolerates spaces and case, keeps unknown placeholders, uses the fallback for missing values', () => {
    expect(fillPlaceholders('{{ Client.Name }} {{order.id}}', { clientName: 'Dana' })).toBe('Dana {{order.id}}');
    expect(fillPlaceholders('Hi {{client.name}}!', {}, 'there')).toBe('Hi there!');
    expect(unfilledPlaceholders('a {{order.id}} b {{client.name}}')).toEqual(['{{order.id}}', '{{client.name}}']);
    // Without a value and no fallback, the placeholder stays for the composer to flag.
    expect(fillPlaceholders('Hello {{client.name}}, I am {{operator.name}}.', { operatorName: 'Alice' }, null)).toBe('Hello {{client.name}}, I am Alice.');
  });
  it('validates and names new templates', () => {
    expect(validateTemplate('', 'x')).toBe('title_required');
    expect(validateTemplate('x'.repeat(101), 'x')).toBe('title_too_long');
    expect(validateTemplate('t', ' ')).toBe('text_required');
    expect(validateTemplate('t', 'x'.repeat(4001))).toBe('text_too_long');
    expect(validateTemplate('t', 'x')).toBeNull();
    expect(templateId('Refund policy!', 36 * 36, () => 0)).toBe('refund-policy-1000000');
    expect(templateId('Возврат денег', 1, () => 0.5)).toBe('template-1i000');
    const long = templateId('x'.repeat(200), Date.now());
    expect(new TextEncoder().encode(long).length).toBeLessThanOrEqual(64);
    expect(long).toMatch(/^[a-z0-9-]+$/);
  });
});

describe('forms', () => {
  it('parses tags', () => {
    expect(parseTags('billing, Refund #vip  refund;;')).toEqual(['billing', 'refund', 'vip']);
    expect(parseTags('   ')).toEqual([]);
    expect(tagsProblem(Array.from({ length: 11 }, (_, i) => 't' + i))).toBe('too_many_tags');
    expect(tagsProblem(['x'.repeat(41)])).toBe('tag_too_long');
    expect(tagsProblem(['ok'])).toBeNull();
  });
  it('checks messages, ids, capacity and passwords', () => {
    expect(messageProblem('  ', 0)).toBe('empty');
    expect(messageProblem('  ', 1)).toBeNull();
    expect(messageProblem('x'.repeat(4001), 0)).toBe('too_long');
    expect(messageProblem('😀'.repeat(4000), 0)).toBeNull(); // characters, not UTF-16 units
    expect(idProblem('')).toBe('id_required');
    expect(idProblem('a b')).toBe('id_invalid');
    expect(idProblem('tech-2')).toBeNull();
    expect(capacityProblem(0)).toBe('capacity_range');
    expect(capacityProblem(101)).toBe('capacity_range');
    expect(capacityProblem(3)).toBeNull();
    expect(passwordProblem('short')).toBe('password_short');
    expect(passwordProblem('long enough!')).toBeNull();
  });
  it("holds a messenger conversation's messages to what its provider carries", () => {
    // The web chat: files, and 4000 characters.
    expect(carried(null)).toEqual({ maxText: 4000, files: true, maxFiles: null, maxCaption: null });
    expect(messageProblem('', 1, null)).toBeNull();
    expect(messageProblem('x'.repeat(4000), 0, null)).toBeNull();
    expect(messageProblem('x'.repeat(2000), 5, null)).toBeNull();
    // Messenger (rules 8): one file, as a message of its own without text.
    expect(carried('messenger')).toEqual({ maxText: 2000, files: true, maxFiles: 1, maxCaption: null });
    expect(messageProblem('', 1, 'messenger')).toBeNull();
    expect(messageProblem('see the file', 1, 'messenger')).toBe('text_with_file');
    expect(messageProblem('', 2, 'messenger')).toBe('too_many_files');
    expect(messageProblemText(translator(DICTS, 'en'), 'text_with_file', 'see the file', 'messenger')).toBe(
      'A Facebook Messenger message with a file carries no text: send the file alone, and the text in a message of its own.',
    );
    // VK (rules 8): files with text, up to what any message takes.
    expect(carried('vk')).toEqual({ maxText: 4000, files: true, maxFiles: null, maxCaption: null });
    expect(messageProblem('see the files', 5, 'vk')).toBeNull();
    // Viber and the Channel API: no files yet, with or without text.
    for (const kind of ['viber', 'api'] as const) {
      expect(carried(kind).files).toBe(false);
      expect(messageProblem('', 1, kind)).toBe('files_not_carried');
      expect(messageProblem('see the file', 2, kind)).toBe('files_not_carried');
      expect(messageProblem('  ', 0, kind)).toBe('empty');
    }
    // Email: files as attachments, with or without text, and 4000 characters.
    expect(carried('email')).toEqual({ maxText: 4000, files: true, maxFiles: null, maxCaption: null });
    expect(messageProblem('', 1, 'email')).toBeNull();
    expect(messageProblem('see the file', 2, 'email')).toBeNull();
    expect(messageProblem('see the files', 5, 'email')).toBeNull();
    expect(messageProblem('x'.repeat(2000), 1, 'email')).toBeNull();
    expect(messageProblem('  ', 0, 'email')).toBe('empty');
    expect(messageProblem('x'.repeat(4001), 1, 'email')).toBe('too_long');
    // Telegram: files, the text with them their caption of at most 1024 characters
    // (code points, of the trimmed text); without files 4000.
    expect(carried('telegram')).toEqual({ maxText: 4000, files: true, maxFiles: null, maxCaption: 1024 });
    expect(messageProblem('', 1, 'telegram')).toBeNull();
    expect(messageProblem('see the files', 3, 'telegram')).toBeNull();
    expect(messageProblem('x'.repeat(1024), 2, 'telegram')).toBeNull();
    expect(messageProblem(' ' + '😀'.repeat(1024) + '\n', 1, 'telegram')).toBeNull();
    expect(messageProblem('x'.repeat(1025), 1, 'telegram')).toBe('caption_too_long');
    expect(messageProblem('x'.repeat(1025), 0, 'telegram')).toBeNull();
    expect(messageProblem('  ', 0, 'telegram')).toBe('empty');
    // WhatsApp: one file per message, its caption at most 1024 characters.
    expect(carried('whatsapp')).toEqual({ maxText: 4000, files: true, maxFiles: 1, maxCaption: 1024 });
    expect(messageProblem('', 1, 'whatsapp')).toBeNull();
    expect(messageProblem('see the file', 1, 'whatsapp')).toBeNull();
    expect(messageProblem('', 2, 'whatsapp')).toBe('too_many_files');
    expect(messageProblem('see the files', 2, 'whatsapp')).toBe('too_many_files');
    expect(messageProblem('x'.repeat(1024), 1, 'whatsapp')).toBeNull();
    expect(messageProblem('x'.repeat(1025), 1, 'whatsapp')).toBe('caption_too_long');
    expect(messageProblem('x'.repeat(1025), 2, 'whatsapp')).toBe('too_many_files'); // the server's order
    expect(messageProblem('x'.repeat(4000), 0, 'whatsapp')).toBeNull();
    expect(messageProblem('x'.repeat(4001), 0, 'whatsapp')).toBe('too_long');
    // Facebook Messenger: 2000 characters (code points, of the trimmed text); the others 4000.
    expect(carried('messenger').maxText).toBe(2000);
    expect(carried('telegram').maxText).toBe(4000);
    expect(messageProblem('x'.repeat(2000), 0, 'messenger')).toBeNull();
    expect(messageProblem(' ' + 'x'.repeat(2000) + '\n', 0, 'messenger')).toBeNull();
    expect(messageProblem('😀'.repeat(2000), 0, 'messenger')).toBeNull();
    expect(messageProblem('x'.repeat(2001), 0, 'messenger')).toBe('too_long');
    expect(messageProblem('x'.repeat(2001), 0, 'telegram')).toBeNull();
    expect(messageProblem('x'.repeat(4001), 0, 'telegram')).toBe('too_long');
  });
  it('counts characters near a provider limit only', () => {
    expect(textCounter('x'.repeat(3990), null)).toBeNull();
    expect(textCounter('x'.repeat(3990), 'telegram')).toBeNull();
    expect(textCounter('x'.repeat(1799), 'messenger')).toBeNull();
    expect(textCounter('x'.repeat(1800), 'messenger')).toEqual({ length: 1800, limit: 2000, over: false });
    expect(textCounter('x'.repeat(2000), 'messenger')).toEqual({ length: 2000, limit: 2000, over: false });
    expect(textCounter('😀'.repeat(2001), 'messenger')).toEqual({ length: 2001, limit: 2000, over: true });
    // With files, the caption's limit where the provider has one.
    expect(textCounter('x'.repeat(900), 'telegram', 0)).toBeNull();
    expect(textCounter('x'.repeat(823), 'telegram', 1)).toBeNull();
    expect(textCounter('x'.repeat(900), 'telegram', 2)).toEqual({ length: 900, limit: 1024, over: false });
    expect(textCounter('x'.repeat(1025), 'whatsapp', 1)).toEqual({ length: 1025, limit: 1024, over: true });
    expect(textCounter('x'.repeat(1900), 'email', 1)).toBeNull();
    expect(textCounter('x'.repeat(1900), 'messenger', 1)).toEqual({ length: 1900, limit: 2000, over: false });
  });
  it('says why a message cannot be sent', () => {
    const en = translator(DICTS, 'en');
    expect(messageProblemText(en, 'empty', '', 'messenger')).toBeNull();
    expect(messageProblemText(en, 'files_not_carried', '', 'telegram')).toBe('Files cannot be sent to this channel yet');
    expect(messageProblemText(en, 'too_long', 'x'.repeat(2150), 'messenger')).toBe('Too long for Facebook Messenger: at most 2000 characters, this is 2150.');
    expect(messageProblemText(en, 'too_long', 'x'.repeat(4001), null)).toBe('Too long (at most 4000 characters).');
    expect(messageProblemText(translator(DICTS, 'ru'), 'too_long', 'x'.repeat(2001), 'messenger')).toBe('Слишком длинно для Facebook Messenger: не больше 2000 символов, здесь 2001.');
    expect(messageProblemText(en, 'too_many_files', '', 'whatsapp')).toBe('A WhatsApp message carries at most 1 file: send the others in messages of their own.');
    expect(messageProblemText(translator(DICTS, 'ru'), 'too_many_files', '', 'whatsapp')).toBe(
      'Сообщение в WhatsApp может содержать не больше 1 файла: остальные отправьте отдельными сообщениями.',
    );
    expect(messageProblemText(en, 'caption_too_long', ' ' + 'x'.repeat(1100), 'telegram')).toBe(
      'Too long to go with files to Telegram: the text becomes their caption, at most 1024 characters, this is 1100. Send the text in a message of its own.',
    );
    expect(messageProblemText(translator(DICTS, 'ru'), 'caption_too_long', 'x'.repeat(1025), 'whatsapp')).toBe(
      'Слишком длинно для отправки с файлами в WhatsApp: текст становится подписью к ним, не больше 1024 символов, здесь 1025. Отправьте текст отдельным сообщением.',
    );
  });
  it('says every message problem in English and Russian', () => {
    // Each problem a message may have, through each adapter and the web chat.
    const problems = new Set<MessageProblem>();
    for (const kind of [null, 'telegram', 'whatsapp', 'messenger', 'viber', 'vk', 'api', 'email'] as const)
      for (const text of ['', 'x'.repeat(1025), 'x'.repeat(2001), 'x'.repeat(4001)])
        for (const files of [0, 1, 2]) {
          const p = messageProblem(text, files, kind);
          if (!p) continue;
          problems.add(p);
          if (p === 'empty') continue;
          for (const lang of ['en', 'ru'] as const) {
            const said = messageProblemText(translator(DICTS, lang), p, text, kind);
            expect(said, lang + ' ' + p + ' ' + kind).toMatch(/\S/);
            expect(said, lang + ' ' + p + ' ' + kind).not.toMatch(/[{}]|^err_/);
          }
        }
    expect(problems.size).toBe(6);
  });
  it('checks a test message', () => {
    expect(testMessageProblem('', 'Hello', 'api')).toBe('recipient_invalid');
    expect(testMessageProblem('   ', 'Hello', 'api')).toBe('recipient_invalid');
    expect(testMessageProblem('я'.repeat(101), 'Hello', 'api')).toBe('recipient_invalid'); // 202 bytes
    expect(testMessageProblem('я'.repeat(100), 'Hello', 'api')).toBeNull();
    expect(testMessageProblem('4242', ' ', 'telegram')).toBe('empty');
    expect(testMessageProblem('4242', 'x'.repeat(4001), 'telegram')).toBe('too_long');
    expect(testMessageProblem('4242', 'x'.repeat(2001), 'messenger')).toBe('too_long');
    expect(testMessageProblem('4242', 'x'.repeat(2001), 'viber')).toBeNull();
    // Through email, to an email address only.
    expect(testMessageProblem('4242', 'Hello', 'email')).toBe('recipient_not_email');
    expect(testMessageProblem(' dana@example.com ', 'Hello', 'email')).toBeNull();
    expect(testMessageProblem('dana@example.com', ' ', 'email')).toBe('empty');
    expect(testMessageProblem('', 'Hello', 'email')).toBe('recipient_invalid');
    expect(testMessageProblem('dana@example.com', 'Hello', 'telegram')).toBeNull();
  });
  it('tells an email address as the server does', () => {
    for (const good of ['dana@example.com', 'Dana.Lee+help@mail.example.co.uk', "o'neil_1@ex-ample.org", 'x'.repeat(64) + '@example.com', 'a@b.c'])
      expect(isEmailAddress(good), good).toBe(true);
    for (const bad of [
      '',
      'dana',
      'dana@',
      '@example.com',
      'dana@example',
      'dana@.example.com',
      'dana@example.com.',
      'dana lee@example.com',
      'dana@exa mple.com',
      'dana@exam_ple.com',
      'a@b@example.com',
      '<dana@example.com>',
      'dana;x@example.com',
      'дана@example.com',
      'dana@пример.рф',
      'x'.repeat(65) + '@example.com',
      'a@' + 'b'.repeat(250) + '.com',
    ])
      expect(isEmailAddress(bad), bad).toBe(false);
  });
  it('shows sections by role', () => {
    expect(tabsFor('operator', 'alice')).toEqual(['desk']);
    expect(tabsFor('supervisor', null)).toEqual(['floor', 'templates']);
    expect(tabsFor('admin', null)).toEqual(['floor', 'templates', 'admin']);
    expect(tabsFor('supervisor', 'carol')).toEqual(['desk', 'floor', 'templates']);
  });
});

/** A secret of `field` in `draft` must be 1-256 printable ASCII characters without
 *  spaces (trimmed), `problem` named otherwise. */
function expectPrintableSecret(draft: AdapterDraft, field: keyof AdapterDraft, problem: string) {
  const with_ = (value: string) => adapterBody({ ...draft, [field]: value });
  for (const bad of ['', '   ', 'two words', 'tab\there', 'токен', 'x'.repeat(257)]) expect(with_(bad), `${field} = ${JSON.stringify(bad)}`).toEqual({ problem });
  for (const good of ['x', 'x'.repeat(256), '!#$%&()*+,-./:;<=>?@[]^_`{|}~"\'\\']) expect(with_(good), `${field} = ${JSON.stringify(good)}`).toHaveProperty(['body', field], good);
  expect(with_('  padded  ')).toHaveProperty(['body', field], 'padded');
}

describe('adapter form', () => {
  const telegram = { ...blankAdapter('telegram'), bot_token: ' 123:ABC ', secret: 'A-secret_of_16ch' };
  it('builds a Telegram body, the API address only when given', () => {
    expect(adapterBody(telegram)).toEqual({ body: { kind: 'telegram', bot_token: '123:ABC', secret: 'A-secret_of_16ch' } });
    expect(adapterBody({ ...telegram, api_base: ' http://127.0.0.1:9/bot ' })).toEqual({
      body: { kind: 'telegram', bot_token: '123:ABC', secret: 'A-secret_of_16ch', api_base: 'http://127.0.0.1:9/bot' },
    });
  });
  it('checks the bot token, the webhook secret and addresses', () => {
    expect(adapterBody({ ...telegram, bot_token: '  ' })).toEqual({ problem: 'bot_token_required' });
    expect(adapterBody({ ...telegram, secret: 'short-secret' })).toEqual({ problem: 'secret_invalid' });
    expect(adapterBody({ ...telegram, secret: 'sixteen chars ok' })).toEqual({ problem: 'secret_invalid' });
    expect(adapterBody({ ...telegram, secret: 'x'.repeat(257) })).toEqual({ problem: 'secret_invalid' });
    expect(adapterBody({ ...telegram, secret: 'x'.repeat(256) })).toHaveProperty('body');
    expect(adapterBody({ ...telegram, api_base: 'api.telegram.org' })).toEqual({ problem: 'url_invalid' });
    expect(urlProblem('https://adapter.example/outbound')).toBeNull();
    expect(urlProblem('https://adapter.example/out bound')).toBe('url_invalid');
    expect(urlProblem('ftp://adapter.example/')).toBe('url_invalid');
    expect(urlProblem('https://a.example/' + 'x'.repeat(482))).toBeNull();
    expect(urlProblem('https://a.example/' + 'x'.repeat(483))).toBe('url_invalid');
  });
  it('builds a Channel API body from the outbound URL alone', () => {
    const api = { ...blankAdapter('api'), bot_token: 'left over', outbound_url: ' https://adapter.example/outbound ' };
    expect(adapterBody(api)).toEqual({ body: { kind: 'api', outbound_url: 'https://adapter.example/outbound' } });
    expect(adapterBody({ ...api, outbound_url: '' })).toEqual({ problem: 'url_invalid' });
  });
  const whatsapp = {
    ...blankAdapter('whatsapp'),
    bot_token: 'left over',
    access_token: ' EAAG-test-token ',
    app_secret: 'app-secret-123',
    verify_token: 'verify-123',
    phone_number_id: ' 1098765432 ',
  };
  const whatsappBody = { kind: 'whatsapp', access_token: 'EAAG-test-token', app_secret: 'app-secret-123', verify_token: 'verify-123', phone_number_id: '1098765432' };
  it('builds a WhatsApp body, the Graph API address only when given', () => {
    expect(adapterBody(whatsapp)).toEqual({ body: whatsappBody });
    expect(adapterBody({ ...whatsapp, api_base: ' http://127.0.0.1:9/graph ' })).toEqual({ body: { ...whatsappBody, api_base: 'http://127.0.0.1:9/graph' } });
    expect(adapterBody({ ...whatsapp, api_base: 'graph.facebook.com' })).toEqual({ problem: 'url_invalid' });
  });
  it('checks the WhatsApp secrets: 1-256 printable characters without spaces', () => {
    for (const field of ['access_token', 'app_secret', 'verify_token'] as const) expectPrintableSecret(whatsapp, field, field + '_invalid');
    // The first to fix is named first.
    expect(adapterBody({ ...whatsapp, access_token: '', verify_token: '' })).toEqual({ problem: 'access_token_invalid' });
  });
  it('checks the WhatsApp phone number id: 1-32 digits', () => {
    const problem = { problem: 'phone_number_id_invalid' };
    expect(adapterBody({ ...whatsapp, phone_number_id: '' })).toEqual(problem);
    expect(adapterBody({ ...whatsapp, phone_number_id: '+15550001234' })).toEqual(problem);
    expect(adapterBody({ ...whatsapp, phone_number_id: '1098 765432' })).toEqual(problem);
    expect(adapterBody({ ...whatsapp, phone_number_id: '12a' })).toEqual(problem);
    expect(adapterBody({ ...whatsapp, phone_number_id: '١٢٣' })).toEqual(problem);
    expect(adapterBody({ ...whatsapp, phone_number_id: '1'.repeat(33) })).toEqual(problem);
    expect(adapterBody({ ...whatsapp, phone_number_id: '1'.repeat(32) })).toHaveProperty('body');
    expect(adapterBody({ ...whatsapp, phone_number_id: '7' })).toHaveProperty('body');
  });

  const messenger = { ...blankAdapter('messenger'), phone_number_id: '123', page_token: ' EAAB-page-token ', app_secret: 'app-secret-456', verify_token: 'verify-456' };
  const messengerBody = { kind: 'messenger', page_token: 'EAAB-page-token', app_secret: 'app-secret-456', verify_token: 'verify-456' };
  it('builds a Messenger body from its three secrets, the Graph API address only when given', () => {
    expect(adapterBody(messenger)).toEqual({ body: messengerBody });
    expect(adapterBody({ ...messenger, api_base: ' http://127.0.0.1:9/graph ' })).toEqual({ body: { ...messengerBody, api_base: 'http://127.0.0.1:9/graph' } });
    expect(adapterBody({ ...messenger, api_base: 'graph.facebook.com' })).toEqual({ problem: 'url_invalid' });
  });
  it('checks the Messenger secrets, the first to fix first', () => {
    for (const field of ['page_token', 'app_secret', 'verify_token'] as const) expectPrintableSecret(messenger, field, field + '_invalid');
    expect(adapterBody({ ...messenger, page_token: '', app_secret: '' })).toEqual({ problem: 'page_token_invalid' });
    expect(adapterBody({ ...messenger, app_secret: 'a b', verify_token: '' })).toEqual({ problem: 'app_secret_invalid' });
  });

  const viber = { ...blankAdapter('viber'), bot_token: 'left over', auth_token: ' 4453b6ac-viber ', sender_name: '  Acme Support ' };
  const viberBody = { kind: 'viber', auth_token: '4453b6ac-viber', sender_name: 'Acme Support' };
  it('builds a Viber body, the Viber API address only when given', () => {
    expect(adapterBody(viber)).toEqual({ body: viberBody });
    expect(adapterBody({ ...viber, api_base: ' http://127.0.0.1:9/viber ' })).toEqual({ body: { ...viberBody, api_base: 'http://127.0.0.1:9/viber' } });
    expect(adapterBody({ ...viber, api_base: 'chatapi.viber.com' })).toEqual({ problem: 'url_invalid' });
  });
  it('checks the Viber auth token and the sender name: 1-28 characters', () => {
    expectPrintableSecret(viber, 'auth_token', 'auth_token_invalid');
    const problem = { problem: 'sender_name_invalid' };
    expect(adapterBody({ ...viber, sender_name: '' })).toEqual(problem);
    expect(adapterBody({ ...viber, sender_name: '   ' })).toEqual(problem);
    expect(adapterBody({ ...viber, sender_name: 'x'.repeat(29) })).toEqual(problem);
    expect(adapterBody({ ...viber, sender_name: ' ' + 'x'.repeat(28) + ' ' })).toHaveProperty(['body', 'sender_name'], 'x'.repeat(28));
    // Characters, not UTF-16 units; spaces and any script inside the name.
    expect(adapterBody({ ...viber, sender_name: '😀'.repeat(28) })).toHaveProperty(['body', 'sender_name'], '😀'.repeat(28));
    expect(adapterBody({ ...viber, sender_name: '😀'.repeat(29) })).toEqual(problem);
    expect(adapterBody({ ...viber, sender_name: 'Поддержка Acme' })).toHaveProperty(['body', 'sender_name'], 'Поддержка Acme');
    expect(adapterBody({ ...viber, auth_token: '', sender_name: '' })).toEqual({ problem: 'auth_token_invalid' });
  });

  const vk = { ...blankAdapter('vk'), app_secret: 'left over', access_token: ' vk1.a.token ', secret: ' s3cret ', confirmation: ' a1b2c3d4 ', group_id: ' 229876543 ' };
  const vkBody = { kind: 'vk', access_token: 'vk1.a.token', secret: 's3cret', confirmation: 'a1b2c3d4', group_id: '229876543' };
  it('builds a VK body, the VK API address only when given', () => {
    expect(adapterBody(vk)).toEqual({ body: vkBody });
    expect(adapterBody({ ...vk, api_base: ' http://127.0.0.1:9/vk ' })).toEqual({ body: { ...vkBody, api_base: 'http://127.0.0.1:9/vk' } });
    expect(adapterBody({ ...vk, api_base: 'api.vk.com' })).toEqual({ problem: 'url_invalid' });
  });
  it("checks the VK secrets (not by Telegram's webhook secret rule), the confirmation string and the community id", () => {
    expectPrintableSecret(vk, 'access_token', 'access_token_invalid');
    expectPrintableSecret(vk, 'secret', 'vk_secret_invalid');
    const confirmation = { problem: 'confirmation_invalid' };
    for (const bad of ['', '  ', 'a1b2-c3', 'a1 b2', 'подтв', 'ä1', 'x'.repeat(65)]) expect(adapterBody({ ...vk, confirmation: bad }), bad).toEqual(confirmation);
    for (const good of ['a', '7', 'AbC123', 'x'.repeat(64)]) expect(adapterBody({ ...vk, confirmation: good })).toHaveProperty(['body', 'confirmation'], good);
    const group = { problem: 'group_id_invalid' };
    for (const bad of ['', '-229876543', 'club229876543', '229 876', '١٢٣', '1'.repeat(21)]) expect(adapterBody({ ...vk, group_id: bad }), bad).toEqual(group);
    for (const good of ['1', '1'.repeat(20)]) expect(adapterBody({ ...vk, group_id: good })).toHaveProperty(['body', 'group_id'], good);
    expect(adapterBody({ ...vk, secret: '', confirmation: '', group_id: '' })).toEqual({ problem: 'vk_secret_invalid' });
    expect(adapterBody({ ...vk, confirmation: '-', group_id: '' })).toEqual({ problem: 'confirmation_invalid' });
  });
  const email = {
    ...blankAdapter('email'),
    bot_token: 'left over',
    address: ' support@acme.example ',
    display_name: ' Acme Support ',
    smtp_host: ' smtp.acme.example ',
    smtp_port: ' 465 ',
    smtp_security: 'tls',
    smtp_username: ' switchboard ',
    smtp_password: ' relay-password ',
  };
  const emailBody = {
    kind: 'email',
    address: 'support@acme.example',
    display_name: 'Acme Support',
    smtp_host: 'smtp.acme.example',
    smtp_port: 465,
    smtp_security: 'tls',
    smtp_username: 'switchboard',
    smtp_password: 'relay-password',
  };
  it('builds an email body: the port a number, the optional settings only when given', () => {
    expect(adapterBody(email)).toEqual({ body: emailBody });
    // A new email adapter starts at STARTTLS; the port left empty is the server's 587.
    const minimal = { ...blankAdapter('email'), address: 'support@acme.example', smtp_host: '10.0.0.25' };
    expect(adapterBody(minimal)).toEqual({ body: { kind: 'email', address: 'support@acme.example', smtp_host: '10.0.0.25', smtp_security: 'starttls' } });
    expect(adapterBody({ ...minimal, smtp_port: '587', smtp_security: 'none' })).toEqual({
      body: { kind: 'email', address: 'support@acme.example', smtp_host: '10.0.0.25', smtp_port: 587, smtp_security: 'none' },
    });
    expect(adapterBody({ ...minimal, smtp_host: '::1' })).toHaveProperty(['body', 'smtp_host'], '::1');
  });
  it('checks the email address, the From name, the relay and its port and security', () => {
    for (const bad of ['', '  ', 'support', 'support@acme', 'sup port@acme.example', 'поддержка@acme.example'])
      expect(adapterBody({ ...email, address: bad }), bad).toEqual({ problem: 'address_invalid' });
    const name = { problem: 'display_name_invalid' };
    expect(adapterBody({ ...email, display_name: 'x'.repeat(65) })).toEqual(name);
    expect(adapterBody({ ...email, display_name: 'Acme\nSupport' })).toEqual(name);
    expect(adapterBody({ ...email, display_name: '😀'.repeat(64) })).toHaveProperty(['body', 'display_name'], '😀'.repeat(64));
    expect(adapterBody({ ...email, display_name: 'Поддержка Acme' })).toHaveProperty(['body', 'display_name'], 'Поддержка Acme');
    expect(adapterBody({ ...email, display_name: '   ' })).not.toHaveProperty(['body', 'display_name']);
    for (const bad of ['', 'smtp acme.example', 'smtp_acme.example', 'smtp://acme.example', 'x'.repeat(254)])
      expect(adapterBody({ ...email, smtp_host: bad }), bad).toEqual({ problem: 'smtp_host_invalid' });
    for (const bad of ['0', '65536', '-25', '25.0', '1e3', 'smtp', '587 '.repeat(2)])
      expect(adapterBody({ ...email, smtp_port: bad }), bad).toEqual({ problem: 'smtp_port_invalid' });
    for (const good of ['1', '25', '65535']) expect(adapterBody({ ...email, smtp_port: good })).toHaveProperty(['body', 'smtp_port'], Number(good));
    expect(adapterBody({ ...email, smtp_port: '' })).not.toHaveProperty(['body', 'smtp_port']);
    expect(adapterBody({ ...email, smtp_security: 'ssl' })).toEqual({ problem: 'smtp_security_invalid' });
    expect(adapterBody({ ...email, address: '', smtp_host: '' })).toEqual({ problem: 'address_invalid' });
  });
  it('signs in to the relay with a user name and its password typed again, or not at all', () => {
    expectPrintableSecret(email, 'smtp_username', 'smtp_username_invalid');
    expectPrintableSecret(email, 'smtp_password', 'smtp_password_invalid');
    // The password is shown masked: left empty with a user name it would be dropped.
    expect(adapterBody({ ...email, smtp_password: '' })).toEqual({ problem: 'smtp_password_invalid' });
    // Without a user name: neither is sent; a password alone is refused, not dropped.
    const anonymous = adapterBody({ ...email, smtp_username: ' ', smtp_password: '' });
    expect(anonymous).toHaveProperty('body');
    expect(anonymous).not.toHaveProperty(['body', 'smtp_username']);
    expect(anonymous).not.toHaveProperty(['body', 'smtp_password']);
    expect(adapterBody({ ...email, smtp_username: '', smtp_password: 'relay-password' })).toEqual({ problem: 'smtp_username_invalid' });
  });
  it('says every problem in English and Russian', () => {
    // Each setting of each kind spoilt in turn (301 characters with spaces), and each kind left blank.
    const problems = new Set<string>();
    for (const d of [telegram, whatsapp, messenger, viber, vk, email, blankAdapter('api')]) {
      const spoilt = (Object.keys(d) as (keyof AdapterDraft)[]).filter((f) => f !== 'kind').map((f) => ({ ...d, [f]: ' ' + 'x y'.repeat(100) }));
      for (const r of [...spoilt, blankAdapter(d.kind)].map(adapterBody)) if ('problem' in r) problems.add(r.problem);
    }
    expect(problems.size).toBe(20);
    for (const p of problems) {
      expect(DICTS.en, p).toHaveProperty('err_' + p);
      expect(DICTS.ru, p).toHaveProperty('err_' + p);
    }
  });
});

describe('floor', () => {
  it('normalizes REST and socket shapes and computes totals', async () => {
    const f = floorFromRest(
      { queues: [{ group: 'tech', name: 'Tech', waiting: 2, offered: 1, longest_wait_ms: 4000 }, { group: 'billing', name: 'Billing', waiting: 0, offered: 0, longest_wait_ms: 0 }] },
      { operators: [{ id: 'bob', name: 'Bob', presence: 'online', presence_since: 1, load: 1, capacity: 2, active: 1, groups: ['tech'] }, { id: 'al', name: 'Al', presence: 'away', presence_since: 1, load: 0, capacity: 3, active: 0 }] },
      1000,
    );
    expect(f.queues.map((q) => q.group)).toEqual(['billing', 'tech']);
    expect(f.operators.map((o) => o.id)).toEqual(['al', 'bob']);
    expect(totals(f)).toEqual({ waiting: 2, offered: 1, online: 1, load: 1, capacity: 2 });
    // An operator away with conversations still held counts in neither load nor capacity.
    const away = floorFromRest({ queues: [] }, { operators: [{ id: 'al', name: 'Al', presence: 'away', presence_since: 1, load: 3, capacity: 3, active: 3 }, { id: 'bob', name: 'Bob', presence: 'online', presence_since: 1, load: 1, capacity: 2, active: 1 }] }, 1000);
    expect(totals(away)).toMatchObject({ online: 1, load: 1, capacity: 2 });
    // How long ago, by the server's clock: a snapshot taken at the server's 10,000 and
    // received at the browser's 4,000 (6 s ahead of it).
    const { sinceNow } = await import('../src/workstation/floor');
    expect(sinceNow(9_000, { ...f, at: 10_000, receivedAt: 4_000 }, 5_000)).toBe(2_000);
    expect(slaPercent(f.queues[1])).toBeNull();
    expect(longestWaitNow(f.queues[1], f, 3000)).toBe(6000);
    expect(longestWaitNow(f.queues[0], f, 3000)).toBe(0);
    const s = floorFromFrame({ at: 1, queues: [{ group: 'g', name: 'G', waiting: 3, offered: 1, longest_wait_ms: 0, sla_ms: 60000, within_sla: 3 }], operators: [] }, 99);
    expect(slaPercent(s.queues[0])).toBe(75);
    expect(s.receivedAt).toBe(99);
  });
});
