// comfy-multi admin page: renders the snapshots /admin/ws pushes, and calls
// the /admin/api actions. Plain JavaScript, no build step, no external assets.
'use strict';

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);

  // ---- helpers ------------------------------------------------------------

  const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);

  /** 2.34 -> "2.3 s"; 75 -> "1 min 15 s"; 4000 -> "1 h 06 min". */
  function dur(sec) {
    if (sec === null || sec === undefined) return '–';
    sec = Math.max(0, sec);
    if (sec > 0 && sec < 0.1) return '< 0.1 s';
    if (sec < 10 && !Number.isInteger(sec)) return `${sec.toFixed(1)} s`;
    sec = Math.round(sec);
    if (sec < 60) return `${sec} s`;
    const m = Math.floor(sec / 60), s = sec % 60;
    if (m < 60) return `${m} min ${String(s).padStart(2, '0')} s`;
    const h = Math.floor(m / 60);
    return `${h} h ${String(m % 60).padStart(2, '0')} min`;
  }

  function clock(ms) {
    if (!ms) return '–';
    return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  const shortId = (id) => String(id).slice(0, 8);
  const jobLabel = (j) => `<span class="big">#${esc(j.number)}</span> <span class="id" title="${esc(j.id)}">${esc(shortId(j.id))}</span>`;
  const stateBadge = (state, label) => `<span class="state state-${esc(state)}">${esc(label || state)}</span>`;
  const btn = (action, label, data, cls = '') => {
    const attrs = Object.entries(data).map(([k, v]) => ` data-${k}="${esc(v)}"`).join('');
    return `<button type="button" class="${cls}" data-action="${action}"${attrs}>${esc(label)}</button>`;
  };

  /**
   * Makes tbody's rows match `items` (by key), changing only cells whose
   * HTML differs, so buttons under the pointer survive an update.
   * cellsOf(item) -> [{html, cls}], rowAttrs(item) -> {data-attr: value}.
   */
  function syncRows(tbody, items, keyOf, cellsOf, rowAttrs) {
    const existing = new Map();
    for (const tr of Array.from(tbody.rows)) existing.set(tr.dataset.key, tr);
    let prev = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let tr = existing.get(key);
      if (tr) existing.delete(key);
      else { tr = document.createElement('tr'); tr.dataset.key = key; }
      const cells = cellsOf(item);
      while (tr.cells.length < cells.length) tr.insertCell();
      while (tr.cells.length > cells.length) tr.deleteCell(-1);
      cells.forEach((c, i) => {
        const td = tr.cells[i];
        if (td._html !== c.html) { td.innerHTML = c.html; td._html = c.html; }
        const cls = c.cls || '';
        if (td.className !== cls) td.className = cls;
      });
      for (const [k, v] of Object.entries(rowAttrs ? rowAttrs(item) : {})) {
        if (tr.dataset[k] !== String(v)) tr.dataset[k] = String(v);
      }
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== tr) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const tr of existing.values()) tr.remove();
  }

  let toastTimer = null;
  function toast(message, isError = false) {
    const el = $('#toast');
    el.textContent = message;
    el.classList.toggle('error', isError);
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, isError ? 8000 : 3500);
  }

  async function post(path, body) {
    const res = await fetch(path, {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'content-type': 'application/json' },
      body: body === undefined ? '' : JSON.stringify(body),
    });
    let data = null;
    try { data = await res.json(); } catch (_) { /* not JSON */ }
    if (res.status === 401) {
      location.href = '/admin/login';
      throw new Error('your instructor session ended; log in again');
    }
    if (!res.ok) throw new Error((data && data.error && data.error.message) || `${res.status} ${res.statusText}`);
    return data;
  }

  // ---- rendering ----------------------------------------------------------

  let snap = null;

  function renderHeader(s) {
    const c = s.controls;
    const st = $('#dispatch-state');
    st.textContent = c.paused ? `PAUSED${c.pause_reason ? ': ' + c.pause_reason : ''}` : 'Dispatching';
    st.classList.toggle('paused', c.paused);
    $('#mode-state').textContent = c.mode === 'fair' ? 'Fair (round-robin)' : 'First come, first served';
  }

  function progressCell(r) {
    const p = r.progress;
    if (r.cancel_requested) return { html: '<span class="state state-stopping">stopping…</span>' };
    if (!p) return { html: `<span class="muted">${r.state === 'dispatched' ? 'starting…' : 'working…'}</span>` };
    const node = p.node !== null && p.node !== undefined ? `node ${esc(p.node)}` : '';
    if (typeof p.value === 'number' && typeof p.max === 'number' && p.max > 0) {
      const pct = Math.max(0, Math.min(100, Math.round((100 * p.value) / p.max)));
      return {
        html: `<div class="progress"><div class="track" role="progressbar" aria-valuenow="${pct}" aria-valuemin="0" aria-valuemax="100"><div class="fill" style="width:${pct}%"></div></div>`
          + `<span class="what">${node} · step ${esc(p.value)}/${esc(p.max)}</span></div>`,
      };
    }
    return { html: `<div class="progress"><div class="track indeterminate"><div class="fill"></div></div><span class="what">${node}</span></div>` };
  }

  function renderRunning(s) {
    const rows = s.running;
    $('#running-count').textContent = rows.length ? `(${rows.length} of ${s.controls.slots} GPU${s.controls.slots === 1 ? '' : 's'})` : '';
    $('#running-empty').hidden = rows.length > 0;
    syncRows($('#running tbody'), rows, (r) => r.id, (r) => [
      { html: jobLabel(r) },
      { html: `<span class="big">${esc(r.user)}</span>` },
      { html: stateBadge(r.cancel_requested ? 'stopping' : r.state, r.cancel_requested ? 'cancelling' : r.state) },
      progressCell(r),
      { html: esc(dur(r.elapsed_seconds)), cls: 'num' },
      { html: r.cancel_requested ? '' : btn('cancel', 'Cancel', { job: r.id, number: r.number, user: r.user }, 'danger'), cls: 'act' },
    ], (r) => ({ jobId: r.id, state: r.cancel_requested ? 'cancelling' : r.state }));
  }

  function renderQueue(s) {
    const rows = s.queue;
    $('#queue-count').textContent = rows.length ? `(${rows.length} waiting)` : '';
    $('#queue-empty').hidden = rows.length > 0;
    syncRows($('#queue tbody'), rows, (q) => q.id, (q) => {
      const tier = q.tier > 0
        ? `<span class="front">front</span>${q.user_raised && !q.job_raised ? ' <span class="muted">(participant)</span>' : ''}`
        : '<span class="normal">normal</span>';
      const move = q.job_raised
        ? btn('lower', 'Lower', { job: q.id })
        : btn('raise', 'Raise', { job: q.id });
      return [
        { html: `<span class="big">${esc(q.position)}</span>`, cls: 'num' },
        { html: `<span class="big">${esc(q.user)}</span>` },
        { html: jobLabel(q) },
        { html: stateBadge(q.state, q.attempts > 0 ? 'requeued' : q.state) },
        { html: esc(dur(q.waited_seconds)), cls: 'num' },
        { html: tier },
        { html: q.estimated_wait_seconds === null || q.estimated_wait_seconds === undefined ? '<span class="muted">–</span>' : `in ${esc(dur(q.estimated_wait_seconds))}`, cls: 'num' },
        { html: move + btn('cancel', 'Cancel', { job: q.id, number: q.number, user: q.user }, 'danger'), cls: 'act' },
      ];
    }, (q) => ({ jobId: q.id, state: q.state, position: q.position }));
  }

  function renderCluster(s) {
    const c = s.cluster;
    const reach = (name, ok, extra) => {
      if (ok === null || ok === undefined) return `<span>${name}: <span class="muted">not configured</span></span>`;
      return `<span>${name}: <span class="${ok ? 'good' : 'bad'}">${ok ? 'reachable' : 'UNREACHABLE'}</span>${extra ? ` <span class="muted">${esc(extra)}</span>` : ''}</span>`;
    };
    const parts = [`<span>Executor: <strong>${esc(c.executor)}</strong></span>`];
    if (c.executor === 'nomad') parts.push(reach('Nomad', c.nomad_reachable, c.nomad_error));
    parts.push(reach('Consul', c.consul_reachable));
    const html = parts.join('');
    const line = $('#cluster-status');
    if (line._html !== html) { line.innerHTML = html; line._html = html; }
    let note = c.note || '';
    if (!note && c.nomad_reachable && c.nodes.length === 0) note = 'Nomad knows no nodes: is the GPU node up?';
    if (!note && c.nodes_scope === 'all' && c.nodes.length) note = `No node is in pool "${c.node_pool}"; showing every node.`;
    $('#cluster-note').textContent = note;
    $('#cluster-note').hidden = !note;
    syncRows($('#nodes tbody'), c.nodes, (n) => n.id, (n) => [
      { html: `<strong>${esc(n.name)}</strong> <span class="id">${esc(shortId(n.id))}</span>${n.error ? `<br><span class="bad">${esc(n.error)}</span>` : ''}` },
      { html: `<span class="${n.status === 'ready' ? 'good' : 'bad'}">${esc(n.status)}</span>` },
      { html: `<span class="${n.eligibility === 'eligible' ? 'good' : 'bad'}">${esc(n.eligibility)}</span>` },
      { html: n.drain ? '<span class="bad">draining</span>' : '<span class="muted">no</span>' },
      { html: n.gpus.length ? `<strong>${n.gpus.length}</strong> <span class="id">${n.gpus.map((g) => esc(g)).join('<br>')}</span>` : '<span class="muted">none</span>' },
      { html: esc(n.allocations), cls: 'num' },
    ], (n) => ({ node: n.name }));
  }

  function renderParticipants(s) {
    const ps = s.participants;
    const online = ps.filter((p) => p.online).length;
    $('#participants-count').textContent = `(${online} of ${ps.length} online)`;
    syncRows($('#participants tbody'), ps, (p) => p.user, (p) => [
      { html: `<span class="big">${esc(p.user)}</span>`, cls: 'num' },
      { html: p.online ? '<span class="online">online</span>' : `<span class="offline">${p.last_seen ? 'seen ' + esc(clock(p.last_seen)) : 'never'}</span>` },
      { html: esc(p.queued), cls: 'num' },
      { html: esc(p.running), cls: 'num' },
      { html: esc(p.done), cls: 'num' },
      { html: p.failed ? `<span class="bad">${esc(p.failed)}</span>` : '0', cls: 'num' },
      { html: esc(p.cancelled), cls: 'num' },
      { html: p.raised ? '<span class="front">front</span>' : '<span class="normal">normal</span>' },
      { html: p.enabled ? (p.has_code ? 'enabled' : '<span class="bad">no code</span>') : '<span class="bad">DISABLED</span>' },
      {
        html: (p.raised ? btn('lower-user', 'Lower', { user: p.user }) : btn('raise-user', 'Raise', { user: p.user }))
          + btn('reset', 'New code', { user: p.user })
          + (p.enabled ? btn('disable', 'Disable', { user: p.user }, 'danger') : btn('enable', 'Enable', { user: p.user }, 'go')),
        cls: 'act',
      },
    ], (p) => ({ user: p.user, online: p.online }));
  }

  function renderRecent(s) {
    $('#recent-empty').hidden = s.recent.length > 0;
    syncRows($('#recent tbody'), s.recent, (j) => j.id, (j) => [
      { html: jobLabel(j) },
      { html: `<span class="big">${esc(j.user)}</span>` },
      { html: stateBadge(j.state) + (j.error && j.state !== 'cancelled' ? ` <span class="muted">${esc(j.error)}</span>` : '') },
      { html: esc(dur(j.run_seconds)), cls: 'num' },
      { html: esc(clock(j.finished_at)) },
    ], (j) => ({ jobId: j.id, state: j.state }));
  }

  /** The report's headline numbers (dispatcher::report) as tiles. */
  function metricTiles(m) {
    if (!m || typeof m !== 'object' || !m.totals) return [];
    const t = m.totals;
    const secs = (v) => (typeof v === 'number' ? dur(v) : '–');
    const tiles = [
      ['jobs submitted', t.submitted],
      ['succeeded', t.succeeded],
      ['failed', t.failed],
      ['cancelled', t.cancelled],
      ['median wait', secs(m.wait && m.wait.p50_s)],
      ['95 % waited less than', secs(m.wait && m.wait.p95_s)],
      ['median run', secs(m.run && m.run.p50_s)],
      ['peak participants with jobs', m.peak_concurrent_participants],
      ['GPU busy', typeof m.gpu_busy_fraction === 'number' ? `${Math.round(m.gpu_busy_fraction * 100)} %` : '–'],
      ['workshop time', secs(m.window && m.window.duration_s)],
    ];
    if (m.failures && m.failures.length) {
      tiles.push(['top failure', `${m.failures[0].count}× ${m.failures[0].reason}`]);
    }
    return tiles.filter(([, v]) => v !== undefined && v !== null);
  }

  function renderMetrics(s) {
    const tiles = metricTiles(s.metrics);
    const html = tiles.map(([k, v]) => `<div class="tile"><div class="v${String(v).length > 14 ? ' text' : ''}">${esc(v)}</div><div class="k">${esc(k)}</div></div>`).join('');
    const el = $('#metrics');
    if (el._html !== html) { el.innerHTML = html; el._html = html; }
    $('#metrics-section').hidden = tiles.length === 0;
  }

  function renderControls(s) {
    const c = s.controls;
    $('#pause').hidden = c.paused;
    $('#resume').hidden = !c.paused;
    $('#pause-reason').hidden = c.paused;
    for (const b of document.querySelectorAll('button.mode')) {
      b.setAttribute('aria-pressed', String(b.dataset.mode === c.mode));
    }
    for (const input of $('#limits').elements) {
      if (input.name && !input.classList.contains('dirty') && document.activeElement !== input) {
        input.value = c.limits[input.name];
      }
    }
  }

  // What is down, and since when (dispatcher::health, and Consul as the gateway sees it).
  const TITLES = { redis: 'Redis', nomad: 'Nomad', consul: 'Consul', comfyui: 'ComfyUI', dispatcher: 'The dispatcher' };
  function renderHealth(s) {
    const lines = [];
    const components = (s.health && s.health.components) || {};
    for (const [name, o] of Object.entries(components)) {
      if (!o || o.status !== 'down') continue;
      const since = o.since ? ` since ${new Date(o.since).toLocaleTimeString()}` : '';
      const what = name === 'dispatcher' ? 'not running' : 'unreachable';
      lines.push(`${TITLES[name] || name} ${what}${since}${o.error ? ` — ${o.error}` : ''}`);
    }
    if (s.cluster && s.cluster.consul_reachable === false && !components.consul) lines.push('Consul unreachable');
    const el = $('#health-banner');
    const text = lines.join('\n');
    if (el.textContent !== text) el.textContent = text;
    el.hidden = !text;
  }

  function render(s) {
    snap = s;
    renderHealth(s);
    renderHeader(s);
    renderMetrics(s);
    renderRunning(s);
    renderQueue(s);
    renderControls(s);
    renderCluster(s);
    renderParticipants(s);
    renderRecent(s);
  }

  // ---- the live connection --------------------------------------------------

  let retry = 0;
  let everLive = false;

  function setConn(state, text) {
    const el = $('#conn');
    el.textContent = text;
    el.classList.toggle('live', state === 'live');
    document.body.dataset.live = state === 'live' ? '1' : '0';
  }

  function banner(text) {
    const el = $('#banner');
    el.textContent = text || '';
    el.hidden = !text;
  }

  async function stillAdmin() {
    try {
      const res = await fetch('/admin/api/whoami', { credentials: 'same-origin' });
      return res.status !== 401;
    } catch (_) {
      return true; // the gateway is down: keep trying
    }
  }

  function connect() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/admin/ws`);
    ws.onmessage = (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch (_) { return; }
      if (data.error && !data.controls) {
        banner(`The gateway cannot read the queue: ${data.error.message}`);
        return;
      }
      banner('');
      retry = 0;
      everLive = true;
      render(data);
      setConn('live', 'live');
    };
    ws.onclose = async (ev) => {
      setConn('down', everLive ? 'reconnecting…' : 'connecting…');
      if (ev.code === 4401 || !(await stillAdmin())) {
        location.href = '/admin/login';
        return;
      }
      retry += 1;
      const wait = Math.min(5000, 300 * 2 ** Math.min(retry, 5));
      setTimeout(connect, wait);
    };
  }

  // ---- actions ----------------------------------------------------------------

  async function act(button, fn) {
    button.disabled = true;
    try {
      const message = await fn();
      if (message) toast(message);
    } catch (e) {
      toast(e.message, true);
    } finally {
      button.disabled = false;
    }
  }

  function showCode(r) {
    $('#code-user').textContent = r.user;
    $('#code-value').textContent = r.code;
    $('#code-note').textContent = r.warning || (r.handout ? `Also appended to ${r.handout}.` : '');
    $('#code-box').hidden = false;
    $('#code-close').focus();
  }

  const actions = {
    async cancel(d) {
      if (!confirm(`Cancel job #${d.number} of participant ${d.user}?`)) return null;
      const r = await post(`/admin/api/jobs/${encodeURIComponent(d.job)}/cancel`);
      return {
        removed: `Job #${d.number} cancelled.`,
        stopping: `Job #${d.number} is being stopped.`,
        already_ended: `Job #${d.number} had already ended (${r.state}).`,
      }[r.outcome] || 'Done.';
    },
    async raise(d) { await post(`/admin/api/jobs/${encodeURIComponent(d.job)}/raise`); return 'Job moved to the front tier.'; },
    async lower(d) { await post(`/admin/api/jobs/${encodeURIComponent(d.job)}/lower`); return 'Job back in the normal tier.'; },
    async 'raise-user'(d) { await post(`/admin/api/users/${d.user}/raise`); return `Participant ${d.user}'s jobs go first now.`; },
    async 'lower-user'(d) { await post(`/admin/api/users/${d.user}/lower`); return `Participant ${d.user} is back in the normal tier.`; },
    async reset(d) {
      if (!confirm(`Give participant ${d.user} a new access code? The old code and their open sessions stop working.`)) return null;
      showCode(await post(`/admin/api/accounts/${d.user}/reset`));
      return null;
    },
    async disable(d) {
      if (!confirm(`Disable participant ${d.user}? They are logged out and cannot submit until enabled again.`)) return null;
      await post(`/admin/api/accounts/${d.user}/disable`);
      return `Participant ${d.user} disabled.`;
    },
    async enable(d) { await post(`/admin/api/accounts/${d.user}/enable`); return `Participant ${d.user} enabled.`; },
  };

  function wire() {
    document.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-action]');
      if (!b || b.disabled) return;
      const fn = actions[b.dataset.action];
      if (fn) act(b, () => fn({ ...b.dataset }));
    });
    $('#pause').addEventListener('click', (ev) => act(ev.currentTarget, async () => {
      const reason = $('#pause-reason').value.trim();
      await post('/admin/api/pause', reason ? { reason } : {});
      $('#pause-reason').value = '';
      return 'Dispatching paused: running jobs go on, nothing new starts.';
    }));
    $('#resume').addEventListener('click', (ev) => act(ev.currentTarget, async () => {
      await post('/admin/api/resume');
      return 'Dispatching resumed.';
    }));
    for (const b of document.querySelectorAll('button.mode')) {
      b.addEventListener('click', () => act(b, async () => {
        if (snap && snap.controls.mode === b.dataset.mode) return null;
        await post('/admin/api/mode', { mode: b.dataset.mode });
        return `Mode: ${b.textContent}.`;
      }));
    }
    const form = $('#limits');
    form.addEventListener('input', (ev) => ev.target.classList.add('dirty'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const body = {};
      for (const input of form.elements) {
        if (input.name) body[input.name] = Number(input.value);
      }
      act(form.querySelector('button[type=submit]'), async () => {
        await post('/admin/api/limits', body);
        for (const input of form.elements) input.classList.remove('dirty');
        return 'Limits saved.';
      });
    });
    $('#add-participant').addEventListener('click', (ev) => act(ev.currentTarget, async () => {
      showCode(await post('/admin/api/accounts'));
      return null;
    }));
    $('#code-close').addEventListener('click', () => {
      $('#code-box').hidden = true;
      $('#code-value').textContent = '';
    });
  }

  wire();
  connect();
})();
