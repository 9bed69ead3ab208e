// A case's history in the Temporal UI of `refunds dev`, in a real browser: nobody touches the
// UI's codec settings. Not signed in to the console, the input shows as its `binary/encrypted`
// ciphertext; signed in as ops, the console's link opens the history and the input reads in clear.
//
//   node tests/browser/temporal-ui.spec.mjs <relay url> <Temporal UI url> <artifacts dir>
//   env SCENARIO = {"token": …, "user": …, "case": id, "canary": text in the case's input,
//                   "sealed": the start of its binary/encrypted payload's data, base64}
//
// Started by tests/test_console_browser.py against `refunds dev` started by the test.
import { check, scenario as run } from './harness.mjs';

const [base, ui, artifacts] = process.argv.slice(2);
const scenario = JSON.parse(process.env.SCENARIO ?? '{}');
if (!base || !ui || !artifacts || !scenario.token) {
  console.error('usage: SCENARIO=… node temporal-ui.spec.mjs <relay url> <Temporal UI url> <artifacts dir>');
  process.exit(2);
}
const { token, user, case: caseId, canary, sealed } = scenario;
const CODEC_ERROR = 'Codec Server could not connect';

/** Waits until the page's text contains `text` (the UI renders payloads in editor lines, not
 * one element per value); generously, as the UI loads and decodes on a busy CI machine. */
async function showing(on, text) {
  await on.waitForFunction((wanted) => document.body.innerText.includes(wanted), text, { timeout: 90_000 });
}

await run('temporal ui browser scenario', artifacts, async ({ page, context, ok, shot, submit, signIn }) => {
  await ok('not signed in, the input is the binary/encrypted payload and the codec refuses', async () => {
    await page.goto(`${ui}/namespaces/default/workflows/${encodeURIComponent(caseId)}`);
    await showing(page, sealed);
    await showing(page, CODEC_ERROR);
    check(!(await page.content()).includes(canary), 'the input decoded for a visitor who is not signed in');
    await shot('20-temporal-ui-not-signed-in');
  });

  await ok('ops sign in and open the case history from the console', async () => {
    await signIn(base, token, user);
    await page.goto(`${base}/console/cases/${encodeURIComponent(caseId)}`);
    const [history] = await Promise.all([context.waitForEvent('page'), page.getByTestId('temporal-link').click()]);
    await showing(history, canary);
    const text = await history.locator('body').innerText();
    check(!text.includes(CODEC_ERROR), `the UI shows "${CODEC_ERROR}"`);
    await shot('21-temporal-ui-decoded', history);
  });
});
