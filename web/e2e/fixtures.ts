import { test as base, expect, type Browser, type Page } from '@playwright/test';
import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { startServer, WEB_ROOT, type Server } from './harness';

export const SHOTS = resolve(WEB_ROOT, 'test-results/screenshots');
mkdirSync(SHOTS, { recursive: true });

export const test = base.extend<{ sb: Server }>({
  sb: async ({}, use, testInfo) => {
    const sb = await startServer();
    if (sb.shimmed) testInfo.annotations.push({ type: 'note', description: 'the binary does not embed the current web build; served through the test shim' });
    try {
      await use(sb);
    } finally {
      if (testInfo.status !== testInfo.expectedStatus) await testInfo.attach('server.log', { body: sb.log(), contentType: 'text/plain' });
      await sb.stop();
    }
  },
});

export { expect };

/** A separate browser context (own storage, like another person's browser). */
export async function newPage(browser: Browser, lang = 'en-US'): Promise<Page> {
  const ctx = await browser.newContext({ locale: lang });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('[pageerror]', e.message));
  return page;
}

export async function signIn(page: Page, sb: Server, login: string): Promise<void> {
  await page.goto(sb.privateUrl + '/');
  await page.getByTestId('login-input').fill(login);
  await page.getByTestId('password-input').fill(sb.logins[login]);
  await page.getByTestId('login-submit').click();
  await expect(page.getByTestId('whoami')).toContainText(login);
}

export async function goOnline(page: Page): Promise<void> {
  await page.getByTestId('presence-online').click();
  await expect(page.getByTestId('presence-current')).toHaveAttribute('data-presence', 'online');
}

export async function openWidget(page: Page, sb: Server): Promise<void> {
  await page.goto(sb.publicUrl + '/');
  await page.getByTestId('widget-launcher').click();
  await expect(page.getByTestId('widget-panel')).toBeVisible();
}

export async function widgetSay(page: Page, text: string): Promise<void> {
  await page.getByTestId('widget-input').fill(text);
  await page.getByTestId('widget-input').press('Enter');
  await expect(page.getByTestId('widget-message').filter({ hasText: text })).toHaveCount(1);
}

export async function shot(page: Page, name: string): Promise<void> {
  await page.screenshot({ path: resolve(SHOTS, name + '.png') });
}
