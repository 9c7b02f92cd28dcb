/**
 * The desk and floor of a full shift (issue 12, second part): internal notes only staff
 * see, my recently closed conversations and a search over them, the floor using the full
 * width with today's KPIs and an inspector the socket keeps current, a reassign form that
 * starts over, and admin forms that make an operator's login in the same step, keep a
 * password on edit, take seconds and show names.
 */
import type { Page } from '@playwright/test';
import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay, shot, rest, staffToken } from './fixtures';
import type { Server } from './harness';

/** Alice, online, takes the conversation a new widget visitor opens with `text`. */
async function aliceTakes(browser: any, sb: Server, text: string): Promise<{ alice: Page; client: Page; convId: string }> {
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, text);
  await alice.getByTestId('offer-accept').click();
  const convId = (await alice.getByTestId('conversation-view').getAttribute('data-conv'))!;
  return { alice, client, convId };
}

test('an internal note stays with staff; a closed conversation is found again and opens read-only', async ({ browser, sb }) => {
  const { alice, client, convId } = await aliceTakes(browser, sb, 'My parcel 7731 is late');
  const pane = alice.getByTestId('conversation-view');

  // A note from the composer: shown on the desk as a note, never in the widget.
  await alice.getByTestId('note-mode').check();
  await expect(alice.locator('.composer')).toHaveAttribute('data-mode', 'note');
  await alice.getByTestId('composer-input').fill('Courier confirmed a delay of one day');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(pane.getByTestId('entry-note')).toContainText('Courier confirmed a delay of one day');
  await alice.getByTestId('note-mode').uncheck();
  await alice.getByTestId('composer-input').fill('It arrives tomorrow.');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(client.getByTestId('widget-message').filter({ hasText: 'It arrives tomorrow.' })).toHaveCount(1);
  await expect(client.getByText('Courier confirmed')).toHaveCount(0);
  // Reloaded, the widget replays the history from the server: still no note.
  await client.reload();
  await expect(client.getByTestId('widget-message').filter({ hasText: 'It arrives tomorrow.' })).toHaveCount(1);
  await expect(client.getByText('Courier confirmed')).toHaveCount(0);
  await shot(alice, '30-desk-internal-note');

  // Closed, it is in the recently closed list, with its last message as preview.
  await alice.getByTestId('close-button').click();
  await alice.getByTestId('close-resolution').selectOption('solved');
  await alice.getByTestId('close-submit').click();
  await expect(alice.getByTestId('conv-item')).toHaveCount(0);
  const item = alice.locator('[data-testid="history-item"][data-conv="' + convId + '"]');
  await expect(item).toBeVisible();
  await expect(item).toHaveAttribute('data-state', 'closed');
  await expect(item).toContainText('It arrives tomorrow.');

  // Search finds it by a word the customer wrote, and by what the note said.
  await alice.getByTestId('history-search').fill('7731');
  await alice.getByTestId('history-search').press('Enter');
  await expect(alice.getByTestId('history-item')).toHaveCount(1);
  await alice.getByTestId('history-search').fill('courier');
  await alice.getByTestId('history-search').press('Enter');
  await expect(alice.locator('[data-testid="history-item"][data-conv="' + convId + '"]')).toHaveCount(1);
  await alice.getByTestId('history-search').fill('no such words anywhere');
  await alice.getByTestId('history-search').press('Enter');
  await expect(alice.getByTestId('history-item')).toHaveCount(0);
  await expect(alice.getByText('Nothing found.')).toBeVisible();

  // Reopened read-only: the history, the note, no composer; a note can still be added.
  await alice.getByTestId('history-search').fill('');
  await alice.getByTestId('history-item').first().click();
  const dialog = alice.getByTestId('history-dialog');
  await expect(dialog.getByTestId('inspector-log').getByTestId('message').filter({ hasText: 'My parcel 7731 is late' })).toHaveCount(1);
  await expect(dialog.getByTestId('entry-note')).toHaveCount(1);
  await expect(dialog.getByTestId('composer-input')).toHaveCount(0);
  await dialog.getByTestId('note-input').fill('Customer called: parcel arrived');
  await dialog.getByTestId('note-submit').click();
  await expect(dialog.getByTestId('entry-note')).toHaveCount(2);
  await shot(alice, '31-desk-closed-read-only');
  await alice.keyboard.press('Escape');

  // The customer comes back: the new conversation's card lists the old one, and a search
  // over the customer's conversations finds it by what was said there.
  await client.getByTestId('widget-star-5').check({ force: true });
  await client.getByTestId('widget-rate-submit').click();
  await client.getByTestId('widget-new-chat').click();
  await widgetSay(client, 'Now a different question');
  await alice.getByTestId('offer-accept').click();
  const card = alice.getByTestId('client-card');
  await expect(card.getByTestId('earlier-list').getByRole('button', { name: '#' + convId })).toBeVisible();
  await card.getByTestId('earlier-search').fill('parcel 7731');
  await card.getByTestId('earlier-search').press('Enter');
  await expect(card.getByTestId('earlier-preview')).toContainText('It arrives tomorrow.');
  await card.getByTestId('earlier-search').fill('mortgage');
  await card.getByTestId('earlier-search').press('Enter');
  await expect(card.getByTestId('earlier-list').getByRole('button')).toHaveCount(0);
  await expect(card.getByText('Nothing found.')).toBeVisible();
});

test('the floor uses the full width, shows today per group, and its inspector follows the socket', async ({ browser, sb }) => {
  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const floor = sup.getByTestId('floor');
  await expect(floor).toHaveAttribute('data-layout', 'wide');
  const queues = await sup.getByTestId('queues-table').boundingBox();
  const whole = await floor.boundingBox();
  expect(queues!.width).toBeGreaterThan(whole!.width * 0.9);

  const { alice, client, convId } = await aliceTakes(browser, sb, 'Hello from the floor test');
  await expect(sup.getByTestId('floor-source')).toHaveAttribute('data-source', 'socket');
  await sup.locator('[data-testid="operator-row"][data-operator="alice"]').getByRole('button', { name: '#' + convId }).click();
  await expect(floor).toHaveAttribute('data-layout', 'split');
  const insp = sup.getByTestId('inspector');
  await expect(insp.getByTestId('inspector-live')).toHaveAttribute('data-source', 'socket');
  // No polling: the socket announces the message and the inspector re-reads at once.
  const reads: number[] = [];
  sup.on('request', (r) => {
    if (new URL(r.url()).pathname === '/api/conversations/' + convId) reads.push(Date.now());
  });
  await sup.waitForTimeout(4500);
  expect(reads.length, 'an idle inspector does not poll').toBe(0);
  await widgetSay(client, 'Second question, live');
  await expect(insp.getByTestId('inspector-log').getByTestId('message').filter({ hasText: 'Second question, live' })).toHaveCount(1, { timeout: 3000 });

  // The reassign form starts over after use.
  const bob = await newPage(browser);
  await signIn(bob, sb, 'bob');
  await goOnline(bob);
  const form = insp.getByTestId('reassign-form');
  await form.getByTestId('reassign-target').selectOption('bob');
  await form.getByLabel('Comment').fill('Bob takes it');
  await form.getByTestId('reassign-submit').click();
  await expect(insp.getByTestId('inspector-state')).toContainText('bob');
  await expect(form.getByTestId('reassign-target')).toHaveValue('');
  await expect(form.getByLabel('Comment')).toHaveValue('');

  // Bob closes it and the customer rates: today's figures say so.
  await bob.getByTestId('close-button').click();
  await bob.getByTestId('close-resolution').selectOption('solved');
  await bob.getByTestId('close-submit').click();
  await client.getByTestId('widget-star-4').check({ force: true });
  await client.getByTestId('widget-rate-submit').click();
  await expect(client.getByTestId('widget-done')).toBeVisible();
  const general = sup.locator('[data-testid="kpi-row"][data-group="general"]');
  await expect(general.getByTestId('kpi-handled')).toHaveText('1', { timeout: 20_000 });
  await expect(general.getByTestId('kpi-csat')).toContainText('4.0', { timeout: 20_000 });
  await expect(general.getByTestId('kpi-sl')).toHaveText('100%');
  await shot(sup, '32-floor-kpis');

  await sup.getByTestId('inspector-close').click();
  await expect(floor).toHaveAttribute('data-layout', 'wide');
  await alice.close();
});

test('admin forms: an operator and their login in one step, edits without a password, seconds and names', async ({ browser, sb }) => {
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  const body = admin.getByTestId('admin');

  // Timeouts in seconds; the id is fixed once the group exists.
  await body.getByLabel('Id', { exact: true }).fill('loans');
  await body.getByLabel('Name', { exact: true }).fill('Loans desk');
  await body.getByLabel('Offer timeout (seconds)').fill('45');
  await body.getByRole('button', { name: 'Save' }).click();
  await expect(body.getByTestId('groups-table')).toContainText('45 s');
  await expect(body.getByTestId('group-id')).toHaveAttribute('readonly', '');

  // An operator with their login, made in one step; the table names the group.
  await body.getByTestId('admin-tab-operators').click();
  await body.getByTestId('operator-id').fill('erin');
  await body.getByTestId('operator-name').fill('Erin');
  await body.getByLabel('Loans desk').check();
  await body.getByTestId('operator-password').fill('erin-password-1');
  await body.getByTestId('operator-save').click();
  const row = body.locator('[data-testid="operator-admin-row"][data-operator="erin"]');
  await expect(row.getByTestId('operator-groups')).toHaveText('Loans desk');
  await expect(body.getByTestId('operator-id')).toHaveAttribute('readonly', '');
  const erin = await newPage(browser);
  await signIn(erin, { ...sb, logins: { ...sb.logins, erin: 'erin-password-1' } }, 'erin');
  await expect(erin.getByTestId('desk')).toBeVisible();

  // Her login's role and groups change without the password being typed again.
  await body.getByTestId('admin-tab-users').click();
  await body.getByRole('button', { name: 'Edit erin' }).click();
  const form = body.getByTestId('user-form');
  await expect(form.getByTestId('user-login')).toHaveAttribute('readonly', '');
  await form.getByTestId('user-skills').getByLabel('General questions').check();
  await form.getByLabel('Role').selectOption('supervisor');
  await form.getByRole('button', { name: 'Save' }).click();
  await expect(form.getByRole('status')).toContainText('Saved');
  await expect(body.locator('[data-testid="user-row"][data-login="erin"]')).toContainText('Supervisor');
  const again = await newPage(browser);
  await signIn(again, { ...sb, logins: { ...sb.logins, erin: 'erin-password-1' } }, 'erin');
  await body.getByTestId('admin-tab-operators').click();
  await expect(body.locator('[data-testid="operator-admin-row"][data-operator="erin"]').getByTestId('operator-groups')).toHaveText(/General questions/);

  // Channels show their group's name.
  await body.getByTestId('admin-tab-channels').click();
  await expect(body.getByTestId('channels-table').getByTestId('channel-group').first()).toHaveText('General questions');
});

test('a break is taken for a configured reason, which the floor shows and counts', async ({ browser, sb }) => {
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  await admin.getByTestId('admin-tab-operators').click();
  const form = admin.getByTestId('pause-reasons-form');
  await form.getByTestId('pause-reasons-input').fill('Lunch\nTraining\n\nCoaching');
  await form.getByTestId('pause-reasons-save').click();
  await expect(form.getByRole('status')).toContainText('Saved');
  await expect(form.getByTestId('pause-reasons-input')).toHaveValue('Lunch\nTraining\nCoaching');

  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  await alice.getByTestId('presence-break').click();
  await expect(alice.getByTestId('break-reason')).toHaveCount(3);
  await alice.getByTestId('break-reason').filter({ hasText: 'Training' }).click();
  await expect(alice.getByTestId('presence-current')).toHaveAttribute('data-presence', 'break');
  await expect(alice.getByTestId('break-current')).toContainText('Training');

  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const row = sup.locator('[data-testid="operator-row"][data-operator="alice"]');
  await expect(row.getByTestId('operator-presence-reason')).toContainText('Training');
  await expect(sup.locator('[data-testid="pause-row"][data-operator="alice"]')).toContainText('Training');
});

test('an emergency notice from the floor: the widget shows it before the customer writes, then it is switched off', async ({ browser, sb }) => {
  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const panel = sup.getByTestId('emergency-panel');
  await panel.getByTestId('emergency-target').selectOption('channel:web');
  await panel.getByTestId('emergency-message').fill('Card payments are down; we are fixing it.');
  await panel.getByTestId('emergency-on').click();
  await expect(panel.getByTestId('emergency-active')).toContainText('Card payments are down');

  const client = await newPage(browser);
  await openWidget(client, sb);
  await expect(client.getByTestId('widget-emergency')).toContainText('Card payments are down');
  await widgetSay(client, 'Is my card blocked?');
  await expect(client.getByTestId('widget-entry-notice')).toContainText('Card payments are down');
  await shot(client, '33-widget-emergency');

  await panel.getByTestId('emergency-off').click();
  await expect(panel.getByTestId('emergency-active')).toHaveCount(0);
  const later = await newPage(browser);
  await openWidget(later, sb);
  await expect(later.getByTestId('widget-input')).toBeVisible();
  await expect(later.getByTestId('widget-emergency')).toHaveCount(0);
});

test('an address range on the block list keeps the widget out with the channel\'s text, until the rule is removed', async ({ browser, sb }) => {
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  await admin.getByTestId('admin-tab-channels').click();
  const body = admin.getByTestId('admin');
  await body.getByRole('button', { name: /^Edit / }).first().click();
  await body.getByTestId('channel-blocked-message').fill('Please call us at 0800 000 000.');
  await body.getByRole('button', { name: 'Save' }).first().click();
  await expect(body.getByRole('status').first()).toContainText('Saved');
  const rules = body.getByTestId('access-rules');
  await rules.getByTestId('access-value').fill('127.0.0.0/8');
  await rules.getByTestId('access-note').fill('test lab');
  await rules.getByTestId('access-add').click();
  await expect(rules.getByTestId('access-rule')).toHaveCount(1);

  const client = await newPage(browser);
  await openWidget(client, sb);
  await client.getByTestId('widget-input').fill('Hello?');
  await client.getByTestId('widget-input').press('Enter');
  await expect(client.getByText('Please call us at 0800 000 000.')).toBeVisible();

  await rules.getByTestId('access-remove').click();
  await expect(rules.getByTestId('access-rule')).toHaveCount(0);
  const later = await newPage(browser);
  await openWidget(later, sb);
  await widgetSay(later, 'Hello again');
});

test('a supervisor whose sessions an admin ends is back at sign-in, told why, not left on a stale floor', async ({ browser, sb }) => {
  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  await expect(sup.getByTestId('floor')).toBeVisible();
  const admin = await staffToken(sb, 'admin');
  expect((await rest(sb, 'POST', '/api/users/supervisor/end-sessions', admin)).status).toBe(204);
  // The floor's socket is closed with 4001 and its polls get 401: the page signs out.
  await expect(sup.getByTestId('login-submit')).toBeVisible({ timeout: 15_000 });
  await expect(sup.getByTestId('notice').filter({ hasText: 'Your session has ended' })).toBeVisible();
  await expect(sup.getByTestId('floor')).toHaveCount(0);
});
