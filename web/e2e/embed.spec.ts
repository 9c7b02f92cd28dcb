/** The widget on a third-party site: one script tag pointing at the chat server; a site
 *  that logs its customers in passes their identity on that tag (`data-identity`). */
import { createHmac, randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test as base } from '@playwright/test';
import { expect, newPage, signIn, goOnline, shot, rest, staffToken } from './fixtures';
import { startServer, type Server } from './harness';

// The "shop" is another origin (another port) on loopback: a public test host would be
// refused by Chromium's local-network protection when loading from 127.0.0.1.
const test = base.extend<{ shop: { origin: string; setScript: (src: string, attrs?: Record<string, string>) => void }; sb: Server }>({
  shop: async ({}, use) => {
    let script = '';
    let extra = '';
    const server = http.createServer((_req, res) => {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      res.end(`<!doctype html><html lang="en"><head><title>Shop</title></head><body><h1>Shop</h1><p>Product 42</p><script src="${script}"${extra} async></script></body></html>`);
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
    const origin = 'http://127.0.0.1:' + (server.address() as AddressInfo).port;
    const attr = (v: string) => v.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
    await use({
      origin,
      setScript: (src, attrs = {}) => {
        script = src;
        extra = Object.entries(attrs)
          .map(([k, v]) => ` ${k}="${attr(v)}"`)
          .join('');
      },
    });
    server.closeAllConnections();
    await new Promise((ok) => server.close(ok));
  },
  sb: async ({ shop }, use) => {
    const sb = await startServer({ extraArgs: ['--client-origin', shop.origin] });
    try {
      await use(sb);
    } finally {
      await sb.stop();
    }
  },
});

test('a site on another origin embeds the widget with one script tag', async ({ browser, sb, shop }) => {
  const SHOP = shop.origin;
  shop.setScript(sb.publicUrl + '/widget.js');
  const page = await newPage(browser);
  await page.goto(SHOP + '/product/42');
  await page.getByTestId('widget-launcher').click();
  await page.getByTestId('widget-input').fill('Hello from the shop');
  await page.getByTestId('widget-input').press('Enter');
  await expect(page.getByTestId('widget-message').filter({ hasText: 'Hello from the shop' })).toHaveCount(1);
  await expect(page.getByTestId('widget-entry-queued')).toBeVisible();

  // The operator sees it, with the page the visitor was on.
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  await alice.getByTestId('offer-accept').click();
  await expect(alice.getByTestId('client-card')).toContainText(SHOP + '/product/42');
  await alice.getByTestId('composer-input').fill('Welcome to the shop!');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(page.getByTestId('widget-message').filter({ hasText: 'Welcome to the shop!' })).toHaveCount(1);
  // The widget's storage belongs to the shop's origin.
  const stored = await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('switchboard.')).sort());
  expect(stored).toEqual(expect.arrayContaining(['switchboard.widget.session', 'switchboard.widget.visitor']));
  await shot(page, '20-widget-on-another-site');
});

const b64url = (b: Buffer | string) => Buffer.from(b).toString('base64url'); // no padding

/** An HS256 JWT, as the shop's backend would sign it for its logged-in customer. */
function hs256(secret: string, claims: Record<string, unknown>): string {
  const signed = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' })) + '.' + b64url(JSON.stringify(claims));
  return signed + '.' + b64url(createHmac('sha256', secret).update(signed).digest());
}

test('a shop passes its logged-in customer with data-identity, and staff see that customer', async ({ browser, sb, shop }) => {
  const admin = await staffToken(sb, 'admin');
  const secret = randomBytes(20).toString('hex'); // 40 characters
  expect(secret).toHaveLength(40);
  const put = await rest(sb, 'PUT', '/api/channels/web/identity', admin, { alg: 'HS256', secret });
  expect(put.status).toBe(200);
  expect(put.body).toMatchObject({ channel: 'web', alg: 'HS256' });
  expect(put.body.secret).not.toBe(secret); // masked

  const jwt = hs256(secret, { sub: 'cust-42', exp: Math.floor(Date.now() / 1000) + 600 });
  shop.setScript(sb.publicUrl + '/widget.js', { 'data-identity': jwt });
  const page = await newPage(browser);
  const sent: any[] = [];
  page.on('websocket', (ws) => ws.on('framesent', (f) => typeof f.payload === 'string' && sent.push(JSON.parse(f.payload))));
  await page.goto(shop.origin + '/account');
  await page.getByTestId('widget-launcher').click();
  await page.getByTestId('widget-input').fill('Where is my order?');
  await page.getByTestId('widget-input').press('Enter');
  await expect(page.getByTestId('widget-message').filter({ hasText: 'Where is my order?' })).toHaveCount(1);
  expect(sent.find((f) => f.type === 'start')?.identity).toBe(jwt);

  // The token stays in the page's memory: nothing the widget stored holds it.
  const stored = await page.evaluate(() => [localStorage, sessionStorage].flatMap((s) => Object.keys(s).map((k) => s.getItem(k) ?? '')));
  expect(stored.length).toBeGreaterThan(0);
  expect(stored.some((v) => v.includes(jwt))).toBe(false);

  // The conversation's id, as the widget learned it from `started`.
  const conversation = await page.evaluate(() => JSON.parse(localStorage.getItem('switchboard.widget.session') ?? 'null')?.conversation);
  expect(typeof conversation).toBe('number');
  const sup = await staffToken(sb, 'supervisor');
  const conv = await rest(sb, 'GET', '/api/conversations/' + conversation, sup);
  expect(conv.status).toBe(200);
  expect(conv.body.visitor.id).toMatch(/^customer:[0-9a-f]{8}:cust-42$/);
  expect(conv.body.visitor.attributes.identity).toBe('verified');
  expect(conv.body.visitor.attributes.page).toBe(shop.origin + '/account');

  // Another shop page, where the customer logs in after it loaded: the site hands the
  // token to the widget's global, for the conversation they start next.
  shop.setScript(sb.publicUrl + '/widget.js');
  const later = await newPage(browser);
  await later.goto(shop.origin + '/login');
  await expect(later.getByTestId('widget-launcher')).toBeVisible();
  const jwt43 = hs256(secret, { sub: 'cust-43', exp: Math.floor(Date.now() / 1000) + 600 });
  await later.evaluate((t) => (window as any).SwitchboardWidget.identify(t), jwt43);
  await later.getByTestId('widget-launcher').click();
  await later.getByTestId('widget-input').fill('Logged in just now');
  await later.getByTestId('widget-input').press('Enter');
  await expect(later.getByTestId('widget-message').filter({ hasText: 'Logged in just now' })).toHaveCount(1);
  const second = await later.evaluate(() => JSON.parse(localStorage.getItem('switchboard.widget.session') ?? 'null')?.conversation);
  const conv2 = await rest(sb, 'GET', '/api/conversations/' + second, sup);
  expect(conv2.body.visitor.id).toMatch(/^customer:[0-9a-f]{8}:cust-43$/);
  expect(conv2.body.visitor.attributes.identity).toBe('verified');
});
