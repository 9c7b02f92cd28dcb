import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay, shot, rest, staffToken } from './fixtures';

test('operator accepts an offer and replies; the visitor sees it; transfer hands the history to bob', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  await alice.goto(sb.privateUrl + '/');
  await shot(alice, '01-login');
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  await expect(alice.getByTestId('presence-current')).toContainText('Online');

  // The visitor writes first.
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Hello, my order #1042 has not arrived');
  await expect(client.getByTestId('widget-entry-queued')).toBeVisible();

  // Alice gets the offer with a countdown and accepts it from the keyboard.
  const offer = alice.getByTestId('offer');
  await expect(offer).toHaveCount(1);
  await expect(offer.getByTestId('offer-countdown')).toHaveText(/\d+s/);
  // What Alice needs to decide at a glance: the first message, the channel, the wait.
  await expect(offer.getByTestId('offer-preview')).toContainText('my order #1042 has not arrived');
  await expect(offer.getByTestId('offer-channel')).toHaveText('web');
  await expect(offer.getByTestId('offer-waited')).toContainText('waiting');
  await shot(alice, '02-operator-offer');
  await alice.keyboard.press('Alt+A');
  await expect(offer).toHaveCount(0);
  const view = alice.getByTestId('conversation-view');
  await expect(view.getByTestId('message').filter({ hasText: 'my order #1042' })).toHaveCount(1);

  // Reply with Enter.
  await alice.getByTestId('composer-input').fill('Hi! Let me check order #1042 for you.');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(view.getByTestId('message').filter({ hasText: 'Let me check' })).toHaveCount(1);
  await expect(view.getByTestId('message').filter({ hasText: 'Let me check' }).getByTestId('delivery')).toBeVisible();

  // The visitor sees the reply and who is helping.
  await expect(client.getByTestId('widget-message').filter({ hasText: 'Let me check order #1042' })).toHaveCount(1);
  await expect(client.getByTestId('widget-status')).toContainText('Alice');

  // Typing reaches the visitor.
  await alice.getByTestId('composer-input').pressSequentially('One', { delay: 30 });
  await expect(client.getByTestId('widget-typing')).toContainText('Alice', { timeout: 5000 });
  await alice.getByTestId('composer-input').fill('');
  await shot(alice, '03-operator-conversation');
  await shot(client, '04-widget-conversation');

  // Bob comes online in his own browser.
  const bob = await newPage(browser);
  await signIn(bob, sb, 'bob');
  await goOnline(bob);

  // Alice transfers the conversation to Bob with a comment.
  await alice.getByTestId('transfer-button').click();
  const dialog = alice.getByTestId('transfer-dialog');
  await expect(dialog).toBeVisible();
  await expect(dialog.locator('option[value="bob"]:not([disabled])')).toHaveCount(1);
  await dialog.getByTestId('transfer-target').selectOption('bob');
  await dialog.getByTestId('transfer-comment').fill('Delivery question, please follow up');
  await shot(alice, '05-transfer-dialog');
  await dialog.getByTestId('transfer-submit').click();
  await expect(dialog).toHaveCount(0);
  await expect(alice.getByTestId('conv-item')).toHaveCount(0);

  // Bob is told who handed it over and why, not left to find it.
  const notice = bob.getByTestId('transfer-notice');
  await expect(notice).toContainText('Alice transferred');
  await expect(notice).toContainText('Delivery question, please follow up');
  await notice.getByTestId('transfer-open').click();
  await expect(notice).toHaveCount(0);

  // Bob has it, with the whole history.
  const bobView = bob.getByTestId('conversation-view');
  await expect(bobView).toBeVisible();
  await expect(bobView.getByTestId('message').filter({ hasText: 'my order #1042' })).toHaveCount(1);
  await expect(bobView.getByTestId('message').filter({ hasText: 'Let me check order #1042' })).toHaveCount(1);
  await expect(bobView.getByTestId('entry-transferred')).toContainText('Delivery question');
  await bob.getByTestId('composer-input').fill('Bob here, your parcel ships today.');
  await bob.getByTestId('send-button').click();
  await expect(client.getByTestId('widget-message').filter({ hasText: 'parcel ships today' })).toHaveCount(1);
  await expect(client.getByTestId('widget-entry-transferred')).toHaveCount(1);
  await shot(bob, '06-bob-after-transfer');

  // Bob closes with a resolution and tags; the visitor rates the chat.
  await bob.getByTestId('close-button').click();
  await bob.getByTestId('close-resolution').selectOption('solved');
  await bob.getByTestId('close-tags').fill('delivery, vip');
  await bob.getByTestId('close-submit').click();
  await expect(bob.getByTestId('conv-item')).toHaveCount(0);
  await expect(client.getByTestId('widget-rating')).toBeVisible();
  await client.getByTestId('widget-star-5').check({ force: true });
  await client.getByTestId('widget-rate-submit').click();
  await expect(client.getByTestId('widget-done')).toBeVisible();
  await expect(client.getByTestId('widget-entry-rated')).toHaveCount(1);
  await shot(client, '07-widget-rated');
});

test('supervisor sees the queue change live and why an operator was chosen', async ({ browser, sb }) => {
  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  await expect(sup.getByTestId('floor')).toBeVisible();
  const general = sup.locator('[data-testid="queue-row"][data-group="general"]');
  await expect(general.getByTestId('queue-waiting')).toHaveText('0');

  // Nobody is online: a visitor starts and waits.
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Is anyone there?');
  await expect(general.getByTestId('queue-waiting')).toHaveText('1');
  // The floor says why it waits and that nobody could take it now.
  await expect(general.getByTestId('queued-why')).toHaveText('nobody of the group is online');
  await expect(general.getByTestId('queue-available')).toHaveText('0');
  await shot(sup, '08-supervisor-floor-waiting');

  // The waiting conversation is listed in the queue row; it opens read-only, and what the
  // visitor writes next shows up without pressing Refresh.
  const queued = general.getByTestId('queued-conv');
  await expect(queued).toHaveCount(1);
  await expect(queued).toHaveAttribute('data-state', 'waiting');
  await queued.click();
  const insp = sup.getByTestId('inspector');
  const log = insp.getByTestId('inspector-log');
  await expect(insp.getByTestId('inspector-state')).toContainText('Queued');
  await expect(log.getByTestId('message').filter({ hasText: 'Is anyone there?' })).toHaveCount(1);
  await widgetSay(client, 'Hello? Still waiting here');
  await expect(log.getByTestId('message').filter({ hasText: 'Still waiting here' })).toHaveCount(1);

  // Alice comes online and gets the offer: waiting 1 → 0, offered 0 → 1, then accepted.
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  await expect(sup.locator('[data-testid="operator-row"][data-operator="alice"]').getByTestId('operator-presence')).toHaveAttribute('data-presence', 'online');
  await expect(general.getByTestId('queue-waiting')).toHaveText('0');
  await expect(general.getByTestId('queue-offered')).toHaveText('1');
  await alice.getByTestId('offer-accept').click();
  await expect(general.getByTestId('queue-offered')).toHaveText('0');
  await expect(general.getByTestId('queued-conv')).toHaveCount(0);
  const convId = await alice.getByTestId('conversation-view').getAttribute('data-conv');
  // The open inspector follows the floor: now assigned to Alice, still without Refresh.
  await expect(insp).toHaveAttribute('data-conv', String(convId));
  await expect(insp.getByTestId('inspector-state')).toContainText('Assigned · alice');

  // Open it by number too, with the decision record.
  await sup.getByTestId('lookup-input').fill(String(convId));
  await sup.getByTestId('lookup-input').press('Enter');
  await expect(insp.getByTestId('inspector-state')).toContainText('Assigned');
  await expect(insp.getByTestId('inspector-log').getByTestId('message').filter({ hasText: 'Is anyone there?' })).toHaveCount(1);
  await expect(insp.getByTestId('decision')).toHaveCount(1);
  await expect(insp.getByTestId('decision').locator('tr.chosen')).toContainText('alice');
  await shot(sup, '09-supervisor-inspector');
});

test('the widget resumes after a page reload with no gap and no duplicate', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'First question');
  await alice.getByTestId('offer-accept').click();
  await alice.getByTestId('composer-input').fill('First answer');
  await alice.getByTestId('composer-input').press('Enter');
  await widgetSay(client, 'Second question');
  await expect(client.getByTestId('widget-message').filter({ hasText: 'First answer' })).toHaveCount(1);
  const before = await client.getByTestId('widget-message').count();
  expect(before).toBe(3);
  // Alice has the conversation open: the visitor sees the second question as read.
  const secondDelivery = () => client.getByTestId('widget-message').filter({ hasText: 'Second question' }).getByTestId('widget-delivery');
  await expect(secondDelivery()).toHaveAttribute('data-state', 'read');

  await client.reload();
  // The panel reopens by itself with the cached history...
  await expect(client.getByTestId('widget-panel')).toBeVisible();
  await expect(client.getByTestId('widget-message')).toHaveCount(3);
  // ...and the read mark, which the server committed, is still there.
  await expect(secondDelivery()).toHaveAttribute('data-state', 'read');
  // ...and new entries after the reload arrive exactly once.
  await alice.getByTestId('composer-input').fill('Answer after your reload');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(client.getByTestId('widget-message').filter({ hasText: 'Answer after your reload' })).toHaveCount(1);
  await expect(client.getByTestId('widget-message')).toHaveCount(4);
  const seqs = await client.getByTestId('widget-message').evaluateAll((els) => els.map((e) => Number(e.getAttribute('data-seq'))));
  expect(new Set(seqs).size).toBe(seqs.length);
  expect([...seqs].sort((a, b) => a - b)).toEqual(seqs);
  await widgetSay(client, 'Still here after reload');
  await expect(alice.getByTestId('conversation-view').getByTestId('message').filter({ hasText: 'Still here after reload' })).toHaveCount(1);
  await shot(client, '10-widget-after-reload');
});

test('the operator reconnects after a network drop and misses nothing', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  const urls: string[] = [];
  let server: { close: () => Promise<void> | void } | null = null;
  let cut = false;
  await alice.routeWebSocket(/\/ws\/operator/, (ws) => {
    urls.push(ws.url());
    if (cut) {
      ws.close({ code: 1001, reason: 'network down' });
      return;
    }
    server = ws.connectToServer();
  });
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Before the drop');
  await alice.getByTestId('offer-accept').click();
  await expect(alice.getByTestId('message').filter({ hasText: 'Before the drop' })).toHaveCount(1);

  // The network goes away: the server side of the socket closes and reconnects fail.
  cut = true;
  await server!.close();
  await expect(alice.getByTestId('reconnect-banner')).toBeVisible();
  await shot(alice, '11-operator-reconnecting');
  // Meanwhile the visitor writes.
  await widgetSay(client, 'Written while you were offline');
  // The network comes back.
  cut = false;
  await expect(alice.getByTestId('reconnect-banner')).toHaveCount(0, { timeout: 40_000 });
  await expect(alice.getByTestId('message').filter({ hasText: 'Written while you were offline' })).toHaveCount(1);
  await expect(alice.getByTestId('message').filter({ hasText: 'Before the drop' })).toHaveCount(1);
  // Protocol 2: a fresh desk names no cursor; a reconnecting one resumes each feed.
  expect(urls[0]).toContain('protocol=2');
  expect(urls[0]).not.toContain('cursor=');
  expect(urls[urls.length - 1]).toMatch(/cursor=r\.\d+/);
  // A handful of attempts, not a storm.
  expect(urls.length).toBeLessThan(8);
});

test('Russian interface and language switch', async ({ browser, sb }) => {
  const page = await newPage(browser, 'ru-RU');
  await page.goto(sb.privateUrl + '/');
  await expect(page.getByTestId('login-submit')).toHaveText('Войти');
  await page.getByTestId('lang-switch').selectOption('en');
  await expect(page.getByTestId('login-submit')).toHaveText('Sign in');
  await page.reload();
  await expect(page.getByTestId('login-submit')).toHaveText('Sign in');
  const client = await newPage(browser, 'ru-RU');
  await openWidget(client, sb);
  await expect(client.getByTestId('widget-send')).toHaveText('Отправить');
  await shot(client, '12-widget-russian');
});

test('a visitor the block list names is told so, and their first message can be retried instead of staying "sending"', async ({ browser, sb }) => {
  const supervisor = await staffToken(sb, 'supervisor');
  const rule = { list: 'block', kind: 'ip', value: '127.0.0.1', note: 'e2e' };
  expect((await rest(sb, 'PUT', '/api/access/rules', supervisor, rule)).status).toBe(200);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await client.getByTestId('widget-input').fill('Hello, is anyone there?');
  await client.getByTestId('widget-input').press('Enter');
  const pending = client.getByTestId('widget-message-pending').filter({ hasText: 'Hello, is anyone there?' });
  await expect(pending).toContainText('Not sent');
  await expect(client.getByRole('alert')).toBeVisible();
  // Unblocked, Retry starts the conversation and sends the message once.
  expect((await rest(sb, 'PUT', '/api/access/rules', supervisor, { ...rule, note: null })).status).toBe(200);
  await pending.getByRole('button', { name: 'Retry' }).click();
  await expect(client.getByTestId('widget-message').filter({ hasText: 'Hello, is anyone there?' })).toHaveCount(1);
  await expect(client.getByTestId('widget-message-pending')).toHaveCount(0);
});
