// What every browser scenario shares: Debian's chromium, headless, in a fresh profile, driven
// by playwright-core; one "ok - …" line per step, and on the first failure "not ok - …",
// failure.png in the artifacts folder and exit code 1. Every wait is for something on the
// page, never for a fixed time.
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export function check(condition, message) {
  if (!condition) throw new Error(message);
}

/** Runs `body({ page, context, ok, shot, submit, signIn, signOut })` in a new browser; prints
 * "<title>: all steps passed" when every step passed. */
export async function scenario(title, artifacts, body) {
  mkdirSync(artifacts, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), 'refunds-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1440, height: 900 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
  });
  context.setDefaultTimeout(30_000);
  const page = context.pages()[0] ?? await context.newPage();
  let step = 'start';

  const shot = async (name, on = page) => {
    await on.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
  };
  const ok = async (name, stepBody) => {
    step = name;
    await stepBody();
    console.log(`ok - ${name}`);
  };
  /** Clicks and returns the HTTP status of the page it lands on (after any redirect). */
  const submit = async (locator) => {
    const [response] = await Promise.all([page.waitForNavigation(), locator.click()]);
    return response.status();
  };
  const signIn = async (base, token, user) => {
    await page.goto(`${base}/console/sign-in`);
    await page.getByLabel('API token').fill(token);
    check(await submit(page.getByRole('button', { name: 'Sign in' })) === 200, 'sign-in did not land on a page');
    check((await page.getByTestId('user').textContent()) === user, `signed in, but not as ${user}`);
  };
  const signOut = async () => {
    await submit(page.getByRole('button', { name: 'Sign out' }));
    check(page.url().endsWith('/console/sign-in'), 'sign out did not lead to the sign-in page');
  };

  try {
    await body({ page, context, ok, shot, submit, signIn, signOut });
    console.log(`${title}: all steps passed`);
  } catch (error) {
    console.log(`not ok - ${step}: ${error.message}`);
    for (const [index, open] of context.pages().entries()) {
      await shot(index ? `failure-${index}` : 'failure', open).catch(() => {});
    }
    process.exitCode = 1;
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}
