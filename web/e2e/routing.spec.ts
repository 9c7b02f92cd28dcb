/**
 * Rules 5 in the browser: the admin sets a group's wrap-up and a priority by customer
 * attribute; the supervisor's floor shows a VIP's priority at the head of the queue;
 * the operator's desk counts the wrap-up down after a close and "Ready" ends it.
 */
import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay } from './fixtures';

test('routing settings: a VIP heads the queue with its priority shown; wrap-up holds the next offer until Ready', async ({ browser, sb }) => {
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  const body = admin.getByTestId('admin');
  await body.getByRole('button', { name: 'Edit General questions' }).click();
  const routing = body.getByTestId('group-routing');
  await routing.getByTestId('group-wrap-up').fill('600');
  await routing.getByTestId('add-priority-rule').click();
  const rule = routing.getByTestId('priority-rule');
  await rule.getByLabel('Attribute').fill('tier');
  await rule.getByLabel('Value').fill('vip');
  await rule.getByLabel('Priority').fill('20');
  await body.getByRole('button', { name: 'Save' }).click();
  await expect(body.getByRole('status')).toContainText('Saved');
  // What would happen to a VIP now: priority 20, and nobody online to take it.
  const preview = body.getByTestId('routing-preview');
  await preview.getByTestId('preview-group').selectOption('general');
  await preview.getByTestId('preview-attributes').fill('tier=vip');
  await preview.getByTestId('preview-run').click();
  await expect(preview.getByTestId('preview-result')).toContainText('Priority 20');
  await expect(preview.locator('[data-testid="preview-candidate"][data-operator="alice"]')).toContainText('offline');

  // Two visitors wait; a third, a VIP (its site passes the attribute), comes last.
  for (const text of ['first in line', 'second in line']) {
    const client = await newPage(browser);
    await openWidget(client, sb);
    await widgetSay(client, text);
  }
  const vip = await newPage(browser);
  await vip.goto(sb.publicUrl + '/');
  const vipConv = await vip.evaluate(async (url) => {
    const ws = new WebSocket(url.replace('http', 'ws') + '/ws/client');
    await new Promise((ok) => (ws.onopen = ok));
    ws.send(JSON.stringify({ type: 'start', name: 'Victoria', attributes: { tier: 'vip' } }));
    const started: any = await new Promise((ok) => (ws.onmessage = (m) => ok(JSON.parse(m.data))));
    return started.conversation as number;
  }, sb.publicUrl);

  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const head = sup.locator('[data-testid="queue-row"][data-group="general"]').getByTestId('queued-conv').first();
  await expect(head).toHaveAttribute('data-conv', String(vipConv));
  await expect(head.getByTestId('queued-priority')).toHaveText('P20');

  // Alice takes the VIP first, closes, and wraps up: no offer until she is ready.
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  await expect(alice.getByTestId('offer').first()).toHaveAttribute('data-conversation', String(vipConv));
  await alice.getByTestId('offer-accept').first().click();
  await expect(alice.getByTestId('offer')).toHaveCount(1);
  await alice.getByTestId('offer-accept').click();
  await expect(alice.getByTestId('conv-item')).toHaveCount(2);
  await alice.locator('[data-testid="conv-item"][data-conv="' + vipConv + '"]').click();
  await alice.getByTestId('close-button').click();
  await alice.getByTestId('close-resolution').selectOption('solved');
  await alice.getByTestId('close-submit').click();
  const wrap = alice.getByTestId('wrap-up');
  await expect(wrap).toBeVisible();
  await expect(wrap).toContainText(/9:\d\d|10:00/);
  await alice.waitForTimeout(1500);
  await expect(alice.getByTestId('offer')).toHaveCount(0);
  await expect(sup.locator('[data-testid="operator-row"][data-operator="alice"]').getByTestId('operator-wrap-up')).toBeVisible();
  await alice.getByTestId('wrap-up-ready').click();
  await expect(wrap).toHaveCount(0);
  await expect(alice.getByTestId('offer')).toHaveCount(1);
});
