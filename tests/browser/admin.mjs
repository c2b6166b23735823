// Drives the admin page in headless Chromium (Debian's /usr/bin/chromium)
// for tests/tests/admin_page.rs.
//
//   node tests/browser/admin.mjs <gateway url> <admin token> <screenshot.png>
//
// It logs in at /admin/login with the admin token, waits until the page is
// live (first websocket snapshot rendered), prints `READY`, then obeys one
// command per stdin line and answers one line on stdout:
//
//   WAIT_ROW <job id>   -> SEEN <job id> <queue|running>   (the row appeared, no reload)
//   CANCEL <job id>     -> CANCELLED <job id> <gone|cancelled> (clicked its Cancel,
//                          accepted the confirm; the row left the queue and running tables)
//   CLICK <selector>    -> CLICKED                         (a control, e.g. #pause)
//   WAIT_TEXT <selector> <text> -> TEXT <selector>         (its text contains <text>)
//   SCREENSHOT          -> SHOT <path>                     (full page PNG)
//   QUIT                -> BYE, exit 0
//
// Any failure prints `ERROR <why>` and exits 1; so does a JavaScript error
// on the page. Every wait has a deadline (COMFY_MULTI_BROWSER_TIMEOUT_MS,
// default 30000); nothing sleeps. CHROMIUM_PATH overrides /usr/bin/chromium.
import fs from 'node:fs';
import path from 'node:path';
import { cleanup, commands, launch, say } from './lib.mjs';

const [url, token, shotPath] = process.argv.slice(2);
if (!url || !token || !shotPath) {
  console.error('usage: node admin.mjs <gateway url> <admin token> <screenshot.png>');
  process.exit(2);
}
const TIMEOUT = Number(process.env.COMFY_MULTI_BROWSER_TIMEOUT_MS || 30000);

const pageErrors = [];

async function fail(why) {
  say(`ERROR ${String(why).replace(/\s+/g, ' ')}`);
  await cleanup();
  process.exit(1);
}

process.on('unhandledRejection', (e) => fail(e && e.stack ? e.stack : e));

const rowSel = (table, id) => `#${table} tbody tr[data-job-id="${id}"]`;

async function main() {
  const context = await launch(TIMEOUT);
  const page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') process.stderr.write(`[page console] ${m.text()}\n`); });
  page.on('dialog', (d) => d.accept());
  page.on('response', (r) => { if (r.status() >= 400) process.stderr.write(`[page] ${r.status()} ${r.url()}\n`); });

  await page.goto(`${url}/admin/login`);
  await page.fill('#secret', token);
  await Promise.all([page.waitForURL(`${url}/admin/`), page.click('button[type=submit]')]);
  await page.waitForSelector('body[data-live="1"]');
  // A marker a reload would lose: rows must appear through the websocket.
  await page.evaluate(() => { window.__noReload = true; });
  say('READY');

  for await (const { cmd, words: [, arg], rest } of commands()) {
    if (cmd === 'WAIT_ROW') {
      const where = await page.waitForFunction((id) => {
        for (const t of ['queue', 'running']) {
          if (document.querySelector(`#${t} tbody tr[data-job-id="${id}"]`)) return t;
        }
        return null;
      }, arg);
      const table = await where.jsonValue();
      if (!(await page.evaluate(() => window.__noReload === true))) await fail('the page reloaded');
      say(`SEEN ${arg} ${table}`);
    } else if (cmd === 'CANCEL') {
      let button = null;
      for (const t of ['queue', 'running']) {
        const b = page.locator(`${rowSel(t, arg)} button[data-action="cancel"]`);
        if (await b.count()) { button = b; break; }
      }
      if (!button) await fail(`no cancel button for job ${arg}`);
      await button.click();
      const how = await page.waitForFunction((id) => {
        const rows = ['queue', 'running'].map((t) => document.querySelector(`#${t} tbody tr[data-job-id="${id}"]`)).filter(Boolean);
        if (rows.length === 0) return 'gone';
        return rows.every((r) => r.dataset.state === 'cancelled') ? 'cancelled' : null;
      }, arg);
      say(`CANCELLED ${arg} ${await how.jsonValue()}`);
    } else if (cmd === 'CLICK') {
      await page.click(rest);
      say('CLICKED');
    } else if (cmd === 'WAIT_TEXT') {
      const text = rest.slice(arg.length).trim();
      await page.waitForFunction(([sel, t]) => {
        const el = document.querySelector(sel);
        return el && el.textContent.includes(t);
      }, [arg, text]);
      say(`TEXT ${arg}`);
    } else if (cmd === 'SCREENSHOT') {
      fs.mkdirSync(path.dirname(shotPath), { recursive: true });
      await page.screenshot({ path: shotPath, fullPage: true });
      say(`SHOT ${shotPath}`);
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
