// comfy-multi: the participant's place in the shared GPU queue.
//
// A plain ES module the stock ComfyUI editor loads like any extension (the
// gateway lists it in /user/N/api/extensions and serves it at
// /user/N/extensions/comfy-multi/queue.js, so "../../scripts/app.js" is the
// editor's own /user/N/scripts/app.js). It shows a small badge with the
// position of the participant's next waiting workflow and the estimated wait,
// from GET /user/N/_gw/queue, and hides itself when nothing of theirs waits.
// It asks again whenever the server says the queue changed (the websocket's
// `status`), and every few seconds while the badge is shown.
//
// It also keeps participants apart in a shared browser: the editor keeps the
// open workflow and its tabs in the browser's storage, which every /user/N/
// page of this site shares. When another participant than the last one
// opens the editor here, that state is dropped before the editor restores
// it (extensions load before the editor restores its workflow), so nobody
// sees the previous participant's graph.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const OWNER_KEY = "comfy-multi.participant";
const EDITOR_STATE = ["workflow", "Comfy.PreviousWorkflow", "Comfy.OpenWorkflowsPaths", "Comfy.ActiveWorkflowIndex", "litegrapheditor_clipboard"];

function forgetOtherParticipant() {
  try {
    const me = api.api_base;
    const last = localStorage.getItem(OWNER_KEY);
    if (last !== null && last !== me) {
      for (const key of EDITOR_STATE) localStorage.removeItem(key);
      for (const key of Object.keys(sessionStorage)) {
        if (key === "clientId" || key.startsWith("workflow:") || key.startsWith("Comfy.")) sessionStorage.removeItem(key);
      }
    }
    localStorage.setItem(OWNER_KEY, me);
  } catch (e) {
    // Storage disabled: nothing was kept either.
  }
}
forgetOtherParticipant();

const POLL_MS = 5000;
const ID = "comfy-multi-queue";

function waitText(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return "starts in under a minute";
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) return `about ${minutes} min`;
  const h = Math.floor(minutes / 60);
  const m = minutes % 60;
  return `about ${h} h ${m} min`;
}

function badge() {
  let el = document.getElementById(ID);
  if (el) return el;
  el = document.createElement("div");
  el.id = ID;
  el.setAttribute("role", "status");
  el.setAttribute("aria-live", "polite");
  el.title = "Your place in the shared GPU queue (comfy-multi)";
  Object.assign(el.style, {
    position: "fixed",
    left: "76px",
    bottom: "12px",
    zIndex: "1000",
    display: "none",
    padding: "4px 10px",
    borderRadius: "12px",
    font: "12px/1.4 system-ui, sans-serif",
    color: "var(--fg-color, #ddd)",
    background: "var(--comfy-menu-bg, rgba(32, 32, 32, 0.9))",
    border: "1px solid var(--border-color, #444)",
    boxShadow: "0 1px 4px rgba(0, 0, 0, 0.3)",
    pointerEvents: "none",
    whiteSpace: "nowrap",
  });
  document.body.appendChild(el);
  return el;
}

function render(answer) {
  const el = badge();
  const jobs = (answer && answer.jobs) || [];
  if (jobs.length === 0) {
    el.style.display = "none";
    el.textContent = "";
    return false;
  }
  const next = jobs.reduce((a, b) => (b.position < a.position ? b : a));
  const total = answer.queued_total || jobs.length;
  const parts = [`Queue: #${next.position} of ${total}`];
  const wait = waitText(next.wait_seconds);
  if (wait) parts.push(wait);
  if (jobs.length > 1) parts.push(`${jobs.length} of yours waiting`);
  el.textContent = parts.join(" · ");
  el.dataset.position = String(next.position);
  el.style.display = "block";
  return true;
}

let timer = null;
let inFlight = false;
let again = false;

async function refresh() {
  if (inFlight) {
    again = true;
    return;
  }
  inFlight = true;
  clearTimeout(timer);
  let shown = false;
  try {
    const res = await fetch(`${api.api_base}/_gw/queue`, { credentials: "same-origin", cache: "no-store" });
    shown = res.ok ? render(await res.json()) : render(null);
  } catch (e) {
    // Offline for a moment: keep what is shown, try again soon.
    shown = badge().style.display !== "none";
  } finally {
    inFlight = false;
  }
  if (again) {
    again = false;
    return refresh();
  }
  if (shown) timer = setTimeout(refresh, POLL_MS);
}

app.registerExtension({
  name: "comfy-multi.queue",
  async setup() {
    badge();
    api.addEventListener("status", () => refresh());
    api.addEventListener("execution_start", () => refresh());
    refresh();
  },
});
