import { test, expect, newPage, signIn, goOnline, openWidget, widgetSay } from './fixtures';

// The workstation against a node whose state is split as a cluster lays it out
// (`switchboard dev --shards 2`: a metadata group, a routing shard and two
// conversation shards, each its own Raft group). The desk follows one feed per group
// (protocol 2): offers and assignments from the routing shard, the conversation's
// messages from its shard.
test.use({ sbArgs: ['--shards', '2'] });

test('on a split node the desk chats, reloads, transfers and closes as on one group', async ({ browser, sb }) => {
  const alice = await newPage(browser);
  await signIn(alice, sb, 'alice');
  await goOnline(alice);

  const client = await newPage(browser);
  await openWidget(client, sb);
  await widgetSay(client, 'Is my parcel on its way?');

  // The offer (routing shard) shows the first words (read from the conversation's shard).
  const offer = alice.getByTestId('offer');
  await expect(offer).toHaveCount(1);
  await expect(offer.getByTestId('offer-preview')).toContainText('Is my parcel on its way?');
  await alice.keyboard.press('Alt+A');
  const view = alice.getByTestId('conversation-view');
  await expect(view.getByTestId('message').filter({ hasText: 'Is my parcel' })).toHaveCount(1);

  await alice.getByTestId('composer-input').fill('It left the depot this morning.');
  await alice.getByTestId('composer-input').press('Enter');
  await expect(client.getByTestId('widget-message').filter({ hasText: 'It left the depot' })).toHaveCount(1);

  // The visitor's next message reaches the desk live, from the conversation shard's feed.
  await widgetSay(client, 'Thank you! When will it arrive?');
  await expect(view.getByTestId('message').filter({ hasText: 'When will it arrive' })).toHaveCount(1);

  // A reload resumes every feed from its cursor: nothing missing, nothing twice.
  await alice.reload();
  await expect(alice.getByTestId('whoami')).toContainText('alice');
  await alice.getByTestId('conv-item').first().click();
  await expect(view.getByTestId('message').filter({ hasText: 'Is my parcel' })).toHaveCount(1);
  await expect(view.getByTestId('message').filter({ hasText: 'When will it arrive' })).toHaveCount(1);
  await widgetSay(client, 'Hello again');
  await expect(view.getByTestId('message').filter({ hasText: 'Hello again' })).toHaveCount(1);

  // Transfer (routing shard) to bob, who gets the whole history (conversation shard).
  const bob = await newPage(browser);
  await signIn(bob, sb, 'bob');
  await goOnline(bob);
  await alice.getByTestId('transfer-button').click();
  const dialog = alice.getByTestId('transfer-dialog');
  await expect(dialog.locator('option[value="bob"]:not([disabled])')).toHaveCount(1);
  await dialog.getByTestId('transfer-target').selectOption('bob');
  await dialog.getByTestId('transfer-submit').click();
  // Released by the routing shard; its last entries from the conversation shard do
  // not bring it back.
  await expect(alice.getByTestId('conv-item')).toHaveCount(0);
  await bob.getByTestId('transfer-notice').getByTestId('transfer-open').click();
  const bobView = bob.getByTestId('conversation-view');
  await expect(bobView.getByTestId('message').filter({ hasText: 'Is my parcel' })).toHaveCount(1);
  await expect(bobView.getByTestId('message').filter({ hasText: 'Hello again' })).toHaveCount(1);
  await bob.getByTestId('composer-input').fill('Bob here: tomorrow before noon.');
  await bob.getByTestId('send-button').click();
  await expect(client.getByTestId('widget-message').filter({ hasText: 'tomorrow before noon' })).toHaveCount(1);

  // Bob closes; the visitor rates.
  await bob.getByTestId('close-button').click();
  await bob.getByTestId('close-resolution').selectOption('solved');
  await bob.getByTestId('close-submit').click();
  await expect(bob.getByTestId('conv-item')).toHaveCount(0);
  await expect(client.getByTestId('widget-rating')).toBeVisible();
  await client.getByTestId('widget-star-5').check({ force: true });
  await client.getByTestId('widget-rate-submit').click();
  await expect(client.getByTestId('widget-done')).toBeVisible();
  await expect(alice.getByTestId('conv-item')).toHaveCount(0);
});
