/** Automated accessibility checks (axe-core) on the main screens, widget included. */
import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay, audit } from './fixtures';

test('main screens have no axe violations', async ({ browser, sb }) => {
  const problems: string[] = [];
  const alice = await newPage(browser);
  await alice.goto(sb.privateUrl + '/');
  problems.push(...(await audit(alice, 'login')));
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Hello there');
  await expect(alice.getByTestId('offer')).toHaveCount(1);
  problems.push(...(await audit(alice, 'desk with offer')));
  await alice.getByTestId('offer-accept').click();
  await expect(alice.getByTestId('conversation-view')).toBeVisible();
  await alice.getByTestId('tab-templates').click();
  await expect(alice.getByTestId('template').first()).toBeVisible();
  problems.push(...(await audit(alice, 'desk with conversation')));
  await alice.getByTestId('transfer-button').click();
  problems.push(...(await audit(alice, 'transfer dialog')));
  problems.push(...(await audit(client, 'widget')));
  // A second visitor waits, so the floor lists a queued conversation.
  const second = await newPage(browser);
  await openWidget(second, sb);
  await widgetSay(second, 'Anyone?');
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await expect(admin.getByTestId('queues-table')).toBeVisible();
  await expect(admin.getByTestId('queued-conv')).toHaveCount(1);
  problems.push(...(await audit(admin, 'floor')));
  await admin.getByTestId('queued-conv').click();
  await expect(admin.getByTestId('inspector').getByTestId('decisions')).toBeVisible();
  problems.push(...(await audit(admin, 'floor with inspector')));
  await admin.getByTestId('nav-admin').click();
  problems.push(...(await audit(admin, 'admin')));
  await admin.getByTestId('admin-tab-users').click();
  await expect(admin.getByTestId('user-row').first()).toBeVisible();
  problems.push(...(await audit(admin, 'admin users')));
  expect(problems).toEqual([]);
});
