/**
 * A channel's bot answers before its operators (routing rules 7). A small bot server
 * started here stands in for the customer's bot: it greets each new conversation with a
 * quick reply and hands the conversation to a person when the customer taps it. The
 * customer sees the greeting and its button in the widget; the operator who takes the
 * conversation reads why the bot handed it over and what it learned. The admin sets,
 * replaces and removes the bot from the channel's page.
 */
import { createHmac } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test as base, expect, newPage, signIn, goOnline, openWidget, widgetSay, shot, audit, rest, staffToken, pageErrors } from './fixtures';
import type { Server } from './harness';

const PERSON = 'Talk to a person';
const GREETING = 'Hello! I am the assistant.';
const REASON = 'the customer asked for a person';

/** The bot: answers every event 200 at once, then acts through the Bot API with its
 *  token (set once the admin put the bot on the channel). */
interface FakeBot {
  url: string;
  /** Where to call and with which credentials. */
  connect: (sb: Server, channel: string, token: string, signingSecret: string) => void;
  /** The events it was sent (each delivery once), and what its Bot API calls answered. */
  events: any[];
  calls: { path: string; status: number }[];
  badSignatures: number;
}

/** `t=<seconds>,v1=<hex HMAC-SHA256 of "t.body">`, as the Channel API signs (docs/channel-api.md). */
function signatureOk(header: string | undefined, body: string, secret: string): boolean {
  const parts = Object.fromEntries((header ?? '').split(',').map((p) => p.split('=', 2) as [string, string]));
  if (!parts.t || !parts.v1) return false;
  return createHmac('sha256', secret).update(parts.t + '.' + body).digest('hex') === parts.v1;
}

const test = base.extend<{ bot: FakeBot }>({
  bot: async ({}, use) => {
    let target: { base: string; channel: string; token: string; secret: string } | null = null;
    const seen = new Set<string>();
    const bot: FakeBot = {
      url: '',
      connect: (sb, channel, token, secret) => (target = { base: sb.realPrivate, channel, token, secret }),
      events: [],
      calls: [],
      badSignatures: 0,
    };
    const call = async (path: string, body: unknown) => {
      if (!target) return;
      const r = await fetch(target.base + '/api/bot/' + target.channel + '/' + path, {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + target.token, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      bot.calls.push({ path, status: r.status });
    };
    const act = async (event: any) => {
      const c = event.conversation;
      if (event.event === 'started') await call('messages', { conversation: c, key: 'greet-' + c, text: GREETING, buttons: [PERSON] });
      else if (event.event === 'message' && event.text === PERSON) await call('handoff', { conversation: c, reason: REASON, context: { messages: '1' } });
    };
    const server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (chunk) => (body += chunk));
      req.on('end', () => {
        if (req.method !== 'POST' || !target) {
          res.writeHead(404).end();
          return;
        }
        if (!signatureOk(req.headers['x-switchboard-signature'] as string | undefined, body, target.secret)) {
          bot.badSignatures++;
          res.writeHead(401).end();
          return;
        }
        const event = JSON.parse(body);
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end('{"ok":true}');
        // A delivery sent again is answered, not acted on twice.
        if (seen.has(event.delivery_id)) return;
        seen.add(event.delivery_id);
        bot.events.push(event);
        setImmediate(() => act(event).catch((e) => console.error('[bot]', e)));
      });
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
    bot.url = 'http://127.0.0.1:' + (server.address() as AddressInfo).port + '/events';
    await use(bot);
    target = null;
    server.closeAllConnections();
    await new Promise((ok) => server.close(ok));
  },
});

test('the bot greets with a quick reply, the customer taps it, and the operator who takes over reads why and what the bot learned', async ({ browser, sb, bot }) => {
  const admin = await staffToken(sb, 'admin');
  const put = await rest(sb, 'PUT', '/api/channels/web/bot', admin, { url: bot.url });
  expect(put.status).toBe(200);
  expect(put.body).toMatchObject({ channel: 'web', url: bot.url, api_path: '/api/bot/web/' });
  bot.connect(sb, 'web', put.body.token, put.body.signing_secret);

  // Alice is online before the customer writes: the bot holds the conversation, so she
  // is offered nothing until it hands over.
  const alice = await newPage(browser);
  const aliceErrors = pageErrors(alice);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);

  const client = await newPage(browser);
  const clientErrors = pageErrors(client);
  await openWidget(client, sb);
  await widgetSay(client, 'Hi, I have a question about my order');
  const greeting = client.locator('[data-testid="widget-message"][data-from="bot"]');
  await expect(greeting).toHaveCount(1);
  await expect(greeting).toContainText(GREETING);
  await expect(greeting.locator('.sbw-who')).toHaveText('Assistant');
  await expect(client.getByTestId('widget-status')).toHaveText('Our assistant is answering');
  await expect(client.getByTestId('widget-entry-queued')).toHaveCount(0);
  const replies = greeting.getByRole('group', { name: 'Quick replies' });
  const person = replies.getByRole('button', { name: PERSON });
  await expect(person).toBeVisible();
  await expect(client.getByTestId('widget-quick-reply')).toHaveCount(1);
  await expect(alice.getByTestId('offer')).toHaveCount(0);
  const conv = bot.events.find((e) => e.event === 'started')?.conversation;
  expect(conv).toBeGreaterThan(0);
  expect((await rest(sb, 'GET', '/api/conversations/' + conv, admin)).body.status.state).toBe('with_bot');
  await shot(client, '70-widget-bot-greeting');
  const problems = await audit(client, 'widget with quick replies');

  // Tapped from the keyboard: sent like a typed message, and the buttons go.
  await person.focus();
  await client.keyboard.press('Enter');
  await expect(client.locator('[data-testid="widget-message"][data-from="client"]').filter({ hasText: PERSON })).toHaveCount(1);
  await expect(client.getByTestId('widget-quick-replies')).toHaveCount(0);
  await expect(client.getByTestId('widget-input')).toBeFocused();
  await expect(client.getByTestId('widget-entry-handoff')).toHaveText(/Connecting you to a person…/);
  await expect(client.getByTestId('widget-entry-queued')).toBeVisible();
  await expect(client.getByTestId('widget-status')).toHaveText('Waiting for an operator…');
  await shot(client, '71-widget-bot-handoff');

  // Alice is offered it, takes it, and reads the bot's part and the handoff.
  const offer = alice.getByTestId('offer');
  await expect(offer).toHaveAttribute('data-conversation', String(conv));
  await offer.getByTestId('offer-accept').click();
  const view = alice.getByTestId('conversation-view');
  await expect(view).toHaveAttribute('data-conv', String(conv));
  const botLine = view.locator('[data-testid="message"][data-from="bot"]');
  await expect(botLine).toContainText(GREETING);
  await expect(botLine.locator('.who')).toHaveText('Bot');
  await expect(botLine.getByTestId('bot-buttons')).toHaveText(PERSON);
  await expect(view.getByTestId('entry-with_bot')).toHaveText(/The bot took the conversation/);
  const handoff = view.getByTestId('entry-handoff');
  await expect(handoff.getByTestId('handoff-title')).toHaveText('Bot handed over to general: ' + REASON);
  const context = handoff.getByTestId('handoff-context');
  await expect(context.locator('dt')).toHaveText(['messages']);
  await expect(context.locator('dd')).toHaveText(['1']);
  await shot(alice, '72-desk-bot-handoff');
  problems.push(...(await audit(alice, 'desk with a handoff')));
  expect(problems).toEqual([]);

  // She answers; the customer is with a person now.
  await alice.getByTestId('composer-input').fill('Hi, Alice here. What is the order number?');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(client.getByTestId('widget-message').filter({ hasText: 'Alice here' })).toHaveCount(1);
  await expect(client.getByTestId('widget-status')).toContainText('Alice');

  expect(bot.events.map((e) => e.event)).toEqual(['started', 'message', 'message']);
  expect(bot.calls).toEqual([
    { path: 'messages', status: 200 },
    { path: 'handoff', status: 204 },
  ]);
  expect(bot.badSignatures).toBe(0);
  expect(aliceErrors).toEqual([]);
  expect(clientErrors).toEqual([]);
});

test('the admin sets a bot on a channel (its secrets shown once), replaces it and removes it', async ({ browser, sb, bot }) => {
  const page = await newPage(browser);
  const errors = pageErrors(page);
  await signIn(page, sb, 'admin');
  await page.getByTestId('nav-admin').click();
  const body = page.getByTestId('admin');
  await body.getByTestId('admin-tab-channels').click();
  await body.getByRole('button', { name: 'Edit Web chat' }).click();
  const section = body.getByTestId('channel-bot');
  await expect(section.getByRole('heading', { name: 'Bot of Web chat' })).toBeVisible();
  await expect(section).toContainText('No bot: new conversations go straight to the queue.');
  await expect(section.getByRole('button', { name: 'Remove bot' })).toHaveCount(0);

  // An address the server would refuse is caught here.
  await section.getByLabel('Bot URL').fill('ftp://bot.example/events');
  await section.getByRole('button', { name: 'Set bot' }).click();
  await expect(section.getByRole('alert')).toHaveText('Enter an http:// or https:// address of at most 500 characters, without spaces.');

  await section.getByLabel('Bot URL').fill(bot.url);
  await section.getByRole('button', { name: 'Set bot' }).click();
  await expect(section.getByRole('status')).toHaveText('Bot set.');
  const secrets = section.getByTestId('bot-secrets');
  await expect(secrets).toContainText('Copy these now: they will not be shown again.');
  const token = await secrets.getByLabel('Bot token').inputValue();
  expect(token).toMatch(/^[A-Za-z0-9_-]{43}$/);
  expect(await secrets.getByLabel('Signing secret').inputValue()).toMatch(/^[A-Za-z0-9_-]{43}$/);
  await expect(section.getByTestId('bot-current-url')).toHaveText(bot.url);
  await expect(section.getByTestId('bot-api-path')).toHaveText('/api/bot/web/');
  await section.scrollIntoViewIfNeeded();
  await shot(page, '73-admin-bot-secrets');
  expect(await audit(page, 'admin with bot secrets')).toEqual([]);
  // The token works on the Bot API (a conversation that does not exist: not found, not unauthorized).
  const probe = (token: string) => rest(sb, 'POST', '/api/bot/web/messages', token, { conversation: 999999, key: 'x', text: 'hi' });
  expect((await probe(token)).status).toBe(404);
  await secrets.getByRole('button', { name: 'I have copied them' }).click();
  await expect(secrets).toHaveCount(0);

  // Read again: the bot is there and its secrets are not.
  await page.reload();
  await page.getByTestId('nav-admin').click();
  await body.getByTestId('admin-tab-channels').click();
  await body.getByRole('button', { name: 'Edit Web chat' }).click();
  await expect(section.getByTestId('bot-current-url')).toHaveText(bot.url);
  await expect(section.getByLabel('Bot URL')).toHaveValue(bot.url);
  await expect(section).not.toContainText(token);

  // Replaced: new secrets; the old token stops working.
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByTestId('bot-secrets')).toBeVisible();
  const newToken = await section.getByTestId('bot-token').inputValue();
  expect(newToken).not.toBe(token);
  expect((await probe(token)).status).toBe(401);
  expect((await probe(newToken)).status).toBe(404);

  page.once('dialog', (d) => void d.accept());
  await section.getByRole('button', { name: 'Remove bot' }).click();
  await expect(section.getByRole('status')).toHaveText('Bot removed.');
  await expect(section).toContainText('No bot: new conversations go straight to the queue.');
  await expect(section.getByTestId('bot-secrets')).toHaveCount(0);
  const admin = await staffToken(sb, 'admin');
  expect((await rest(sb, 'GET', '/api/channels/web/bot', admin)).status).toBe(404);
  expect(errors).toEqual([]);
});
