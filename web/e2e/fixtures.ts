import { test as base, expect, type Browser, type BrowserContext, type Page } from '@playwright/test';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { startServer, WEB_ROOT, type Server } from './harness';

export const SHOTS = resolve(WEB_ROOT, 'test-results/screenshots');
mkdirSync(SHOTS, { recursive: true });

/** The browser contexts a test opened (`newPage`): closed when it ends, so that pages of
 *  finished tests (reconnecting to a server that is gone, re-rendering their clocks)
 *  do not load the machine for the tests after them. */
const opened: BrowserContext[] = [];

export const test = base.extend<{ sb: Server; sbArgs: string[]; closeContexts: void }>({
  /** Extra arguments of `switchboard dev` (`test.use({ sbArgs: [...] })`). */
  sbArgs: [[], { option: true }],
  closeContexts: [
    async ({}, use) => {
      await use();
      for (const ctx of opened.splice(0)) await ctx.close().catch(() => {});
    },
    { auto: true },
  ],
  sb: async ({ sbArgs }, use, testInfo) => {
    const sb = await startServer({ extraArgs: sbArgs });
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
  opened.push(ctx);
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

const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

/** The page's axe-core violations, one line each (none: an empty list). */
export async function audit(page: Page, name: string): Promise<string[]> {
  // Evaluated through the devtools protocol: the pages' Content-Security-Policy (rightly)
  // refuses an inline <script> tag.
  await page.evaluate(AXE);
  const result = await page.evaluate(async () => {
    const axe = (window as any).axe;
    const r = await axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v: any) => ({ id: v.id, impact: v.impact, nodes: v.nodes.map((n: any) => n.target.join(' ')).slice(0, 5) }));
  });
  return result.map((v: any) => `${name}: ${v.id} (${v.impact}) at ${v.nodes.join(' | ')}`);
}

/** A REST call on the server's real private listener, with a staff or channel token. */
export async function rest(sb: Server, method: string, path: string, token: string | null, body?: unknown): Promise<{ status: number; body: any }> {
  const headers: Record<string, string> = {};
  if (token) headers.Authorization = 'Bearer ' + token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(sb.realPrivate + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

/** A staff login's token, signed in over REST. */
export async function staffToken(sb: Server, login: string): Promise<string> {
  const r = await rest(sb, 'POST', '/api/login', null, { login, password: sb.logins[login] });
  expect(r.status).toBe(200);
  return r.body.token;
}

/** Errors thrown in the page, to be none. */
export function pageErrors(page: Page): string[] {
  const errors: string[] = [];
  page.on('pageerror', (e) => errors.push(e.message));
  return errors;
}
