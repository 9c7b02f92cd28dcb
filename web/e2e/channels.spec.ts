/**
 * Messenger channels in the browser (issue "Channels", items 2, 7 and 8). A customer
 * writes through the Channel API (a fake adapter stands in for the provider); the
 * operator sees the conversation's channel and the customer's id there, replies, and
 * follows the reply's delivery status as the adapter reports it, live and after a
 * reload; a reply the provider could not deliver is listed on the supervisor's floor and
 * sent again from there. The admin connects, replaces and disconnects adapters, and sends
 * a test message through one. The composer refuses what a messenger cannot carry (files
 * where they are not carried, text with a file to Messenger;
 * over 2000 characters to Facebook Messenger) before sending. An email channel takes a
 * customer's mail at the node's SMTP listener and sends the operator's reply in its
 * thread through the admin's SMTP relay.
 */
import crypto from 'node:crypto';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { test as base, expect, newPage, signIn, goOnline, shot, rest, staffToken, pageErrors } from './fixtures';
import type { Server } from './harness';

/** A Channel API adapter that takes everything: 200 with a provider id to any request,
 *  keeping the bodies it was sent. */
interface FakeAdapter {
  url: string;
  received: any[];
}

/** An SMTP relay that takes every mail (no TLS, no sign-in), keeping each as it was
 *  sent: the envelope and the data with its dots unstuffed, CRLF line ends. */
interface FakeRelay {
  port: number;
  mails: { from: string; to: string[]; data: string }[];
}

const test = base.extend<{ adapter: FakeAdapter; relay: FakeRelay }>({
  relay: async ({}, use) => {
    const mails: FakeRelay['mails'] = [];
    const sockets = new Set<net.Socket>();
    const server = net.createServer((socket) => {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
      socket.setEncoding('utf8');
      const say = (line: string) => socket.write(line + '\r\n');
      let buf = '';
      let from = '';
      let to: string[] = [];
      let data: string[] | null = null;
      say('220 relay.test ESMTP');
      socket.on('data', (chunk: string) => {
        buf += chunk;
        for (let i = buf.indexOf('\r\n'); i >= 0; i = buf.indexOf('\r\n')) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (data) {
            if (line === '.') {
              mails.push({ from, to, data: data.map((l) => l + '\r\n').join('') });
              data = null;
              say('250 2.0.0 queued');
            } else data.push(line.startsWith('.') ? line.slice(1) : line);
            continue;
          }
          const verb = line.slice(0, 4).toUpperCase();
          const path = /<([^>]*)>/.exec(line)?.[1] ?? '';
          if (verb === 'EHLO' || verb === 'HELO') say('250 relay.test');
          else if (verb === 'MAIL') {
            [from, to] = [path, []];
            say('250 2.1.0 OK');
          } else if (verb === 'RCPT') {
            to.push(path);
            say('250 2.1.5 OK');
          } else if (verb === 'DATA') {
            data = [];
            say('354 end data with <CR><LF>.<CR><LF>');
          } else if (verb === 'QUIT') {
            say('221 2.0.0 bye');
            socket.end();
          } else say('500 5.5.1 unknown command');
        }
      });
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
    await use({ port: (server.address() as AddressInfo).port, mails });
    for (const s of sockets) s.destroy();
    await new Promise((ok) => server.close(ok));
  },

  adapter: async ({}, use) => {
    const received: any[] = [];
    const server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (chunk) => (body += chunk));
      req.on('end', () => {
        if (req.method === 'POST') received.push(JSON.parse(body));
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ provider_message_id: 'toy-1' }));
      });
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
    await use({ url: 'http://127.0.0.1:' + (server.address() as AddressInfo).port + '/outbound', received });
    server.closeAllConnections();
    await new Promise((ok) => server.close(ok));
  },
});

/** One SMTP session with `addr` (`host:port`) as a sending mail server holds it: each
 *  command after the answer to the one before, all within 10 s; the answers (the
 *  greeting first), each with its lines joined by a newline. */
function smtpSession(addr: string, commands: string[]): Promise<string[]> {
  const colon = addr.lastIndexOf(':');
  const socket = net.connect(Number(addr.slice(colon + 1)), addr.slice(0, colon));
  socket.setEncoding('utf8');
  const replies: string[] = [];
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => {
      socket.destroy();
      fail(new Error('the SMTP session did not finish within 10 s; answers so far: ' + replies.join(' | ')));
    }, 10_000);
    socket.on('error', (e) => {
      clearTimeout(timer);
      fail(e);
    });
    // Closed before the last answer (after it, the promise is settled already).
    socket.on('close', () => {
      clearTimeout(timer);
      fail(new Error('the SMTP server closed the connection; answers so far: ' + replies.join(' | ')));
    });
    let buf = '';
    let lines: string[] = [];
    let next = 0;
    socket.on('data', (chunk: string) => {
      buf += chunk;
      for (let i = buf.indexOf('\r\n'); i >= 0; i = buf.indexOf('\r\n')) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 2);
        // `250-…` lines continue a reply; `250 …` ends it.
        if (/^[0-9]{3}-/.test(lines[lines.length - 1])) continue;
        replies.push(lines.join('\n'));
        lines = [];
        if (next < commands.length) socket.write(commands[next++] + '\r\n');
        else {
          clearTimeout(timer);
          socket.end();
          ok(replies);
        }
      }
    });
  });
}

/** Channel `toy` (Channel API, default group general) pointed at the fake adapter; the
 *  channel token for the adapter's calls. */
async function toyChannel(sb: Server, adapter: FakeAdapter): Promise<string> {
  const admin = await staffToken(sb, 'admin');
  expect((await rest(sb, 'PUT', '/api/channels/toy', admin, { kind: 'toy', name: 'Toy', default_group: 'general' })).status).toBe(200);
  const put = await rest(sb, 'PUT', '/api/channels/toy/adapter', admin, { kind: 'api', outbound_url: adapter.url });
  expect(put.status).toBe(200);
  expect(put.body.token).toMatch(/^[A-Za-z0-9_-]{43}$/);
  return put.body.token;
}

test('a Channel API customer: the operator sees the channel, replies and sees the reply read; a failed reply is sent again from the floor', async ({ browser, sb, adapter }) => {
  // The floor first: nothing has failed yet.
  const sup = await newPage(browser);
  const supErrors = pageErrors(sup);
  await signIn(sup, sb, 'supervisor');
  const dead = sup.getByTestId('dead-letters');
  await expect(dead.getByRole('heading', { name: 'Failed deliveries' })).toBeVisible();
  await expect(dead).toContainText('No failed deliveries.');
  await expect(dead.getByTestId('dead-letter')).toHaveCount(0);
  await expect(dead.locator('.error')).toHaveCount(0);

  // Alice's desk is open before the channel exists: it learns of it with the conversation.
  const alice = await newPage(browser);
  const aliceErrors = pageErrors(alice);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const token = await toyChannel(sb, adapter);

  const pushed = await rest(sb, 'POST', '/api/channel-api/toy/messages', token, { sender: 'u1', sender_name: 'Fay', message_id: 'm1', text: 'Where is my order?' });
  expect(pushed.status).toBe(200);
  expect(pushed.body.duplicate).toBe(false);
  const conv = pushed.body.conversation as number;

  const offer = alice.getByTestId('offer');
  await expect(offer).toHaveAttribute('data-conversation', String(conv));
  await expect(offer.getByTestId('offer-channel')).toHaveText('toy');
  await offer.getByTestId('offer-accept').click();
  const view = alice.getByTestId('conversation-view');
  await expect(view).toHaveAttribute('data-conv', String(conv));
  await expect(view.getByTestId('conversation-title')).toContainText('Fay');
  const question = view.getByTestId('message').filter({ hasText: 'Where is my order?' });
  await expect(question).toHaveCount(1);
  // The channel by its name, and the customer's identity there.
  await expect(view.getByTestId('channel-badge')).toHaveText('Channel: Toy · toy:u1');
  await expect(question.getByTestId('delivery')).toHaveCount(0);
  // Files are not carried to Channel API adapters yet: the attach button is off and says why, and
  // no counter shows (the Channel API takes the full 4000 characters).
  const attach = view.getByTestId('attach-button');
  await expect(attach).toBeDisabled();
  await expect(attach).toHaveAccessibleDescription('Files cannot be sent to this channel yet');
  await expect(attach).toHaveAttribute('title', 'Files cannot be sent to this channel yet');
  await expect(view.getByTestId('attach-unavailable')).toBeVisible();
  await expect(view.getByTestId('char-count')).toHaveCount(0);

  await alice.getByTestId('composer-input').fill('It ships today.');
  await alice.getByTestId('composer-input').press('Enter');
  const reply = view.getByTestId('message').filter({ hasText: 'It ships today.' });
  const replyMark = reply.getByTestId('delivery');
  await expect.poll(() => adapter.received.length).toBe(1);
  const out = adapter.received[0];
  expect(out).toMatchObject({ channel: 'toy', conversation: conv, recipient: 'u1', kind: 'message', author: 'Alice', text: 'It ships today.' });
  expect(out.delivery_id).toBe(conv + ':' + out.seq);
  await expect(reply).toHaveAttribute('data-seq', String(out.seq));
  // The adapter took it: sent (✓).
  await expect(replyMark).toHaveAttribute('data-status', 'sent');
  await expect(replyMark).toHaveText('✓ Sent');

  // The customer read it.
  const read = await rest(sb, 'POST', '/api/channel-api/toy/statuses', token, [{ conversation: out.conversation, seq: out.seq, status: 'read' }]);
  expect(read.status).toBe(204);
  await expect(replyMark).toHaveAttribute('data-status', 'read');
  await expect(replyMark).toHaveClass(/delivery-read/);
  await expect(replyMark).toHaveText('✓✓ Read');
  await shot(alice, '60-channel-desk-read');

  // A second reply the provider could not deliver: the reason is on screen.
  await alice.getByTestId('composer-input').fill('Here is the tracking link.');
  await alice.getByTestId('composer-input').press('Enter');
  await expect.poll(() => adapter.received.length).toBe(2);
  const second = adapter.received[1];
  const secondMark = view.getByTestId('message').filter({ hasText: 'tracking link' }).getByTestId('delivery');
  await expect(secondMark).toHaveAttribute('data-status', 'sent');
  const failed = await rest(sb, 'POST', '/api/channel-api/toy/statuses', token, [{ conversation: conv, seq: second.seq, status: 'failed', reason: 'the customer left the messenger' }]);
  expect(failed.status).toBe(204);
  await expect(secondMark).toHaveAttribute('data-status', 'failed');
  await expect(secondMark).toBeVisible();
  await expect(secondMark).toHaveText('⚠ Not delivered: the customer left the messenger');
  await shot(alice, '61-channel-desk-failed');

  // After a reload the statuses come from the conversation itself.
  await alice.reload();
  await alice.locator(`[data-testid="conv-item"][data-conv="${conv}"]`).click();
  await expect(view.getByTestId('channel-badge')).toHaveText('Channel: Toy · toy:u1');
  await expect(replyMark).toHaveAttribute('data-status', 'read');
  await expect(secondMark).toHaveAttribute('data-status', 'failed');

  // The floor lists the dead letter; sent again, the adapter gets it once more.
  await sup.reload();
  const row = dead.locator(`[data-testid="dead-letter"][data-conv="${conv}"][data-seq="${second.seq}"]`);
  await expect(row).toContainText('toy');
  await expect(row).toContainText('u1');
  await expect(row).toContainText('Failed');
  await expect(row.getByTestId('dead-letter-reason')).toHaveText('the customer left the messenger');
  await shot(sup, '62-floor-failed-deliveries');
  await row.getByRole('button', { name: `Send again: entry ${second.seq} of conversation #${conv}` }).click();
  await expect(dead.getByTestId('dead-letter')).toHaveCount(0);
  await expect(dead).toContainText('No failed deliveries.');
  await expect.poll(() => adapter.received.length).toBe(3);
  expect(adapter.received[2]).toMatchObject({ delivery_id: conv + ':' + second.seq, text: 'Here is the tracking link.' });
  await expect(secondMark).toHaveAttribute('data-status', 'sent');

  expect(supErrors).toEqual([]);
  expect(aliceErrors).toEqual([]);
});

test('the admin connects a Channel API adapter (its secrets shown once), refused and accepted Telegram, WhatsApp, Messenger, Viber and VK settings, and disconnects', async ({ browser, sb, adapter }) => {
  const token = await toyChannel(sb, adapter);
  const admin = await newPage(browser);
  const errors = pageErrors(admin);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  const body = admin.getByTestId('admin');
  await body.getByTestId('admin-tab-channels').click();
  const toyRow = body.locator('[data-testid="channel-row"][data-channel="toy"]');
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('Channel API');
  await expect(body.locator('[data-testid="channel-row"][data-channel="web"]').getByTestId('channel-adapter-kind')).toHaveText('—');
  // The web chat has no adapter to set.
  await body.getByRole('button', { name: 'Edit Web chat' }).click();
  await expect(body.getByTestId('channel-adapter')).toHaveCount(0);

  await toyRow.getByRole('button', { name: 'Edit Toy' }).click();
  const section = body.getByTestId('channel-adapter');
  await expect(section.getByRole('heading', { name: 'Adapter of Toy' })).toBeVisible();
  const current = section.getByTestId('adapter-current');
  await expect(current).toHaveAttribute('data-kind', 'api');
  await expect(current).toContainText(adapter.url);
  await expect(current).toContainText('/api/channel-api/toy/messages');

  // A test message through it: the adapter gets a notice, and the provider's id is shown.
  const probe = section.getByTestId('adapter-test');
  await expect(probe.getByRole('heading', { name: 'Send a test message' })).toBeVisible();
  await probe.getByRole('button', { name: 'Send test message' }).click();
  await expect(probe.getByRole('alert')).toHaveText('The recipient must be 1-200 bytes.');
  expect(adapter.received).toHaveLength(0);
  await probe.getByLabel('Recipient').fill('u9');
  await probe.getByLabel('Text', { exact: true }).fill('Is this thing on?');
  await probe.getByRole('button', { name: 'Send test message' }).click();
  await expect(probe.getByRole('status')).toHaveText('Sent (provider id toy-1).');
  await expect(probe.getByRole('alert')).toHaveCount(0);
  expect(adapter.received).toHaveLength(1);
  expect(adapter.received[0]).toMatchObject({ channel: 'toy', recipient: 'u9', kind: 'notice', text: 'Is this thing on?' });

  // Telegram: the secret is checked here; what only the server checks comes back in its words.
  await section.getByLabel('Adapter kind').selectOption('telegram');
  await section.getByLabel('Bot token').fill('токен');
  await section.getByLabel('Webhook secret').fill('too-short');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toHaveText('The webhook secret must be 16-256 characters of A-Z, a-z, 0-9, _ and -.');
  await section.getByLabel('Webhook secret').fill('a-secret_of-20-chars');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toContainText('The server refused this: ');
  await expect(section.getByRole('alert')).toContainText('bot_token');
  await expect(current).toHaveAttribute('data-kind', 'api');

  await section.getByLabel('Bot token').fill('123456:ABCdef');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('status')).toHaveText('Connected.');
  await expect(current).toHaveAttribute('data-kind', 'telegram');
  await expect(section.getByTestId('adapter-webhook-path')).toHaveText('/hooks/telegram/toy');
  await expect(section).toContainText('set it with setWebhook and the same secret');
  await expect(current).not.toContainText('123456:ABCdef');
  await expect(section.getByLabel('Bot token')).toHaveValue('');
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('Telegram');
  // The Channel API's token stopped working with it.
  expect((await rest(sb, 'POST', '/api/channel-api/toy/messages', token, { sender: 'u2', message_id: 'm1', text: 'Hello?' })).status).toBe(401);


  // WhatsApp: the phone number id and the secrets are checked here; the Telegram API
  // address does not carry over.
  await section.getByLabel('Adapter kind').selectOption('whatsapp');
  await expect(section.getByLabel('Bot token')).toHaveCount(0);
  await expect(section.getByLabel('Graph API address (optional)')).toHaveValue('');
  await section.getByLabel('Access token').fill('EAAG-test-token');
  await section.getByLabel('App secret').fill('app-secret-123');
  await section.getByLabel('Verify token').fill('verify 123');
  await section.getByLabel('Phone number ID').fill('+1 098765432');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toHaveText('The verify token must be 1-256 printable characters without spaces.');
  await section.getByLabel('Verify token').fill('verify-123');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toHaveText('The phone number ID must be 1-32 digits.');
  await expect(current).toHaveAttribute('data-kind', 'telegram');
  await section.getByLabel('Phone number ID').fill('1098765432');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('status')).toHaveText('Connected.');
  await expect(current).toHaveAttribute('data-kind', 'whatsapp');
  await expect(section.getByTestId('adapter-webhook-path')).toHaveText('/hooks/whatsapp/toy');
  await expect(section).toContainText("In Meta's app dashboard set the callback URL to <public address>/hooks/whatsapp/toy and the same verify token; subscribe to the messages field.");
  await expect(current.getByTestId('adapter-current-access-token')).toHaveText('EA…en');
  await expect(current.getByTestId('adapter-current-app-secret')).toHaveText('ap…23');
  await expect(current.getByTestId('adapter-current-phone-number-id')).toHaveText('1098765432');
  await expect(current.getByTestId('adapter-current-api-base')).toHaveText('https://graph.facebook.com/v21.0');
  await expect(section).not.toContainText('EAAG-test-token');
  await expect(section.getByLabel('Access token')).toHaveValue('');
  await expect(section.getByLabel('Verify token')).toHaveValue('');
  await expect(section.getByLabel('Phone number ID')).toHaveValue('1098765432');
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('WhatsApp');
  await current.scrollIntoViewIfNeeded();
  await shot(admin, '64-admin-adapter-whatsapp');
  // Meta's subscription check passes with the verify token typed.
  const check = await fetch(sb.realPublic + '/hooks/whatsapp/toy?hub.mode=subscribe&hub.verify_token=verify-123&hub.challenge=ch-42');
  expect([check.status, await check.text()]).toEqual([200, 'ch-42']);

  // Facebook Messenger: the page token and Meta's two secrets, masked once saved.
  await section.getByLabel('Adapter kind').selectOption('messenger');
  await expect(section.getByLabel('Phone number ID')).toHaveCount(0);
  await section.getByLabel('Page access token').fill('EAAB page token');
  await section.getByLabel('App secret').fill('fb-app-secret');
  await section.getByLabel('Verify token').fill('fb-verify-1');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toHaveText('The page access token must be 1-256 printable characters without spaces.');
  await section.getByLabel('Page access token').fill('EAAB-page-token');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('status')).toHaveText('Connected.');
  await expect(current).toHaveAttribute('data-kind', 'messenger');
  await expect(section.getByTestId('adapter-webhook-path')).toHaveText('/hooks/messenger/toy');
  await expect(section.getByTestId('adapter-webhook-hint')).toHaveText(
    "In Meta's app dashboard set the page's callback URL to <public address>/hooks/messenger/toy and the same verify token; subscribe to the messages and message_deliveries fields.",
  );
  await expect(current.getByTestId('adapter-current-page-token')).toHaveText('EA…en');
  await expect(current.getByTestId('adapter-current-app-secret')).toHaveText('fb…et');
  await expect(section).not.toContainText('EAAB-page-token');
  await expect(section.getByLabel('Page access token')).toHaveValue('');
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('Facebook Messenger');
  const fbCheck = await fetch(sb.realPublic + '/hooks/messenger/toy?hub.mode=subscribe&hub.verify_token=fb-verify-1&hub.challenge=fb-7');
  expect([fbCheck.status, await fbCheck.text()]).toEqual([200, 'fb-7']);

  // Viber: the auth token and the name replies are sent under (at most 28 characters).
  await section.getByLabel('Adapter kind').selectOption('viber');
  await expect(section.getByLabel('Viber API address (optional)')).toHaveValue('');
  await section.getByLabel('Auth token').fill('4453b6ac-viber-token');
  await section.getByLabel('Sender name').fill('Acme Support and Friends Ltd.');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toHaveText('The sender name must be 1-28 characters.');
  await expect(current).toHaveAttribute('data-kind', 'messenger');
  await section.getByLabel('Sender name').fill('Acme Support');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('status')).toHaveText('Connected.');
  await expect(current).toHaveAttribute('data-kind', 'viber');
  await expect(section.getByTestId('adapter-webhook-path')).toHaveText('/hooks/viber/toy');
  await expect(section.getByTestId('adapter-webhook-hint')).toHaveText("Set it with Viber's set_webhook: <public address>/hooks/viber/toy");
  await expect(current.getByTestId('adapter-current-auth-token')).toHaveText('44…en');
  await expect(current.getByTestId('adapter-current-sender-name')).toHaveText('Acme Support');
  await expect(current.getByTestId('adapter-current-api-base')).toHaveText('https://chatapi.viber.com');
  await expect(section).not.toContainText('4453b6ac-viber-token');
  await expect(section.getByLabel('Auth token')).toHaveValue('');
  await expect(section.getByLabel('Sender name')).toHaveValue('Acme Support');
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('Viber');

  // VK: the community's token and secret key, its confirmation string and id.
  await section.getByLabel('Adapter kind').selectOption('vk');
  await section.getByLabel('Community access token').fill('vk1.a.community-token');
  await section.getByLabel('Secret key').fill('callback-secret');
  await section.getByLabel('Confirmation string').fill('a1b2-c3d4');
  await section.getByLabel('Community ID').fill('229876543');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('alert')).toHaveText('The confirmation string must be 1-64 letters and digits.');
  await section.getByLabel('Confirmation string').fill('a1b2c3d4');
  await section.getByRole('button', { name: 'Replace' }).click();
  await expect(section.getByRole('status')).toHaveText('Connected.');
  await expect(current).toHaveAttribute('data-kind', 'vk');
  await expect(section.getByTestId('adapter-webhook-path')).toHaveText('/hooks/vk/toy');
  await expect(section.getByTestId('adapter-webhook-hint')).toHaveText(
    "In the community's Callback API settings, set the server address to <public address>/hooks/vk/toy and confirm it.",
  );
  await expect(current.getByTestId('adapter-current-access-token')).toHaveText('vk…en');
  await expect(current.getByTestId('adapter-current-secret')).toHaveText('ca…et');
  await expect(current.getByTestId('adapter-current-confirmation')).toHaveText('a1b2c3d4');
  await expect(current.getByTestId('adapter-current-group-id')).toHaveText('229876543');
  await expect(section).not.toContainText('callback-secret');
  await expect(section.getByLabel('Secret key')).toHaveValue('');
  await expect(section.getByLabel('Community ID')).toHaveValue('229876543');
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('VK');
  await current.scrollIntoViewIfNeeded();
  await shot(admin, '65-admin-adapter-vk');
  // VK's server check gets the confirmation string typed.
  const vkCheck = await fetch(sb.realPublic + '/hooks/vk/toy', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ type: 'confirmation', group_id: 229876543 }) });
  expect([vkCheck.status, await vkCheck.text()]).toEqual([200, 'a1b2c3d4']);

  // Back to the Channel API: a new token and signing secret, shown this once.
  await section.getByLabel('Adapter kind').selectOption('api');
  await section.getByLabel('Outbound URL').fill(adapter.url);
  await section.getByRole('button', { name: 'Replace' }).click();
  const secrets = section.getByTestId('adapter-secrets');
  await expect(secrets).toContainText('Copy these now: they will not be shown again.');
  const newToken = await secrets.getByLabel('Channel token').inputValue();
  expect(newToken).toMatch(/^[A-Za-z0-9_-]{43}$/);
  expect(await secrets.getByLabel('Signing secret').inputValue()).toMatch(/^[A-Za-z0-9_-]{43}$/);
  await expect(current).toHaveAttribute('data-kind', 'api');
  await shot(admin, '63-admin-adapter-secrets');
  expect((await rest(sb, 'POST', '/api/channel-api/toy/messages', newToken, { sender: 'u2', message_id: 'm1', text: 'Hello?' })).status).toBe(200);
  await secrets.getByRole('button', { name: 'I have copied them' }).click();
  await expect(secrets).toHaveCount(0);
  // Read again, the adapter is there and its secrets are not.
  await admin.reload();
  await admin.getByTestId('nav-admin').click();
  await body.getByTestId('admin-tab-channels').click();
  await toyRow.getByRole('button', { name: 'Edit Toy' }).click();
  await expect(current).toContainText(adapter.url);
  await expect(section.getByLabel('Outbound URL')).toHaveValue(adapter.url);
  await expect(section).not.toContainText(newToken);
  await expect(section.getByTestId('adapter-secrets')).toHaveCount(0);

  admin.once('dialog', (d) => void d.accept());
  await section.getByRole('button', { name: 'Disconnect' }).click();
  await expect(section.getByRole('status')).toHaveText('Disconnected.');
  await expect(section).toContainText('No adapter: the channel takes no messages yet.');
  await expect(section.getByTestId('adapter-test')).toHaveCount(0);
  await expect(toyRow.getByTestId('channel-adapter-kind')).toHaveText('—');
  expect((await rest(sb, 'POST', '/api/channel-api/toy/messages', newToken, { sender: 'u2', message_id: 'm2', text: 'Hello?' })).status).toBe(401);
  expect(errors).toEqual([]);
});

test('a Facebook Messenger customer: the composer counts toward 2000 characters and sends no more, and a file only alone', async ({ browser, sb, adapter }) => {
  const admin = await staffToken(sb, 'admin');
  expect((await rest(sb, 'PUT', '/api/channels/fb', admin, { kind: 'messenger', name: 'Facebook', default_group: 'general' })).status).toBe(200);
  // The Graph API stands in at the fake adapter: nothing is to reach it.
  const graph = adapter.url.replace(/\/outbound$/, '/v21.0');
  expect((await rest(sb, 'PUT', '/api/channels/fb/adapter', admin, { kind: 'messenger', page_token: 'page-token', app_secret: 'fb-app-secret', verify_token: 'fb-verify', api_base: graph })).status).toBe(200);
  const alice = await newPage(browser);
  const errors = pageErrors(alice);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const body = JSON.stringify({ object: 'page', entry: [{ id: 'page-1', time: Date.now(), messaging: [{ sender: { id: 'psid-7' }, recipient: { id: 'page-1' }, timestamp: Date.now(), message: { mid: 'mid-1', text: 'Hello there' } }] }] });
  const hook = await fetch(sb.realPublic + '/hooks/messenger/fb', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-Hub-Signature-256': 'sha256=' + crypto.createHmac('sha256', 'fb-app-secret').update(body).digest('hex') },
    body,
  });
  expect(hook.status).toBe(200);
  await alice.getByTestId('offer').getByTestId('offer-accept').click();
  const view = alice.getByTestId('conversation-view');
  await expect(view.getByTestId('channel-badge')).toHaveText('Channel: Facebook · fb:psid-7');
  // Routing rules 8: Messenger takes files, one a message, without text.
  await expect(view.getByTestId('attach-button')).toBeEnabled();

  const input = alice.getByTestId('composer-input');
  const count = view.getByTestId('char-count');
  await input.fill('x'.repeat(1799));
  await expect(count).toHaveCount(0);
  await input.fill('x'.repeat(1950));
  await expect(count).toHaveText('1950 of 2000 characters');
  await expect(input).toHaveAccessibleDescription('1950 of 2000 characters');
  await input.fill('x'.repeat(2001));
  await expect(count).toHaveAttribute('data-over', 'true');
  await input.press('Enter');
  await expect(view.getByTestId('composer-problem')).toHaveText('Too long for Facebook Messenger: at most 2000 characters, this is 2001.');
  // Nothing was sent: the text stays to be shortened.
  await expect(input).toHaveValue('x'.repeat(2001));
  await expect(view.getByTestId('message').filter({ hasText: 'xxxx' })).toHaveCount(0);
  await shot(alice, '66-channel-messenger-too-long');
  // A file with text is refused before anything is sent: the file goes alone.
  await alice.getByTestId('attach-input').setInputFiles({ name: 'menu.pdf', mimeType: 'application/pdf', buffer: Buffer.from('%PDF-1.4 menu') });
  // Uploaded, so the composer holds it (Enter during the upload sends nothing).
  await expect(alice.locator('.chip')).toContainText('menu.pdf');
  await input.fill('see the menu');
  await input.press('Enter');
  await expect(view.getByTestId('composer-problem')).toHaveText(
    'A Facebook Messenger message with a file carries no text: send the file alone, and the text in a message of its own.',
  );
  await expect(view.getByTestId('message').filter({ hasText: 'see the menu' })).toHaveCount(0);
  expect(adapter.received).toEqual([]);
  expect(errors).toEqual([]);
});

test.describe('with the SMTP listener', () => {
  test.use({ sbArgs: ['--smtp-addr', '127.0.0.1:0'] });

  test('an email customer: the admin connects the channel to an SMTP relay, the mail reaches the desk and the reply goes out in its thread', async ({ browser, sb, relay }) => {
    expect(sb.smtpAddr).toMatch(/^127\.0\.0\.1:[0-9]+$/);
    const admin = await newPage(browser);
    const adminErrors = pageErrors(admin);
    await signIn(admin, sb, 'admin');
    await admin.getByTestId('nav-admin').click();
    const body = admin.getByTestId('admin');
    await body.getByTestId('admin-tab-channels').click();

    // The channel, in the channels form.
    const form = body.locator('form').filter({ has: admin.getByRole('heading', { name: 'New channel' }) });
    await form.getByLabel('Id', { exact: true }).fill('mail');
    await form.getByLabel('Kind', { exact: true }).fill('email');
    await form.getByLabel('Name', { exact: true }).fill('Email');
    await form.getByLabel('Default group').selectOption('general');
    await form.getByRole('button', { name: 'Save' }).click();
    const mailRow = body.locator('[data-testid="channel-row"][data-channel="mail"]');
    await expect(mailRow).toContainText('email');
    await expect(mailRow.getByTestId('channel-adapter-kind')).toHaveText('—');

    // Its adapter: the support address and the relay (no TLS, no sign-in).
    const section = body.getByTestId('channel-adapter');
    await expect(section.getByRole('heading', { name: 'Adapter of Email' })).toBeVisible();
    await expect(section).toContainText('No adapter: the channel takes no messages yet.');
    await section.getByLabel('Adapter kind').selectOption({ label: 'Email' });
    await section.getByLabel('Support address').fill('support@example.com');
    await section.getByLabel('From name (optional)').fill('Example Support');
    await section.getByLabel('SMTP relay').fill('127.0.0.1');
    await section.getByLabel('SMTP port (optional)').fill(String(relay.port));
    await section.getByLabel('Connection security').selectOption({ label: 'None' });
    await expect(section.getByLabel('SMTP user name (optional)')).toHaveValue('');
    await expect(section.getByLabel('SMTP password')).toHaveValue('');
    await section.getByRole('button', { name: 'Connect' }).click();
    await expect(section.getByRole('status')).toHaveText('Connected.');
    await expect(section.getByRole('alert')).toHaveCount(0);
    const current = section.getByTestId('adapter-current');
    await expect(current).toHaveAttribute('data-kind', 'email');
    await expect(current.getByTestId('adapter-current-address')).toHaveText('support@example.com');
    await expect(current.getByTestId('adapter-current-display-name')).toHaveText('Example Support');
    await expect(current.getByTestId('adapter-current-smtp-host')).toHaveText('127.0.0.1');
    await expect(current.getByTestId('adapter-current-smtp-port')).toHaveText(String(relay.port));
    await expect(current.getByTestId('adapter-current-smtp-security')).toHaveText('None');
    await expect(current.getByTestId('adapter-current-smtp-username')).toHaveText('—');
    // No password was given: none is shown, masked or not.
    await expect(current.getByTestId('adapter-current-smtp-password')).toHaveText('—');
    await expect(section.getByTestId('adapter-inbound-hint')).toContainText('Mail to support@example.com comes in through');
    await expect(section.getByTestId('adapter-webhook-path')).toHaveCount(0);
    await expect(mailRow.getByTestId('channel-adapter-kind')).toHaveText('Email');
    await current.scrollIntoViewIfNeeded();
    await shot(admin, '67-admin-adapter-email');
    expect(relay.mails).toEqual([]);

    const alice = await newPage(browser);
    const aliceErrors = pageErrors(alice);
    await signIn(alice, sb, 'alice');
    await goOnline(alice);

    // Anna's mail reaches the node's SMTP listener, as her mail server would send it.
    const mail = [
      'From: Anna <anna@example.org>',
      'To: <support@example.com>',
      'Subject: Card blocked',
      'Message-ID: <m1@example.org>',
      'MIME-Version: 1.0',
      'Content-Type: text/plain; charset=utf-8',
      '',
      'My card was blocked at the checkout. Can you unblock it?',
      '.',
    ].join('\r\n');
    const answers = await smtpSession(sb.smtpAddr!, ['EHLO mx.example.org', 'MAIL FROM:<anna@example.org>', 'RCPT TO:<support@example.com>', 'DATA', mail, 'QUIT']);
    expect(answers.map((a) => a.slice(0, 3))).toEqual(['220', '250', '250', '250', '354', '250', '221']);
    const taken = /Taken in conversation ([0-9]+)/.exec(answers[5]);
    expect(taken, answers[5]).not.toBeNull();
    const conv = Number(taken![1]);

    const offer = alice.getByTestId('offer');
    await expect(offer).toHaveAttribute('data-conversation', String(conv));
    await expect(offer.getByTestId('offer-channel')).toHaveText('mail');
    await offer.getByTestId('offer-accept').click();
    const view = alice.getByTestId('conversation-view');
    await expect(view).toHaveAttribute('data-conv', String(conv));
    await expect(view.getByTestId('conversation-title')).toContainText('Anna');
    await expect(view.getByTestId('channel-badge')).toHaveText('Channel: Email · mail:anna@example.org');
    await expect(view.getByTestId('message').filter({ hasText: 'My card was blocked at the checkout. Can you unblock it?' })).toHaveCount(1);

    await alice.getByTestId('composer-input').fill('Hello Anna, your card is unblocked now.');
    await alice.getByTestId('composer-input').press('Enter');
    const reply = view.getByTestId('message').filter({ hasText: 'Hello Anna, your card is unblocked now.' });
    await expect(reply).toHaveCount(1);
    // The relay takes it once: from the support address to Anna, in her mail's thread.
    await expect.poll(() => relay.mails.length, { timeout: 20_000 }).toBe(1);
    await expect(reply.getByTestId('delivery')).toHaveAttribute('data-status', 'sent');
    const sent = relay.mails[0];
    expect([sent.from, sent.to]).toEqual(['support@example.com', ['anna@example.org']]);
    const split = sent.data.indexOf('\r\n\r\n');
    expect(split).toBeGreaterThan(0);
    const headers = sent.data.slice(0, split).split('\r\n');
    expect(headers).toContain('Subject: Re: Card blocked');
    expect(headers).toContain('In-Reply-To: <m1@example.org>');
    expect(headers).toContain('To: <anna@example.org>');
    expect(headers.find((h) => h.startsWith('From: '))).toMatch(/^From: "?Example Support"? <support@example\.com>$/);
    expect(headers).toContain('Content-Type: text/plain; charset=utf-8');
    expect(headers).toContain('Content-Transfer-Encoding: base64');
    const text = Buffer.from(sent.data.slice(split + 4).replace(/\s+/g, ''), 'base64').toString('utf8');
    expect(text).toContain('Hello Anna, your card is unblocked now.');
    await shot(alice, '68-channel-email-desk');

    expect(adminErrors).toEqual([]);
    expect(aliceErrors).toEqual([]);
  });
});
