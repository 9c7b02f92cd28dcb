/**
 * Presence follows the person (issue 10): with a 2-second grace period, an operator
 * whose desk closed is set away; their next desk says why until they act, and the
 * supervisor's floor shows the reason.
 */
import { test as base, expect, newPage, signIn, goOnline } from './fixtures';
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
