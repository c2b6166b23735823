// Drives the stock ComfyUI editor (comfyui-frontend-package 1.27.10) as the
// gateway serves it at /user/N/, in headless Chromium (Debian's
// /usr/bin/chromium), for tests/tests/editor_browser.rs.
//
//   node tests/browser/editor.mjs <gateway url> <artifacts dir>
//
// Prints `STARTED`, then obeys one command per stdin line and answers one
// line on stdout:
//
//   LOGIN <n> <code>  -> READY <n>         (logged out whoever was in, logged in at
//                                            /login, /user/n/ is up: canvas, Queue button,
//                                            the websocket's status received)
//   LOAD <name>       -> LOADED <nodes>    (opened <name> from the workflows sidebar)
//   QUEUE             -> QUEUED <prompt id> (pressed Queue; the id POST /prompt answered)
//   BADGE             -> BADGE <text>      (comfy-multi's queue badge is shown)
//   NO_BADGE          -> NO_BADGE          (the badge is hidden)
//   RESULT <prompt id> -> RESULT <src>     (the queue panel shows that prompt's output
//                                            image, loaded; so does the SaveImage node)
//   TASKS             -> TASKS <count>     (the queue panel, loaded: how many tasks it shows)
//   NODES             -> NODES <count>     (nodes on the canvas)
//   SHOT <name>       -> SHOT <path>       (a PNG of the window in the artifacts dir)
//   FAILURES          -> FAILURES <json>   (failed requests to the gateway since the last
//                                            LOGIN: request failures and answers >= 400)
//   QUIT              -> BYE, exit 0
//
// Any failure prints `ERROR <why>` and exits 1. Every wait has a deadline
// (COMFY_MULTI_BROWSER_TIMEOUT_MS, default 60000); nothing sleeps.
// CHROMIUM_PATH overrides /usr/bin/chromium; COMFY_MULTI_BROWSER_DEBUG=1
// logs every request to the gateway on stderr.
import fs from 'node:fs';
import path from 'node:path';
import { cleanup, commands, launch, say } from './lib.mjs';

const [url, artifacts] = process.argv.slice(2);
if (!url || !artifacts) {
  console.error('usage: node editor.mjs <gateway url> <artifacts dir>');
  process.exit(2);
}
const TIMEOUT = Number(process.env.COMFY_MULTI_BROWSER_TIMEOUT_MS || 60000);
const log = (line) => process.stderr.write(`[editor.mjs] ${line}\n`);
let failures = [];
let pageErrors = [];

let page = null;

async function fail(why) {
  // What the window showed, for the one who reads the failure.
  if (page) {
    fs.mkdirSync(artifacts, { recursive: true });
    const file = path.join(artifacts, 'editor-failure.png');
    if (await page.screenshot({ path: file }).then(() => true, () => false)) log(`screenshot of the failure: ${file}`);
  }
  say(`ERROR ${String(why).replace(/\s+/g, ' ')}`);
  await cleanup();
  process.exit(1);
}

process.on('unhandledRejection', (e) => fail(e && e.stack ? e.stack : e));

const ours = (u) => u.startsWith(url);

async function openSidebar(page, tab) {
  const button = page.locator(`.${tab}-tab-button`).first();
  // The button toggles: click it only if its tab is not the one shown.
  const shown = () => button.evaluate((b) => b.classList.contains('side-bar-button-selected'));
  if (!(await shown())) await button.click();
  await page.waitForFunction((sel) => document.querySelector(sel)?.classList.contains('side-bar-button-selected'), `.${tab}-tab-button`);
}

async function main() {
  const context = await launch(TIMEOUT);
  page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (e) => {
    // 1.27.10 itself throws on every load: the Comfy.Canvas.NavigationMode
    // setting's onChange sets Comfy.Canvas.LeftMouseClickBehavior before that
    // setting is registered (settingStore.addSetting), whatever the server.
    if (/reading 'id'/.test(e.message) && /addSetting/.test(e.stack || '')) {
      log('ignored the stock editor\'s own error on load (NavigationMode onChange before its settings exist)');
      return;
    }
    pageErrors.push(e.message);
    log(`page error: ${e.stack || e.message}`);
  });
  page.on('console', (m) => { if (m.type() === 'error') log(`console: ${m.text()}`); });
  if (process.env.COMFY_MULTI_BROWSER_DEBUG) {
    page.on('request', (r) => ours(r.url()) && log(`-> ${r.method()} ${r.url()}`));
    page.on('requestfinished', async (r) => ours(r.url()) && log(`<- ${(await r.response())?.status()} ${r.method()} ${r.url()}`));
    page.on('framenavigated', (f) => f === page.mainFrame() && log(`navigated to ${f.url()}`));
  }
  page.on('requestfailed', async (r) => {
    if (!ours(r.url())) return;
    // The page not reading a body it got (an empty 200 to a settings POST)
    // shows as ERR_ABORTED too: the server answered, nothing failed.
    const answered = await r.response().catch(() => null);
    if (answered && answered.status() < 400) return;
    {
      failures.push({ url: r.url(), method: r.method(), failure: r.failure()?.errorText ?? 'failed' });
      log(`failed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`);
    }
  });
  page.on('response', (r) => {
    if (r.status() >= 400 && ours(r.url())) {
      failures.push({ url: r.url(), method: r.request().method(), status: r.status() });
      log(`${r.status()} ${r.request().method()} ${r.url()}`);
    }
  });
  // The editor opens dialogs by itself (the template browser on a first
  // visit): close them whenever they would be in the way of a click.
  await page.addLocatorHandler(page.locator('.p-dialog-mask'), async (mask) => {
    const title = (await mask.locator('.p-dialog-header').first().textContent({ timeout: 2000 }).catch(() => '')) || '';
    log(`closing a dialog: ${title.trim()}`);
    const close = mask.locator('.p-dialog-close-button, [data-pc-section="pcclosebutton"], button[aria-label="Close"]').first();
    if (await close.count()) await close.click({ noWaitAfter: true });
    else await page.keyboard.press('Escape');
    await mask.waitFor({ state: 'detached' });
  });
  say('STARTED');

  for await (const { cmd, words, rest } of commands()) {
    if (cmd === 'LOGIN') {
      const [n, code] = words.slice(1);
      await page.goto(`${url}/logout`);
      await page.goto(`${url}/login?user=${n}`);
      failures = [];
      pageErrors = [];
      await page.fill('#code', code);
      await Promise.all([page.waitForURL(`${url}/user/${n}/`), page.click('button[type=submit]')]);
      await page.locator('#graph-canvas').waitFor();
      await page.locator('[data-testid="queue-button"]').waitFor();
      await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph);
      // The websocket's first `status` gave the editor its client id.
      await page.waitForFunction(() => window.comfyAPI.api.api.clientId);
      say(`READY ${n}`);
    } else if (cmd === 'LOAD') {
      await openSidebar(page, 'workflows');
      // The browser lists files by name (`<name>.json`).
      const item = page.locator('.comfyui-workflows-browse').getByText(new RegExp(`^${rest.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}(\\.json)?$`)).first();
      await item.click();
      const nodes = await page.waitForFunction(() => {
        const g = window.comfyAPI.app.app.graph;
        return g && g.nodes.length >= 7 && g.nodes.length;
      });
      // Close the sidebar again so the canvas is in view.
      await page.locator('.workflows-tab-button').first().click();
      say(`LOADED ${await nodes.jsonValue()}`);
    } else if (cmd === 'QUEUE') {
      const answer = page.waitForResponse((r) => r.url().endsWith('/api/prompt') && r.request().method() === 'POST');
      await page.locator('[data-testid="queue-button"] button').first().click();
      const response = await answer;
      if (response.status() !== 200) await fail(`POST /prompt answered ${response.status()}: ${await response.text()}`);
      const body = await response.json();
      say(`QUEUED ${body.prompt_id}`);
    } else if (cmd === 'BADGE') {
      const badge = page.locator('#comfy-multi-queue');
      await badge.waitFor({ state: 'visible' });
      say(`BADGE ${(await badge.textContent()).trim()}`);
    } else if (cmd === 'NO_BADGE') {
      await page.locator('#comfy-multi-queue').waitFor({ state: 'hidden' });
      say('NO_BADGE');
    } else if (cmd === 'RESULT') {
      const id = rest;
      await openSidebar(page, 'queue');
      // The history entry's preview is /view?…&subfolder=<prompt id>…
      const img = page.locator(`.task-item img[src*="${id}"]`).first();
      await img.waitFor();
      await page.waitForFunction((id) => {
        const i = document.querySelector(`.task-item img[src*="${id}"]`);
        return i && i.complete && i.naturalWidth > 0;
      }, id);
      // The SaveImage node shows it too (from the websocket's `executed`).
      await page.waitForFunction((id) => {
        const app = window.comfyAPI.app.app;
        const node = app.graph.nodes.find((n) => n.type === 'SaveImage');
        const imgs = node && node.imgs;
        return imgs && imgs.length > 0 && imgs[0].src.includes(id) && imgs[0].complete && imgs[0].naturalWidth > 0;
      }, id);
      say(`RESULT ${await img.getAttribute('src')}`);
    } else if (cmd === 'TASKS') {
      await openSidebar(page, 'queue');
      // The queue store has loaded once the spinner is gone.
      await page.waitForFunction(() => !document.querySelector('.p-progressspinner'));
      await page.waitForFunction(() => document.querySelector('.task-item') || document.querySelector('.no-results-placeholder'));
      say(`TASKS ${await page.locator('.task-item').count()}`);
    } else if (cmd === 'NODES') {
      say(`NODES ${await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.length)}`);
    } else if (cmd === 'SHOT') {
      fs.mkdirSync(artifacts, { recursive: true });
      const file = path.join(artifacts, `${rest}.png`);
      await page.screenshot({ path: file });
      say(`SHOT ${file}`);
    } else if (cmd === 'FAILURES') {
      say(`FAILURES ${JSON.stringify(failures)}`);
    } else if (cmd === 'QUIT') {
      if (pageErrors.length) await fail(`the page threw: ${pageErrors.join(' | ')}`);
      say('BYE');
      break;
    } else {
      await fail(`unknown command ${cmd}`);
    }
  }
  await cleanup();
}

main().catch(fail);
