// Shared by admin.mjs and editor.mjs: headless Chromium (Debian's
// /usr/bin/chromium; CHROMIUM_PATH overrides it) in a fresh profile, and the
// stdin line protocol (one command per line).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
// A projector-sized window by default; COMFY_MULTI_BROWSER_VIEWPORT=1280x720 for a small one.
const [WIDTH, HEIGHT] = (process.env.COMFY_MULTI_BROWSER_VIEWPORT || '1600x900').split('x').map(Number);

export const say = (line) => process.stdout.write(`${line}\n`);

let context = null;
let profile = null;

// Launches Chromium in a fresh user-data-dir; every wait defaults to `timeout` ms.
export async function launch(timeout) {
  profile = fs.mkdtempSync(path.join(os.tmpdir(), 'comfy-multi-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
    viewport: { width: WIDTH, height: HEIGHT },
    timeout,
  });
  context.setDefaultTimeout(timeout);
  return context;
}

// Closes Chromium and removes its profile.
export async function cleanup() {
  if (context) await context.close().catch(() => {});
  if (profile) fs.rmSync(profile, { recursive: true, force: true });
}

// The commands on stdin, one per non-blank line: { cmd, words, rest } with
// `rest` the line after the command word.
export async function* commands() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const words = line.trim().split(/\s+/);
    const cmd = words[0];
    if (!cmd) continue;
    yield { cmd, words, rest: line.trim().slice(cmd.length).trim() };
  }
}
