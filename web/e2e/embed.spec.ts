/** The widget on a third-party site: one script tag pointing at the chat server. */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test as base } from '@playwright/test';
import { expect, newPage, signIn, goOnline, shot } from './fixtures';
import { startServer, type Server } from './harness';

// The "shop" is another origin (another port) on loopback: a public test host would be
// refused by Chromium's local-network protection when loading from 127.0.0.1.
const test = base.extend<{ shop: { origin: string; setScript: (src: string) => void }; sb: Server }>({
  shop: async ({}, use) => {
    let script = '';
    const server = http.createServer((_req, res) => {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      res.end(`<!doctype html><html lang="en"><head><title>Shop</title></head><body><h1>Shop</h1><p>Product 42</p><script src="${script}" async></script></body></html>`);
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
    const origin = 'http://127.0.0.1:' + (server.address() as AddressInfo).port;
    await use({ origin, setScript: (src) => (script = src) });
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
