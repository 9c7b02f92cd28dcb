/**
 * Presence follows the person (issue 10): with a 2-second grace period, an operator
 * whose desk closed is set away; their next desk says why until they act, and the
 * supervisor's floor shows the reason.
 */
import { test as base, expect, newPage, signIn, goOnline, openWidget, widgetSay } from './fixtures';
import { startServer, type Server } from './harness';

const test = base.extend<{ sb: Server }>({
  sb: async ({}, use) => {
    const sb = await startServer({ extraArgs: ['--presence-grace-s', '2'] });
    try {
      await use(sb);
    } finally {
      await sb.stop();
    }
  },
});

test('a desk closed for longer than the grace period is set away, and both desk and floor say why', async ({ browser, sb }) => {
  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const row = sup.locator('[data-testid="operator-row"][data-operator="alice"]');
  await expect(row.getByTestId('operator-presence')).toHaveAttribute('data-presence', 'online');

  await alice.context().close();
  await expect(row.getByTestId('operator-presence')).toHaveAttribute('data-presence', 'away', { timeout: 15_000 });
  await expect(row.getByTestId('operator-presence-reason')).toHaveAttribute('data-reason', 'disconnected');

  const back = await newPage(browser);
  await signIn(back, sb, 'alice');
  await expect(back.getByTestId('presence-current')).toHaveAttribute('data-presence', 'away');
  await expect(back.getByTestId('disconnected-banner')).toBeVisible();
  await back.getByTestId('disconnected-go-online').click();
  await expect(back.getByTestId('presence-current')).toHaveAttribute('data-presence', 'online');
  await expect(back.getByTestId('disconnected-banner')).toHaveCount(0);
  await expect(row.getByTestId('operator-presence-reason')).toHaveCount(0);
});

test('going offline while holding a conversation is asked first, and staying keeps the desk online', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Are you there?');
  await alice.getByTestId('offer-accept').click();
  await expect(alice.getByTestId('conversation-view').getByTestId('message').filter({ hasText: 'Are you there?' })).toHaveCount(1);

  await alice.getByTestId('presence-offline').click();
  const dialog = alice.getByTestId('offline-confirm');
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText('1 conversation');
  await dialog.getByTestId('offline-confirm-stay').click();
  await expect(dialog).toHaveCount(0);
  await expect(alice.getByTestId('presence-current')).toHaveAttribute('data-presence', 'online');

  await alice.getByTestId('presence-offline').click();
  await alice.getByTestId('offline-confirm-go').click();
  await expect(alice.getByTestId('presence-current')).toHaveAttribute('data-presence', 'offline');
  // Still theirs: the conversation stays on the desk.
  await expect(alice.getByTestId('conversation-view').getByTestId('message').filter({ hasText: 'Are you there?' })).toHaveCount(1);
});
