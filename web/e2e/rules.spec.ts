/**
 * Rules 6 in the browser: the admin gives a group a relaxation step (after 2 s, overflow
 * to another group) and the preview, the floor and the offer follow it; working hours
 * that are closed now answer the widget before the customer writes; a channel weight set
 * in the operators section is what the API reads back.
 */
import type { Browser, Page } from '@playwright/test';
import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay } from './fixtures';
import type { Server } from './harness';

/** An admin bearer token, for reading settings back through the REST API. */
async function adminToken(page: Page, sb: Server): Promise<string> {
  const login = await page.request.post(sb.privateUrl + '/api/login', { data: { login: 'admin', password: sb.logins.admin } });
  expect(login.ok()).toBeTruthy();
  return (await login.json()).token;
}

/** Signs the admin in and opens the administration screen. */
async function adminScreen(browser: Browser, sb: Server) {
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  return { admin, body: admin.getByTestId('admin') };
}

test('a relaxation step: after 2 s a general conversation is also offered to Technical support, as the preview says', async ({ browser, sb }) => {
  const { admin, body } = await adminScreen(browser, sb);
  await body.getByRole('button', { name: 'Edit General questions' }).click();
  const steps = body.getByRole('group', { name: 'Relaxation steps' });
  await steps.getByRole('button', { name: 'Add step' }).click();
  const step = steps.getByRole('group', { name: 'Step 1' });
  await step.getByLabel('From (seconds of waiting)').fill('2');
  await step.getByLabel('Technical support').check();
  await body.getByRole('button', { name: 'Save' }).click();
  await expect(body.getByRole('status')).toContainText('Saved');

  // The preview lists every step: Carol (Technical support only) is a candidate from
  // step 1 on, never at step 0.
  const preview = body.getByTestId('routing-preview');
  await preview.getByLabel('Group').selectOption('general');
  await preview.getByRole('button', { name: 'Preview' }).click();
  const step0 = preview.locator('[data-testid="preview-step"][data-step="0"]');
  const step1 = preview.locator('[data-testid="preview-step"][data-step="1"]');
  await expect(step0).toContainText('Step 0 · on arrival');
  await expect(step1).toContainText('Step 1 · after 0:02 of waiting');
  await expect(step1.locator('[data-testid="preview-candidate"][data-operator="carol"]')).toContainText('offline');
  await expect(step0.locator('[data-testid="preview-candidate"][data-operator="carol"]')).toHaveCount(0);
  await expect(step0.locator('[data-testid="preview-candidate"][data-operator="alice"]')).toHaveCount(1);

  // Read back after a reload: the step is what the server keeps.
  await admin.reload();
  await admin.getByTestId('nav-admin').click();
  await body.getByRole('button', { name: 'Edit General questions' }).click();
  const saved = body.getByRole('group', { name: 'Relaxation steps' }).getByRole('group', { name: 'Step 1' });
  await expect(saved.getByLabel('From (seconds of waiting)')).toHaveValue('2');
  await expect(saved.getByLabel('Technical support')).toBeChecked();

  // A customer waits in General questions; nobody of it is online. Carol (Technical
  // support) goes online and is offered it once it reaches step 1.
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'My router keeps restarting');
  const carol = await newPage(browser);
  await signIn(carol, sb, 'carol');
  await goOnline(carol);
  await expect(carol.getByTestId('offer')).toHaveCount(1);
  // The floor shows it at step 1, the last (no countdown to a next one); the decision
  // record says which step made the offer.
  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const queued = sup.locator('[data-testid="queue-row"][data-group="general"]').getByTestId('queued-conv');
  await expect(queued.getByTestId('queued-step')).toHaveAttribute('data-step', '1');
  await expect(queued.getByTestId('queued-step')).toContainText('step 1');
  await expect(queued.getByTestId('queued-next-step')).toHaveCount(0);
  await queued.click();
  await expect(sup.getByTestId('decisions').getByTestId('decision-step').first()).toHaveAttribute('data-step', '1');
});

test('working hours closed now: the widget shows the group\'s message before the customer writes, and the floor says closed', async ({ browser, sb }) => {
  const { body } = await adminScreen(browser, sb);
  await body.getByRole('button', { name: 'Edit General questions' }).click();
  const hours = body.getByRole('group', { name: 'Working hours' });
  await hours.getByLabel('Open only at set hours').check();
  await hours.getByLabel('Time zone').fill('UTC');
  // No weekly hours at all, and today (UTC) a holiday: closed now either way.
  await hours.getByLabel('Weekly hours').fill('');
  await hours.getByLabel('Holidays and special days').fill(new Date().toISOString().slice(0, 10));
  // A label that wraps a select takes the selected option's text into its name.
  await hours.getByRole('combobox', { name: /^Outside working hours/ }).selectOption('reply');
  await hours.getByLabel('Message shown outside working hours').fill('We are closed today. Write to help@example.com.');
  await body.getByRole('button', { name: 'Save' }).click();
  await expect(body.getByRole('status')).toContainText('Saved');
  await expect(hours.getByTestId('hours-status')).toHaveAttribute('data-open', 'false');

  const preview = body.getByTestId('routing-preview');
  await preview.getByLabel('Group').selectOption('general');
  await preview.getByRole('button', { name: 'Preview' }).click();
  await expect(preview.getByTestId('preview-closed')).toContainText('closed now');

  // The customer sees the message on opening, before writing anything.
  const client = await newPage(browser);
  await openWidget(client, sb);
  const closed = client.getByTestId('widget-closed');
  await expect(closed).toContainText('We are closed today. Write to help@example.com.');
  await expect(closed).toHaveAttribute('data-action', 'reply');
  await expect(client.getByTestId('widget-message')).toHaveCount(0);

  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const badge = sup.locator('[data-testid="queue-row"][data-group="general"]').getByTestId('queue-hours');
  await expect(badge).toHaveAttribute('data-open', 'false');
  await expect(badge).toContainText('closed');
  await expect(sup.locator('[data-testid="queue-row"][data-group="billing"]').getByTestId('queue-hours')).toHaveCount(0);
});

test('a channel weight set next to the operators is what GET /api/routing/weights reads back', async ({ browser, sb }) => {
  const { admin, body } = await adminScreen(browser, sb);
  await body.getByTestId('admin-tab-operators').click();
  const weights = body.getByTestId('channel-weights-form');
  const input = weights.getByLabel('Capacity one conversation takes, by channel kind');
  // Out of range: refused in the form, nothing sent.
  await input.fill('email=0');
  await weights.getByRole('button', { name: 'Save' }).click();
  await expect(weights.getByRole('alert')).toContainText('from 1 to 100');
  await input.fill('email=2');
  await weights.getByRole('button', { name: 'Save' }).click();
  await expect(weights.getByRole('status')).toContainText('Saved');

  const token = await adminToken(admin, sb);
  const read = await admin.request.get(sb.privateUrl + '/api/routing/weights', { headers: { authorization: 'Bearer ' + token } });
  expect(read.ok()).toBeTruthy();
  expect((await read.json()).weights).toMatchObject({ email: 2 });

  // And the form shows it again after a reload.
  await admin.reload();
  await admin.getByTestId('nav-admin').click();
  await body.getByTestId('admin-tab-operators').click();
  await expect(body.getByTestId('channel-weights-form').getByLabel('Capacity one conversation takes, by channel kind')).toHaveValue('email=2');
});
