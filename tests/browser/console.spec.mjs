// The ops console in a real browser: Debian's chromium, headless, driven by playwright-core.
//
//   node tests/browser/console.spec.mjs <relay url> <artifacts dir>
//   env SCENARIO = {"tokens": {"requester": …, "approver": …, "ops": …},
//                   "approval_case": id, "failed_case": id}   (tokens stay out of argv)
//
// Started by tests/test_console_browser.py against a running stack it prepared. Prints one
// "ok - …" line per step; on the first failure prints "not ok - …", saves failure.png and
// exits 1. Every wait is for something on the page, never for a fixed time.
import { check, scenario as run } from './harness.mjs';

const [base, artifacts] = process.argv.slice(2);
const scenario = JSON.parse(process.env.SCENARIO ?? '{}');
if (!base || !artifacts || !scenario.tokens) {
  console.error('usage: SCENARIO=… node console.spec.mjs <relay url> <artifacts dir>');
  process.exit(2);
}

await run('console browser scenario', artifacts, async ({ page, ok, shot, submit, signIn: signInAt, signOut }) => {
  const signIn = (token, user) => signInAt(base, token, user);
  const caseRow = (id) => page.locator(`tr[data-case="${id}"]`);
  const { tokens, approval_case: pending, failed_case: failed } = scenario;

  await ok('an anonymous visit is sent to sign in', async () => {
    await page.goto(`${base}/console`);
    check(page.url().endsWith('/console/sign-in'), `landed on ${page.url()}`);
    await shot('01-sign-in');
  });

  await ok('the requester signs in and sees the case that needs approval', async () => {
    await signIn(tokens.requester, 'rita');
    await page.goto(`${base}/console/cases?status=awaiting_approval`);
    await caseRow(pending).waitFor();
    check((await caseRow(pending).textContent()).includes('awaiting approval'), 'row shows no status');
    await shot('02-cases-awaiting-approval');
    await submit(caseRow(pending).getByRole('link', { name: pending }));
    check((await page.getByTestId('missing-roles').textContent()).includes('approver'),
          'the case page does not say which role must approve');
    await shot('03-case-awaiting-approval');
  });

  await ok('the requester is refused when approving their own refund', async () => {
    const form = page.getByTestId('approval-form');
    await form.getByLabel('Reason').fill('looks fine to me');
    const status = await submit(form.getByRole('button', { name: 'Approve' }));
    check(status === 403, `expected 403, got ${status}`);
    const error = await page.getByTestId('error').textContent();
    check(error.includes('the requester cannot approve their own refund'), `refusal says: ${error}`);
    check((await page.getByTestId('status').textContent()).trim() === 'awaiting approval',
          'the case moved after a refused approval');
    await shot('04-requester-refused');
    await signOut();
  });

  await ok('a second user finds it under "needs my approval" and approves it', async () => {
    await signIn(tokens.approver, 'bob');
    await submit(page.getByRole('link', { name: 'Needs my approval' }));
    await caseRow(pending).waitFor();
    await shot('05-needs-my-approval');
    await submit(caseRow(pending).getByRole('link', { name: pending }));
    const form = page.getByTestId('approval-form');
    await form.getByLabel('Reason').fill('order and evidence checked');
    const status = await submit(form.getByRole('button', { name: 'Approve' }));
    check(status === 200, `approval answered ${status}`);
    check((await page.getByTestId('notice').textContent()).includes('Your approval was recorded'),
          'no confirmation after approving');
    await shot('06-approved');
    await signOut();
  });

  await ok('ops see the failed refund with its red banner', async () => {
    await signIn(tokens.ops, 'olga');
    await submit(page.getByRole('link', { name: 'Needs attention' }));
    await caseRow(failed).waitFor();
    await shot('07-needs-attention');
    await submit(caseRow(failed).getByRole('link', { name: failed }));
    const banner = page.getByTestId('banner');
    check(await banner.isVisible(), 'no banner on a failed refund');
    check((await banner.textContent()).includes('Refund failed'), 'banner does not say the refund failed');
    const colour = await banner.evaluate((el) => getComputedStyle(el).backgroundColor);
    check(colour === 'rgb(179, 38, 30)', `banner is not red: ${colour}`);
    await shot('08-failed-refund-banner');
  });

  await ok('ops reissue the failed refund through the provider', async () => {
    const form = page.getByTestId('reissue-form');
    await form.getByLabel('Method').selectOption('provider');
    await form.getByLabel('Reason').fill('customer sent new card details');
    const status = await submit(form.getByRole('button', { name: 'Reissue' }));
    check(status === 200, `reissue answered ${status}`);
    check(page.url().includes(`/console/cases/${failed}-r1`), `landed on ${page.url()}`);
    check((await page.getByTestId('notice').textContent()).includes('Reissue requested'),
          'no confirmation after reissuing');
    check((await page.getByRole('link', { name: failed, exact: true }).count()) === 1,
          'the new case does not link to the failed one');
    await shot('09-reissued');
  });

  await ok('ops read webhook coverage and the reconciliation reports', async () => {
    await submit(page.getByRole('link', { name: 'Webhook coverage' }));
    check((await page.locator('h1').textContent()) === 'Webhook coverage', 'no coverage page');
    const unknown = page.locator('tr.tone-bad', { hasText: 'refund.reversed' });
    check((await unknown.textContent()).includes('no handler'), 'an unhandled type is not flagged');
    await shot('10-coverage');
    await submit(page.getByRole('link', { name: 'Reconciliation' }));
    check((await page.locator('h1').textContent()) === 'Reconciliation reports', 'no reconciliation page');
    await shot('11-reconciliation');
  });
});
