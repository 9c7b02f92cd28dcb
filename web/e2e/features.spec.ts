import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay, shot } from './fixtures';

// 1×1 PNG
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==', 'base64');

test('templates with placeholders, attachments both ways, read marks, break, client card', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);

  const client = await newPage(browser);
  await openWidget(client, sb);
  await client.getByTestId('widget-name').fill('Dana');
  await widgetSay(client, 'Hi, I need help with an invoice');
  await alice.getByTestId('offer-accept').click();
  const view = alice.getByTestId('conversation-view');
  await expect(view.getByTestId('conversation-title')).toContainText('Dana');
  const convId = await view.getAttribute('data-conv');
  // Her messages carry her name, not "Visitor".
  await expect(view.getByTestId('message').filter({ hasText: 'help with an invoice' }).locator('.who')).toHaveText('Dana');

  // Typing from the visitor shows on the desk.
  await client.getByTestId('widget-input').pressSequentially('Also', { delay: 30 });
  await expect(alice.getByTestId('typing-indicator')).toContainText('Dana is typing', { timeout: 5000 });
  await client.getByTestId('widget-input').fill('');

  // Read marks: Alice has the conversation open, so the visitor's message shows as read.
  await expect(client.getByTestId('widget-message').filter({ hasText: 'invoice' }).getByTestId('widget-delivery')).toHaveAttribute('data-state', 'read');

  // Templates: search, insert with placeholders filled, send.
  await alice.getByTestId('tab-templates').click();
  const panel = alice.getByTestId('templates-panel');
  await panel.getByTestId('template-search').fill('greet');
  await expect(panel.getByTestId('template')).toHaveCount(1);
  await panel.getByTestId('template-insert').click();
  await expect(alice.getByTestId('composer-input')).toHaveValue('Hello Dana, my name is Alice. How can I help you?');
  await alice.getByTestId('send-button').click();
  await expect(client.getByTestId('widget-message').filter({ hasText: 'Hello Dana, my name is Alice.' })).toHaveCount(1);
  // The visitor's panel is open: Alice's message turns read.
  await expect(view.getByTestId('message').filter({ hasText: 'Hello Dana' }).getByTestId('delivery')).toHaveClass(/delivery-read/);

  // A personal template, made a favourite.
  await panel.getByTestId('template-search').fill('');
  await panel.getByTestId('template-new').click();
  const form = panel.getByTestId('template-form');
  await form.getByLabel('Title').fill('Invoice copy');
  await form.getByLabel('Text').fill('I have sent a copy of your invoice for conversation {{conversation.id}}.');
  await form.getByRole('button', { name: 'Save' }).click();
  await panel.getByTestId('template-search').fill('invoice copy');
  const mine = panel.getByTestId('template').filter({ hasText: 'Invoice copy' });
  await expect(mine).toHaveCount(1);
  await expect(mine).toContainText('conversation ' + convId);
  await mine.getByRole('button', { name: 'Add to favourites' }).click();
  await expect(mine.getByRole('button', { name: 'Remove from favourites' })).toBeVisible();
  await shot(alice, '13-operator-templates');

  // Operator attachment (image): shown inline on both sides.
  await alice.getByTestId('attach-input').setInputFiles({ name: 'invoice.png', mimeType: 'image/png', buffer: PNG });
  await expect(alice.locator('.chip')).toContainText('invoice.png');
  await alice.getByTestId('composer-input').fill('Here it is');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(view.getByTestId('attachment-image')).toHaveCount(1);
  await expect(client.getByTestId('widget-message').filter({ hasText: 'Here it is' }).locator('img')).toHaveCount(1);

  // Client-side checks before upload, then a visitor document.
  await client.getByTestId('widget-file').setInputFiles({ name: 'virus.exe', mimeType: 'application/x-msdownload', buffer: Buffer.from('MZ') });
  await expect(client.locator('.sbw-problem')).toContainText('not allowed');
  await client.getByTestId('widget-file').setInputFiles({ name: 'details.txt', mimeType: 'text/plain', buffer: Buffer.from('order 1042') });
  await expect(client.locator('.sbw-chips')).toContainText('details.txt');
  await client.getByTestId('widget-send').click();
  await expect(view.getByTestId('attachment-file').filter({ hasText: 'details.txt' })).toHaveCount(1);
  await shot(alice, '14-operator-attachments');
  await shot(client, '15-widget-attachments');

  // Break keeps the conversation.
  await alice.getByTestId('presence-break').click();
  await expect(alice.getByTestId('presence-current')).toHaveAttribute('data-presence', 'break');
  await expect(alice.getByTestId('conv-item')).toHaveCount(1);

  // The visitor ends this chat and starts another: the client card lists the earlier one.
  client.on('dialog', (d) => d.accept());
  await client.getByTestId('widget-end').click();
  await expect(client.getByTestId('widget-rating')).toBeVisible();
  await client.getByRole('button', { name: 'Skip' }).click();
  await client.getByTestId('widget-new-chat').click();
  await widgetSay(client, 'Me again');
  await goOnline(alice);
  await alice.getByTestId('offer-accept').click();
  await alice.getByTestId('tab-card').click();
  const card = alice.getByTestId('client-card');
  await expect(card).toContainText('Earlier conversations');
  await expect(card.getByRole('button', { name: '#' + convId })).toBeVisible();
  await shot(alice, '16-client-card');
});

test('supervisor reassigns a conversation to another operator', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);
  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Please help');
  await alice.getByTestId('offer-accept').click();
  const convId = await alice.getByTestId('conversation-view').getAttribute('data-conv');
  const bob = await newPage(browser);
  await signIn(bob, sb, 'bob');
  await goOnline(bob);

  const sup = await newPage(browser);
  await signIn(sup, sb, 'supervisor');
  await sup.locator('[data-testid="operator-row"][data-operator="alice"]').getByRole('button', { name: '#' + convId }).click();
  const insp = sup.getByTestId('inspector');
  await expect(insp.getByTestId('inspector-state')).toContainText('alice');
  const form = insp.getByTestId('reassign-form');
  await form.getByTestId('reassign-target').selectOption('bob');
  await form.getByLabel('Comment').fill('Bob knows this customer');
  await form.getByTestId('reassign-submit').click();
  await expect(insp.getByTestId('inspector-state')).toContainText('bob');
  await expect(alice.getByTestId('conv-item')).toHaveCount(0);
  await expect(bob.getByTestId('conversation-view').getByTestId('message').filter({ hasText: 'Please help' })).toHaveCount(1);
  await expect(bob.getByTestId('entry-transferred')).toContainText('Bob knows this customer');
  await shot(sup, '17-supervisor-reassigned');
});

test('admin manages groups, operators, users and shared templates', async ({ browser, sb }) => {
  const admin = await newPage(browser);
  await signIn(admin, sb, 'admin');
  await admin.getByTestId('nav-admin').click();
  const body = admin.getByTestId('admin');

  // The section tabs follow the tablist pattern: one Tab stop, arrows move and select.
  const tabs = body.getByRole('tablist');
  const groupsTab = body.getByTestId('admin-tab-groups');
  await expect(groupsTab).toHaveAttribute('aria-selected', 'true');
  await expect(tabs.locator('[role="tab"][tabindex="0"]')).toHaveCount(1);
  const panel = body.getByRole('tabpanel');
  await expect(groupsTab).toHaveAttribute('aria-controls', (await panel.getAttribute('id'))!);
  await expect(panel).toHaveAttribute('aria-labelledby', (await groupsTab.getAttribute('id'))!);
  await groupsTab.focus();
  await admin.keyboard.press('ArrowRight');
  const opsTab = body.getByTestId('admin-tab-operators');
  await expect(opsTab).toBeFocused();
  await expect(opsTab).toHaveAttribute('aria-selected', 'true');
  await expect(groupsTab).toHaveAttribute('aria-selected', 'false');
  await expect(groupsTab).toHaveAttribute('tabindex', '-1');
  await expect(panel).toHaveAttribute('aria-labelledby', (await opsTab.getAttribute('id'))!);
  await expect(body.getByTestId('operators-admin-table')).toBeVisible();
  await admin.keyboard.press('End');
  await expect(body.getByTestId('admin-tab-templates')).toBeFocused();
  await admin.keyboard.press('ArrowRight');
  await expect(groupsTab).toBeFocused();
  await expect(groupsTab).toHaveAttribute('aria-selected', 'true');
  await admin.keyboard.press('ArrowLeft');
  await expect(body.getByTestId('admin-tab-templates')).toHaveAttribute('aria-selected', 'true');
  await admin.keyboard.press('Home');
  await expect(groupsTab).toHaveAttribute('aria-selected', 'true');

  // A skill group
  await body.getByLabel('Id', { exact: true }).fill('vip');
  await body.getByLabel('Name', { exact: true }).fill('VIP customers');
  await body.getByLabel('Offer timeout (seconds)').fill('20');
  await body.getByRole('button', { name: 'Save' }).click();
  await expect(body.getByTestId('groups-table')).toContainText('VIP customers');

  // An operator in it
  await body.getByTestId('admin-tab-operators').click();
  await body.getByLabel('Id', { exact: true }).fill('dave');
  await body.getByLabel('Name', { exact: true }).fill('Dave');
  await body.getByLabel('Capacity', { exact: true }).fill('4');
  await body.getByLabel('VIP customers').check();
  // His login is made below, in the users section (the operator form could make it too).
  await body.getByTestId('operator-with-login').uncheck();
  await body.getByTestId('operator-save').click();
  await expect(body.getByTestId('operators-admin-table')).toContainText('Dave');

  // The existing logins are listed; a login for him
  await body.getByTestId('admin-tab-users').click();
  const users = body.getByTestId('users-table');
  for (const login of ['admin', 'alice', 'bob', 'supervisor']) await expect(users.locator('[data-testid="user-row"][data-login="' + login + '"]')).toHaveCount(1);
  await expect(users.locator('[data-testid="user-row"][data-login="supervisor"]')).toContainText('Supervisor');
  await expect(users.locator('[data-testid="user-row"][data-login="alice"]')).toContainText('(alice)');
  await expect(users.locator('[data-testid="user-row"][data-login="dave"]')).toHaveCount(0);
  const userForm = body.getByTestId('user-form');
  await users.getByRole('button', { name: 'Edit alice' }).click();
  await expect(userForm.getByLabel('Login', { exact: true })).toHaveValue('alice');
  await expect(userForm.getByLabel('Acts as operator')).toHaveValue('alice');
  await userForm.getByRole('button', { name: 'New' }).click();
  await userForm.getByLabel('Login', { exact: true }).fill('dave');
  await userForm.getByLabel('Password', { exact: true }).fill('short');
  await userForm.getByRole('button', { name: 'Save' }).click();
  await expect(userForm.getByRole('alert')).toContainText('10 characters');
  await userForm.getByLabel('Password', { exact: true }).fill('dave-password-1');
  await userForm.getByLabel('Acts as operator').selectOption('dave');
  await userForm.getByRole('button', { name: 'Save' }).click();
  await expect(userForm.getByRole('status')).toContainText('Saved');
  await expect(users.locator('[data-testid="user-row"][data-login="dave"]')).toContainText('Dave (dave)');

  // A shared template for the group
  await body.getByTestId('admin-tab-templates').click();
  await body.getByTestId('template-new').click();
  const form = body.getByTestId('template-form');
  await form.getByLabel('Title').fill('VIP welcome');
  await form.getByLabel('Text').fill('Welcome back, {{client.name}}!');
  await form.getByLabel('Group').selectOption('vip');
  await form.getByRole('button', { name: 'Save' }).click();
  await expect(body.getByTestId('template').filter({ hasText: 'VIP welcome' })).toHaveCount(1);
  await shot(admin, '18-admin');

  // Dave can sign in and sees his desk.
  const dave = await newPage(browser);
  sb.logins.dave = 'dave-password-1';
  await signIn(dave, sb, 'dave');
  await expect(dave.getByTestId('desk')).toBeVisible();
  await dave.getByTestId('presence-online').click();
  await expect(dave.getByTestId('presence-current')).toHaveAttribute('data-presence', 'online');
});
