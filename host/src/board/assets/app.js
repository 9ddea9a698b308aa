// ferrotune board: the page. Vanilla ES2020, no dependencies, no build step. Served by
// `ferrotune board` (host/src/board) from the binary; talks only to the same origin (the HTTP
// contract is in host/src/board/assets/README.md). Hash routes: #runs, #new, #data, #chat,
// #run/NAME. Charts are inline SVG drawn here.
'use strict';

// ---------------------------------------------------------------------------------------------
// Small helpers

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** The token from the address (?token=T): sent as a header too, so the page also works where
 *  the cookie is not kept. The cookie set by `GET /?token=T` is enough on its own. */
const TOKEN = new URLSearchParams(location.search).get('token');

function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(TOKEN);
}

/** Builds an element: el('div', {class: 'x', dataset: {run: 'a'}}, child, 'text', …). */
function el(tag, attrs = {}, ...children) {
  const svgTags = new Set(['svg', 'polyline', 'line', 'text', 'g', 'circle', 'rect', 'path']);
  const e = svgTags.has(tag)
    ? document.createElementNS('http://www.w3.org/2000/svg', tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k in e && !svgTags.has(tag) && k !== 'list' && k !== 'type') e[k] = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function escapeXml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

/** The message of a failed request or a thrown error. */
function messageOf(err) {
  if (err && typeof err.message === 'string' && err.message) return err.message;
  return String(err);
}

/** Shows `err` in the `.error` element `box` (null clears it). */
function showError(box, err) {
  if (!box) return;
  if (err === null || err === undefined) {
    box.textContent = '';
    box.hidden = true;
    return;
  }
  box.textContent = messageOf(err);
  box.hidden = false;
}

/** A JSON request to the board. Non-2xx answers throw an Error carrying the server's
 *  `error.message` (or the status line and the start of the body when it is not JSON). */
async function api(path, { method = 'GET', body } = {}) {
  const headers = {};
  if (TOKEN) headers.Authorization = 'Bearer ' + TOKEN;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
    });
  } catch (e) {
    throw new Error(`${method} ${path}: the board did not answer (${messageOf(e)})`);
  }
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = null;
  }
  if (!res.ok) {
    const msg = json && json.error && json.error.message;
    throw new Error(msg || `${method} ${path}: ${res.status} ${res.statusText} ${text.slice(0, 300)}`.trim());
  }
  return json;
}

/** Runs an async action for a button: disables it while running, shows a failure in `box`. */
async function act(button, box, fn) {
  showError(box, null);
  if (button) button.disabled = true;
  try {
    return await fn();
  } catch (e) {
    showError(box, e);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

function setState(node, state) {
  node.dataset.state = state || 'unknown';
  node.className = node.className.replace(/\bstate-\S+/g, '').trim();
  node.classList.add('badge', 'state-' + (state || 'unknown'));
  node.textContent = state || 'unknown';
}

function fmtNumber(v) {
  if (typeof v !== 'number' || !Number.isFinite(v)) return '–';
  const a = Math.abs(v);
  if (a === 0) return '0';
  if (a >= 1e6) return (v / 1e6).toPrecision(3) + 'M';
  if (a >= 1e4) return (v / 1e3).toPrecision(3) + 'k';
  if (a < 1e-3) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

function fmtAgo(unixSecs) {
  if (typeof unixSecs !== 'number') return '–';
  const s = Math.max(0, Date.now() / 1000 - unixSecs);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(unixSecs * 1000).toLocaleDateString();
}

/** A name the serve engine accepts for an adapter. */
function adapterName(s) {
  const n = String(s).replace(/[^A-Za-z0-9_.-]+/g, '-').replace(/^-+|-+$/g, '');
  return n || 'adapter';
}

const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#ca8a04', '#db2777', '#4b5563'];

// Safety nets: nothing may end as an uncaught error in the console.
window.addEventListener('unhandledrejection', (ev) => {
  ev.preventDefault();
  showError($('#global-error'), ev.reason);
});
window.addEventListener('error', (ev) => {
  showError($('#global-error'), ev.error || ev.message);
});

// ---------------------------------------------------------------------------------------------
// Routing

let current = null; // {leave()}
let routeGen = 0;

const PAGES = {
  runs: { enter: enterRuns, leave: leaveRuns },
  run: { enter: enterRun, leave: leaveRun },
  new: { enter: enterNew, leave: () => {} },
  data: { enter: enterData, leave: () => {} },
  chat: { enter: enterChat, leave: () => {} },
};

function parseHash() {
  let h = location.hash.replace(/^#\/?/, '');
  try {
    h = decodeURIComponent(h);
  } catch (_) {
    /* keep it raw */
  }
  if (h.startsWith('run/') && h.length > 4) return ['run', h.slice(4)];
  return [PAGES[h] && h !== 'run' ? h : 'runs', null];
}

function route() {
  const [page, arg] = parseHash();
  if (current) {
    try {
      current.leave();
    } catch (e) {
      showError($('#global-error'), e);
    }
  }
  routeGen += 1;
  for (const s of $$('main > section.page')) s.hidden = s.id !== 'page-' + page;
  for (const a of $$('nav a[data-page]')) a.classList.toggle('active', a.dataset.page === page || (page === 'run' && a.dataset.page === 'runs'));
  current = PAGES[page];
  document.title = 'ferrotune board · ' + (page === 'run' ? arg : page);
  Promise.resolve()
    .then(() => current.enter(arg, routeGen))
    .catch((e) => showError($('#global-error'), e));
}

// ---------------------------------------------------------------------------------------------
// Runs list

let runsTimer = null;
let runsCache = [];

async function fetchRuns() {
  const r = await api('/api/runs');
  runsCache = (r && r.runs) || [];
  return runsCache;
}

function enterRuns() {
  refreshRuns();
  runsTimer = setInterval(refreshRuns, 2000);
}

function leaveRuns() {
  clearInterval(runsTimer);
  runsTimer = null;
}

async function refreshRuns() {
  const box = $('#runs-error');
  let runs;
  try {
    runs = await fetchRuns();
    showError(box, null);
  } catch (e) {
    showError(box, e);
    return;
  }
  const tbody = $('#runs-table tbody');
  const seen = new Set();
  for (const run of runs) {
    seen.add(run.name);
    let tr = $$('tr[data-run]', tbody).find((t) => t.dataset.run === run.name);
    if (!tr) {
      const link = el('a', { href: '#run/' + encodeURIComponent(run.name), text: run.name });
      tr = el(
        'tr',
        { dataset: { run: run.name } },
        el('td', { class: 'name' }, link),
        el('td', {}, el('span', { class: 'badge' })),
        el('td', { class: 'num steps' }),
        el('td', { class: 'num loss' }),
        el('td', { class: 'num ckpts' }),
        el('td', { class: 'modified' }),
      );
      tr.addEventListener('click', (ev) => {
        if (ev.target.tagName !== 'A') location.hash = '#run/' + encodeURIComponent(run.name);
      });
      tbody.append(tr);
    }
    tr.dataset.state = run.state;
    setState($('.badge', tr), run.state);
    if (run.started_by_board) $('.name', tr).title = 'started from this board';
    $('.steps', tr).textContent = run.steps ?? '–';
    const last = run.last || {};
    $('.loss', tr).textContent = fmtNumber(last.loss ?? last.eval_loss);
    $('.ckpts', tr).textContent = (run.checkpoints || []).length;
    const mod = $('.modified', tr);
    mod.textContent = fmtAgo(run.modified);
    mod.title = typeof run.modified === 'number' ? new Date(run.modified * 1000).toLocaleString() : '';
  }
  for (const tr of $$('tr[data-run]', tbody)) if (!seen.has(tr.dataset.run)) tr.remove();
  $('#runs-empty').hidden = runs.length > 0;
}

// ---------------------------------------------------------------------------------------------
// Charts

const METRICS = [
  { key: 'loss', title: 'loss' },
  { key: 'eval_loss', title: 'eval loss' },
  { key: 'lr', title: 'learning rate' },
  { key: 'grad_norm', title: 'gradient norm' },
  { key: 'tokens_per_s', title: 'tokens / s' },
];

/** Round tick steps (1, 2, 5 × 10^k) covering [lo, hi]. */
function niceScale(lo, hi, count = 5, integer = false) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return { lo: 0, hi: 1, ticks: [0, 0.5, 1] };
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) {
    const d = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= d;
    hi += d;
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  let step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  if (integer) step = Math.max(1, step);
  const nlo = Math.floor(lo / step + 1e-9) * step;
  const nhi = Math.ceil(hi / step - 1e-9) * step;
  const ticks = [];
  for (let v = nlo, i = 0; v <= nhi + step * 1e-6 && i < 50; v += step, i += 1) ticks.push(Number(v.toPrecision(12)));
  return { lo: nlo, hi: nhi, ticks };
}

/** TensorBoard-style debiased exponential moving average. */
function smooth(points, weight = 0.6) {
  let last = 0;
  let n = 0;
  return points.map(([x, y]) => {
    last = last * weight + (1 - weight) * y;
    n += 1;
    return [x, last / (1 - weight ** n)];
  });
}

/** Draws one chart: `series` is [{run, color, points: [[step, value], …]}]. */
function drawChart(svg, metric, series, { smoothLoss = false } = {}) {
  const W = 480;
  const H = 230;
  const m = { l: 58, r: 12, t: 10, b: 34 };
  const all = series.flatMap((s) => s.points);
  let parts = [];
  if (all.length === 0) {
    parts.push(`<text class="empty" x="${W / 2}" y="${H / 2}" text-anchor="middle">no ${escapeXml(metric)} yet</text>`);
  }
  const xs = niceScale(Math.min(...all.map((p) => p[0]), 0), Math.max(...all.map((p) => p[0]), 1), 6, true);
  const ys = niceScale(Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1])), 4);
  const px = (x) => m.l + ((x - xs.lo) / (xs.hi - xs.lo)) * (W - m.l - m.r);
  const py = (y) => H - m.b - ((y - ys.lo) / (ys.hi - ys.lo)) * (H - m.t - m.b);
  if (all.length > 0) {
    for (const t of ys.ticks) {
      const y = py(t).toFixed(1);
      parts.push(`<line class="grid" x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}"/>`);
      parts.push(`<text class="tick" x="${m.l - 6}" y="${y}" dy="0.32em" text-anchor="end">${escapeXml(fmtNumber(t))}</text>`);
    }
    for (const t of xs.ticks) {
      const x = px(t).toFixed(1);
      parts.push(`<line class="tickmark" x1="${x}" x2="${x}" y1="${H - m.b}" y2="${H - m.b + 4}"/>`);
      parts.push(`<text class="tick" x="${x}" y="${H - m.b + 16}" text-anchor="middle">${escapeXml(fmtNumber(t))}</text>`);
    }
    parts.push(`<line class="axis" x1="${m.l}" x2="${W - m.r}" y1="${H - m.b}" y2="${H - m.b}"/>`);
    parts.push(`<line class="axis" x1="${m.l}" x2="${m.l}" y1="${m.t}" y2="${H - m.b}"/>`);
    parts.push(`<text class="axis-label" x="${W - m.r}" y="${H - 4}" text-anchor="end">step</text>`);
  }
  for (const s of series) {
    const pts = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ');
    const faded = smoothLoss && s.points.length > 2;
    parts.push(
      `<polyline class="series${faded ? ' faded' : ''}" data-run="${escapeXml(s.run)}" data-points="${s.points.length}" ` +
        `stroke="${s.color}" points="${pts}"/>`,
    );
    if (s.points.length === 1) {
      parts.push(`<circle class="dot" cx="${px(s.points[0][0]).toFixed(1)}" cy="${py(s.points[0][1]).toFixed(1)}" r="3" fill="${s.color}"/>`);
    }
    if (faded) {
      const sm = smooth(s.points)
        .map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`)
        .join(' ');
      parts.push(`<polyline class="smoothed" data-run="${escapeXml(s.run)}" stroke="${s.color}" points="${sm}"/>`);
    }
  }
  svg.innerHTML = parts.join('');
}

// ---------------------------------------------------------------------------------------------
// One run

/** The state of the open run page: its streams, the metrics lines of each shown run. */
let runView = null;

function enterRun(name, gen) {
  const page = $('#page-run');
  page.dataset.run = name;
  $('#run-title').textContent = name;
  setState($('#run-state'), 'loading');
  $('#run-log').textContent = '';
  $('#run-config').textContent = '';
  $('#run-checkpoints').textContent = '';
  $('#run-info').textContent = '';
  $('#run-overlays').textContent = '';
  // Nothing of the run shown before stays drawn.
  for (const node of $$('#page-run svg.chart, #page-run .legend')) node.textContent = '';
  $('#run-final').hidden = true;
  $('#run-checkpoints-empty').hidden = false;
  showError($('#run-error'), null);
  showError($('#run-action-error'), null);
  runView = {
    name,
    gen,
    sources: new Map(), // run name -> {es, color, lines: []}
    logEs: null,
    redrawTimer: null,
    detailsTimer: null,
    state: null,
  };
  // The streams open once the run is known to exist (a wrong name gets the server's message,
  // not a stream that fails); a failed look-up is retried every 5 s.
  const view = runView;
  const openStreams = (ok) => {
    if (!ok || runView !== view || view.streamsOpen) return;
    view.streamsOpen = true;
    addSeries(name, true);
    openLog(name);
  };
  loadRunDetails().then(openStreams);
  loadOverlayChoices();
  runView.detailsTimer = setInterval(() => {
    if (!runView) return;
    if (!runView.streamsOpen) loadRunDetails().then(openStreams);
    else if (runView.state === 'running') loadRunDetails();
  }, 5000);
  scheduleRedraw();
}

function leaveRun() {
  if (!runView) return;
  for (const src of runView.sources.values()) src.es.close();
  if (runView.logEs) runView.logEs.close();
  clearTimeout(runView.redrawTimer);
  clearInterval(runView.detailsTimer);
  runView = null;
}

function nextColor() {
  const used = new Set(Array.from(runView.sources.values()).map((s) => s.color));
  return PALETTE.find((c) => !used.has(c)) || PALETTE[runView.sources.size % PALETTE.length];
}

/** Opens the metrics stream of `name` and shows its series on the charts. */
function addSeries(name, main = false) {
  const view = runView;
  const es = new EventSource(withToken('/api/runs/' + encodeURIComponent(name) + '/metrics'));
  // raw: the lines as received (to recognise a replay); replay: the index being compared
  // while a reconnection replays the file, or -1.
  const src = { es, color: nextColor(), lines: [], raw: [], replay: -1, main };
  view.sources.set(name, src);
  // Every (re)connection replays metrics.jsonl from its start: lines equal to those already
  // drawn are skipped, the first different one cuts the rest (a resumed run rewrote the file),
  // so a reconnection neither duplicates nor blinks.
  es.addEventListener('open', () => {
    src.replay = src.raw.length ? 0 : -1;
  });
  es.addEventListener('reset', () => {
    src.lines = [];
    src.raw = [];
    src.replay = -1;
    scheduleRedraw();
  });
  es.addEventListener('metric', (ev) => {
    if (src.replay >= 0) {
      if (src.replay < src.raw.length && src.raw[src.replay] === ev.data) {
        src.replay += 1;
        if (src.replay === src.raw.length) src.replay = -1;
        return;
      }
      src.raw.length = src.replay;
      src.lines.length = src.replay;
      src.replay = -1;
    }
    let line;
    try {
      line = JSON.parse(ev.data);
    } catch (e) {
      showError($('#run-error'), `metrics of ${name}: a line that is not JSON: ${ev.data.slice(0, 120)}`);
      return;
    }
    src.raw.push(ev.data);
    src.lines.push(line);
    scheduleRedraw();
  });
  if (main) {
    es.addEventListener('state', (ev) => {
      try {
        onRunState(JSON.parse(ev.data).state);
      } catch (_) {
        /* a malformed state event changes nothing */
      }
    });
  }
}

function removeSeries(name) {
  const src = runView && runView.sources.get(name);
  if (!src) return;
  src.es.close();
  runView.sources.delete(name);
  scheduleRedraw();
}

function onRunState(state) {
  if (!runView || !state) return;
  const changed = runView.state !== null && runView.state !== state;
  runView.state = state;
  setState($('#run-state'), state);
  $('#stop-run').disabled = state !== 'running';
  // The board resumes stopped or failed runs (from their newest checkpoint).
  $('#resume-run').disabled = state === 'running' || state === 'finished';
  if (changed) loadRunDetails();
}

function openLog(name) {
  const pre = $('#run-log');
  const es = new EventSource(withToken('/api/runs/' + encodeURIComponent(name) + '/log'));
  runView.logEs = es;
  // Like the metrics, the log replays train.log from its start on every (re)connection:
  // what matches the text already shown is skipped; a difference starts the log over.
  let shown = ''; // everything received (up to LOG_KEEP characters)
  let replay = -1; // position in `shown` while a reconnection replays it, or -1
  const LOG_KEEP = 4_000_000;
  const clear = () => {
    pre.textContent = '';
    shown = '';
  };
  es.addEventListener('open', () => {
    if (shown.length >= LOG_KEEP) clear();
    replay = shown.length ? 0 : -1;
  });
  es.addEventListener('reset', () => {
    clear();
    replay = -1;
  });
  es.addEventListener('log', (ev) => {
    let text;
    try {
      text = JSON.parse(ev.data).text;
    } catch (_) {
      text = ev.data;
    }
    if (typeof text !== 'string' || !text) return;
    if (replay >= 0) {
      const same = shown.slice(replay, replay + text.length);
      if (text.startsWith(same) && same.length > 0) {
        replay += same.length;
        text = text.slice(same.length);
        if (replay >= shown.length) replay = -1;
        if (!text) return;
      } else {
        clear();
        replay = -1;
      }
    }
    shown += text;
    if (shown.length > LOG_KEEP) shown = shown.slice(-LOG_KEEP);
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    pre.append(document.createTextNode(text));
    if (pre.childNodes.length > 500) pre.normalize();
    if (pre.textContent.length > 2_000_000) pre.textContent = '…\n' + pre.textContent.slice(-1_000_000);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  });
  es.addEventListener('state', (ev) => {
    try {
      onRunState(JSON.parse(ev.data).state);
    } catch (_) {
      /* ignored */
    }
  });
}

/** Shows the run's details; false when they could not be had. */
async function loadRunDetails() {
  const view = runView;
  if (!view) return false;
  let d;
  try {
    d = await api('/api/runs/' + encodeURIComponent(view.name));
  } catch (e) {
    if (runView === view) showError($('#run-error'), e);
    return false;
  }
  if (runView !== view) return false;
  showError($('#run-error'), null);
  onRunState(d.state);
  $('#run-config').textContent = d.config_yaml || '(no config.yaml in this run)';
  const ul = $('#run-checkpoints');
  ul.textContent = '';
  for (const c of d.checkpoints || []) {
    ul.append(el('li', { dataset: { step: c.step ?? '' } }, el('span', { class: 'ckpt-name', text: c.name }), el('span', { class: 'muted', text: c.step !== undefined && c.step !== null ? ` step ${c.step}` : '' })));
  }
  // Only checkpoint-N folders are list items (what resume starts from); the adapter saved in
  // the run folder itself is a note below.
  $('#run-final').hidden = !d.has_adapter;
  $('#run-checkpoints-empty').hidden = ul.children.length > 0;
  const info = $('#run-info');
  info.textContent = '';
  const row = (k, v) => info.append(el('dt', { text: k }), el('dd', { text: v }));
  row('path', d.path || '–');
  if (d.exit_code !== null && d.exit_code !== undefined) row('exit code', String(d.exit_code));
  if (d.command) row('command', d.command.join(' '));
  if (d.error) info.append(el('dt', { text: 'error' }), el('dd', { class: 'error-text', text: d.error }));
  return true;
}

async function loadOverlayChoices() {
  const view = runView;
  let runs;
  try {
    runs = await fetchRuns();
  } catch (e) {
    if (runView === view) showError($('#run-error'), e);
    return;
  }
  if (runView !== view) return;
  const box = $('#run-overlays');
  box.textContent = '';
  const others = runs.filter((r) => r.name !== view.name);
  if (others.length === 0) box.append(el('span', { class: 'muted', text: 'no other runs' }));
  for (const r of others) {
    const cb = el('input', { type: 'checkbox', class: 'overlay', dataset: { run: r.name } });
    cb.addEventListener('change', () => {
      if (!runView) return;
      if (cb.checked) addSeries(r.name);
      else removeSeries(r.name);
      renderLegends();
    });
    box.append(el('label', { class: 'overlay-choice' }, cb, ' ', r.name, ' ', el('span', { class: 'badge state-' + r.state, dataset: { state: r.state }, text: r.state })));
  }
}

function scheduleRedraw() {
  if (!runView || runView.redrawTimer) return;
  runView.redrawTimer = setTimeout(() => {
    if (!runView) return;
    runView.redrawTimer = null;
    redrawCharts();
  }, 250);
}

function seriesFor(metric) {
  const out = [];
  for (const [run, src] of runView.sources) {
    const points = [];
    src.lines.forEach((line, i) => {
      const v = line[metric];
      if (typeof v !== 'number' || !Number.isFinite(v)) return;
      const step = typeof line.step === 'number' ? line.step : i + 1;
      points.push([step, v]);
    });
    out.push({ run, color: src.color, points });
  }
  return out;
}

function redrawCharts() {
  const smoothOn = $('#smooth-loss').checked;
  for (const { key } of METRICS) {
    const svg = $(`svg.chart[data-metric="${key}"]`);
    if (!svg) continue;
    drawChart(svg, key, seriesFor(key), { smoothLoss: key === 'loss' && smoothOn });
  }
  renderLegends();
}

function renderLegends() {
  if (!runView) return;
  for (const { key } of METRICS) {
    const legend = $(`.legend[data-metric="${key}"]`);
    if (!legend) continue;
    legend.textContent = '';
    for (const s of seriesFor(key)) {
      const last = s.points.length ? s.points[s.points.length - 1][1] : null;
      legend.append(
        el(
          'span',
          { class: 'legend-item', dataset: { run: s.run } },
          el('span', { class: 'swatch', style: `background:${s.color}` }),
          s.run,
          el('span', { class: 'muted', text: last === null ? '' : ' ' + fmtNumber(last) }),
        ),
      );
    }
  }
}

async function runAction(what) {
  const view = runView;
  if (!view) return;
  const button = what === 'stop' ? $('#stop-run') : $('#resume-run');
  const r = await act(button, $('#run-action-error'), () => api(`/api/runs/${encodeURIComponent(view.name)}/${what}`, { method: 'POST' }));
  if (runView !== view) return;
  if (r && r.state) onRunState(r.state);
  else if (runView.state) onRunState(runView.state); // restore the buttons' enabled state
  if (r && what === 'resume') {
    // A resumed run writes on: reconnect the streams so they replay and follow.
    const main = view.sources.get(view.name);
    if (main && main.es.readyState === EventSource.CLOSED) {
      view.sources.delete(view.name);
      addSeries(view.name, true);
    }
    if (view.logEs && view.logEs.readyState === EventSource.CLOSED) openLog(view.name);
  }
  loadRunDetails();
}

// ---------------------------------------------------------------------------------------------
// Schema-driven form fields

/** The JSON types a property accepts (without "null"), and whether it may be null. */
function schemaTypes(s) {
  let t = s.type;
  if (!t && (s.anyOf || s.oneOf)) t = (s.anyOf || s.oneOf).map((x) => x.type).filter(Boolean).flat();
  if (!t && s.default !== undefined) {
    const d = s.default;
    t = d === null ? [] : Array.isArray(d) ? 'array' : typeof d === 'number' ? (Number.isInteger(d) ? 'integer' : 'number') : typeof d;
  }
  const list = (Array.isArray(t) ? t : [t]).filter((x) => x);
  return { types: list.filter((x) => x !== 'null'), nullable: list.includes('null') || s.default === null };
}

function enumOf(s) {
  if (Array.isArray(s.enum)) return s.enum;
  const alts = s.oneOf || s.anyOf;
  if (Array.isArray(alts) && alts.length && alts.every((a) => 'const' in a || a.type === 'null')) {
    return alts.filter((a) => 'const' in a).map((a) => a.const);
  }
  return null;
}

function showDefault(v) {
  if (v === undefined || v === null) return '';
  if (Array.isArray(v) && v.every((x) => typeof x === 'string' || typeof x === 'number')) return v.join(', ');
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

/** One labelled input for property `key` of `schema`, named `prefix.key`. */
function fieldFor(prefix, key, s, required) {
  s = s || {};
  const name = `${prefix}.${key}`;
  const { types, nullable } = schemaTypes(s);
  const en = enumOf(s);
  const hint = [s.description, s.default !== undefined ? `default: ${JSON.stringify(s.default)}` : null].filter(Boolean).join(' — ');
  let input;
  let kind;
  if (en) {
    kind = 'enum';
    input = el('select', { name });
    if (nullable || s.default === undefined) input.append(el('option', { value: '', text: '—' }));
    for (const v of en) input.append(el('option', { value: JSON.stringify(v), text: String(v) }));
    input.value = s.default !== undefined && s.default !== null ? JSON.stringify(s.default) : '';
  } else if (types.length === 1 && types[0] === 'boolean') {
    kind = 'boolean';
    input = el('input', { type: 'checkbox', name });
    input.checked = s.default === true;
  } else if (types.length === 1 && (types[0] === 'integer' || types[0] === 'number')) {
    kind = types[0];
    input = el('input', { type: 'number', name });
    const min = s.minimum ?? s.exclusiveMinimum;
    const max = s.maximum ?? s.exclusiveMaximum;
    if (min !== undefined) input.min = min;
    if (max !== undefined) input.max = max;
    input.step = s.multipleOf ?? (kind === 'integer' ? 1 : 'any');
    input.value = typeof s.default === 'number' ? String(s.default) : '';
  } else if (types.length === 1 && types[0] === 'string') {
    kind = 'string';
    input = el('input', { type: 'text', name });
    input.value = typeof s.default === 'string' ? s.default : '';
  } else {
    kind = 'json';
    input = el('input', { type: 'text', name, class: 'json' });
    input.value = showDefault(s.default);
    input.placeholder = types.includes('array') ? 'a, b, c  or  JSON' : 'JSON';
  }
  input.dataset.kind = kind;
  input.dataset.types = types.join(',');
  input.dataset.key = key;
  if (s.default !== undefined) input.dataset.default = JSON.stringify(s.default);
  if (required) input.dataset.required = 'true';
  if (s.description) input.title = s.description;
  const label = el('label', { class: 'field' + (kind === 'boolean' ? ' field-bool' : '') }, el('span', { class: 'field-name', text: key + (required ? ' *' : '') }), input);
  if (hint) label.append(el('span', { class: 'hint', text: hint }));
  return label;
}

/** Renders one input per property of `schema` into `box`. */
function renderSchema(box, prefix, schema, skip = new Set()) {
  box.textContent = '';
  const props = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  const keys = Object.keys(props).filter((k) => !skip.has(k));
  if (keys.length === 0) {
    box.append(el('p', { class: 'muted', text: schema ? 'no keys' : 'this plugin exports no schema' }));
    return;
  }
  for (const k of keys) box.append(fieldFor(prefix, k, props[k], required.has(k)));
}

/** The value of one schema input: {value} or null when empty. Throws naming the key. */
function readField(input) {
  const kind = input.dataset.kind;
  const types = (input.dataset.types || '').split(',').filter(Boolean);
  const name = input.name;
  if (kind === 'boolean') return { value: input.checked };
  const raw = input.value.trim();
  if (raw === '') return null;
  if (kind === 'enum') return { value: JSON.parse(raw) };
  if (kind === 'integer' || kind === 'number') {
    const v = Number(raw);
    if (!Number.isFinite(v)) throw new Error(`${name}: "${raw}" is not a number`);
    if (kind === 'integer' && !Number.isInteger(v)) throw new Error(`${name}: "${raw}" is not a whole number`);
    if (input.min !== '' && v < Number(input.min)) throw new Error(`${name}: ${v} is below the minimum ${input.min}`);
    if (input.max !== '' && v > Number(input.max)) throw new Error(`${name}: ${v} is above the maximum ${input.max}`);
    return { value: v };
  }
  if (kind === 'string') return { value: input.value };
  // Arrays, objects and mixed types: JSON, else a comma-separated list, else the text.
  if (/^[[{"]/.test(raw) || raw === 'true' || raw === 'false' || raw === 'null') {
    try {
      return { value: JSON.parse(raw) };
    } catch (e) {
      throw new Error(`${name}: not valid JSON (${messageOf(e)})`);
    }
  }
  if ((types.includes('number') || types.includes('integer')) && raw !== '' && Number.isFinite(Number(raw))) return { value: Number(raw) };
  if (types.includes('array') && (raw.includes(',') || !types.includes('string'))) {
    return {
      value: raw
        .split(',')
        .map((x) => x.trim())
        .filter((x) => x !== '')
        .map((x) => (x !== '' && Number.isFinite(Number(x)) && !types.includes('string') ? Number(x) : x)),
    };
  }
  if (types.includes('object') && !types.includes('string')) throw new Error(`${name}: expects a JSON object like {"key": 1}`);
  return { value: raw };
}

/** The keys of the inputs named `prefix.KEY` directly under `box` whose value differs from the
 *  schema default, plus the required ones. */
function collectFields(box, prefix) {
  const out = {};
  for (const input of $$('[name]', box)) {
    if (!input.name.startsWith(prefix + '.')) continue;
    const key = input.name.slice(prefix.length + 1);
    if (key.includes('.')) continue;
    const got = readField(input);
    if (got === null) {
      if (input.dataset.required === 'true') throw new Error(`${input.name} is required`);
      continue;
    }
    const dflt = input.dataset.default;
    const differs = dflt === undefined ? !(input.dataset.kind === 'boolean' && got.value === false) : JSON.stringify(got.value) !== JSON.stringify(JSON.parse(dflt));
    if (differs || input.dataset.required === 'true') out[key] = got.value;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// New run

const NEW = { loaded: false, plugins: [], hostSchema: {}, models: [], datasets: { files: [], registries: [] } };
const HOST_SECTIONS = ['optimizer', 'scheduler', 'training', 'data', 'top'];
// Keys a picker or a fixed input already sets.
const HOST_SKIP = {
  data: new Set(['plugin', 'path', 'dataset_dir', 'datasets', 'config']),
  top: new Set(['model', 'output_dir', 'device', 'dtype', 'adapter', 'objective', 'memory', 'data', 'optimizer', 'scheduler', 'training', 'finetuning']),
};

async function enterNew() {
  if (!NEW.loaded) await loadNewForm();
}

async function loadNewForm() {
  const box = $('#new-error');
  showError(box, null);
  const [plugins, hostSchema, models, datasets] = await Promise.allSettled([api('/api/plugins'), api('/api/host_schema'), api('/api/models'), api('/api/datasets')]);
  const failures = [plugins, hostSchema, models, datasets].filter((p) => p.status === 'rejected').map((p) => messageOf(p.reason));
  if (failures.length) showError(box, failures.join('\n'));
  if (plugins.status === 'fulfilled') {
    NEW.plugins = plugins.value.plugins || [];
    // Libraries the host could not load: say so when a picker comes out empty.
    const refused = plugins.value.refused || [];
    const missing = ['adapter', 'objective', 'memory', 'dataset'].filter((k) => !NEW.plugins.some((p) => p.kind === k));
    if (missing.length) {
      failures.push(
        `no ${missing.join(', ')} plugins found` +
          (refused.length ? `; refused libraries:\n` + refused.slice(0, 8).map((r) => `${r.file || r.name || '?'}: ${r.reason || r.error || ''}`).join('\n') : ''),
      );
      showError(box, failures.join('\n'));
    }
  }
  if (hostSchema.status === 'fulfilled') NEW.hostSchema = hostSchema.value.sections || {};
  if (models.status === 'fulfilled') NEW.models = models.value.models || [];
  if (datasets.status === 'fulfilled') NEW.datasets = datasets.value || { files: [], registries: [] };
  NEW.loaded = failures.length === 0;

  if (!$('#run-name').value) {
    const d = new Date();
    const p = (n) => String(n).padStart(2, '0');
    $('#run-name').value = `run-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}`;
  }
  fillModelSelect($('#model'), NEW.models);
  fillChoice($('#device'), (NEW.hostSchema.top && NEW.hostSchema.top.properties || {}).device);
  fillChoice($('#dtype'), (NEW.hostSchema.top && NEW.hostSchema.top.properties || {}).dtype);
  fillDataSources();
  fillPluginSelect('adapter', 'adapter', 'lora');
  fillPluginSelect('objective', 'objective', 'sft');
  fillPluginSelect('memory', 'memory', 'single');
  fillPluginSelect('data', 'dataset', null);
  for (const section of HOST_SECTIONS) {
    renderSchema($(`.host-fields[data-section="${section}"]`), section, NEW.hostSchema[section] || null, HOST_SKIP[section]);
  }
  onDataSource();
}

/** Options of a fixed select (device, dtype) from the host schema's enum/examples/default. */
function fillChoice(select, prop) {
  if (!prop) return;
  const keep = select.value;
  const values = [...(prop.enum || []), ...(prop.examples || [])];
  if (typeof prop.default === 'string' && !values.includes(prop.default)) values.unshift(prop.default);
  if (!values.length) return;
  select.textContent = '';
  for (const v of new Set(values)) select.append(el('option', { value: v, text: v }));
  if (prop.description) select.title = prop.description;
  select.value = values.includes(keep) && select.dataset.filled ? keep : prop.default ?? values[0];
  select.dataset.filled = 'true';
}

function fillModelSelect(select, models) {
  const keep = select.value;
  select.textContent = '';
  if (models.length === 0) select.append(el('option', { value: '', text: '(no models under --models)' }));
  for (const m of models) {
    select.append(el('option', { value: m.path, text: `${m.name} · ${m.model_type || '?'}${m.vision ? ' · vision' : ''}`, dataset: { name: m.name, vision: m.vision ? 'true' : 'false' } }));
  }
  if (keep && models.some((m) => m.path === keep)) select.value = keep;
}

function registryValue(dir, name) {
  return `${dir}::${name}`;
}

function fillDataSources() {
  const select = $('#data-source');
  const keep = select.value;
  select.textContent = '';
  const { files = [], registries = [] } = NEW.datasets;
  if (files.length) {
    const g = el('optgroup', { label: 'files' });
    for (const f of files) {
      g.append(el('option', { value: f.path, text: f.name + (f.plugin_guess ? ` (${f.plugin_guess})` : ''), dataset: { kind: 'file', path: f.path, plugin: f.plugin_guess || '' } }));
    }
    select.append(g);
  }
  for (const r of registries) {
    const g = el('optgroup', { label: `registry ${r.dataset_dir}` });
    for (const d of r.datasets || []) {
      g.append(
        el('option', {
          value: registryValue(r.dataset_dir, d.name),
          text: `${d.name} · ${d.formatting || 'alpaca'}${d.ranking ? ' · ranking' : ''}`,
          dataset: { kind: 'registry', dir: r.dataset_dir, name: d.name },
        }),
      );
    }
    select.append(g);
  }
  if (!files.length && !registries.length) select.append(el('option', { value: '', text: '(no data under --data)' }));
  if (keep && $$('option', select).some((o) => o.value === keep)) select.value = keep;
}

function fillPluginSelect(section, kind, preferred) {
  const select = $(`select[data-section="${section}"]`);
  const keep = select.value;
  select.textContent = '';
  const list = NEW.plugins.filter((p) => p.kind === kind);
  for (const p of list) select.append(el('option', { value: p.name, text: p.name + (p.version ? ` ${p.version}` : '') }));
  if (list.length === 0 && section !== 'adapter') select.append(el('option', { value: '', text: `(no ${kind} plugins found)` }));
  if (section === 'adapter') {
    select.append(el('option', { value: '', text: 'none · full fine-tuning' }));
    select.append(el('option', { value: '@freeze', text: 'none · freeze (train the last layers)' }));
  }
  if (keep && $$('option', select).some((o) => o.value === keep)) select.value = keep;
  else if (preferred && list.some((p) => p.name === preferred)) select.value = preferred;
  onPluginChange(section);
}

function onPluginChange(section) {
  const select = $(`select[data-section="${section}"]`);
  const plugin = NEW.plugins.find((p) => p.name === select.value && p.kind === (section === 'data' ? 'dataset' : section));
  const box = $(`.plugin-fields[data-section="${section}"]`);
  const desc = $(`.plugin-desc[data-section="${section}"]`);
  desc.textContent = plugin ? plugin.description || '' : select.value === '' && section === 'adapter' ? 'every weight trains' : select.value === '@freeze' ? 'only the layers training.freeze_* selects train' : '';
  box.dataset.plugin = select.value;
  if (!plugin) {
    box.textContent = '';
    return;
  }
  renderSchema(box, section === 'data' ? 'data.config' : section, plugin.schema);
}

function onDataSource() {
  const opt = $('#data-source').selectedOptions[0];
  const regBox = $('#registry-datasets');
  const pluginSelect = $('select[data-section="data"]');
  NEW.appliedSource = $('#data-source').value;
  regBox.textContent = '';
  if (!opt || !opt.dataset.kind) {
    regBox.hidden = true;
    return;
  }
  if (opt.dataset.kind === 'file') {
    regBox.hidden = true;
    if (pluginSelect.disabled) {
      pluginSelect.disabled = false;
      onPluginChange('data');
    }
    if (opt.dataset.plugin && $$('option', pluginSelect).some((o) => o.value === opt.dataset.plugin)) {
      pluginSelect.value = opt.dataset.plugin;
      onPluginChange('data');
    }
    return;
  }
  // A registry data set: the plugin comes from dataset_info.json; more sets may be mixed in.
  pluginSelect.disabled = true;
  $('.plugin-fields[data-section="data"]').textContent = '';
  $('.plugin-fields[data-section="data"]').dataset.plugin = '';
  $('.plugin-desc[data-section="data"]').textContent = 'set by dataset_info.json (formatting)';
  regBox.hidden = false;
  const reg = (NEW.datasets.registries || []).find((r) => r.dataset_dir === opt.dataset.dir);
  regBox.append(el('span', { class: 'muted', text: 'data sets mixed from this registry: ' }));
  for (const d of (reg && reg.datasets) || []) {
    const cb = el('input', { type: 'checkbox', class: 'registry-dataset', value: d.name, dataset: { name: d.name } });
    cb.checked = d.name === opt.dataset.name;
    regBox.append(el('label', { class: 'inline-choice' }, cb, ' ' + d.name));
  }
}

/** The body of POST /api/draft from the form. Throws naming a bad input. */
function draftBody() {
  // Inputs set by a script (without a change event) still count.
  if ($('#data-source').value !== NEW.appliedSource) onDataSource();
  for (const section of ['adapter', 'objective', 'memory', 'data']) {
    const sel = $(`select[data-section="${section}"]`);
    if (!sel.disabled && $(`.plugin-fields[data-section="${section}"]`).dataset.plugin !== sel.value) onPluginChange(section);
  }
  const name = $('#run-name').value.trim();
  if (!name) throw new Error('run name: give the run a name (it becomes the folder under --runs)');
  if (!/^[A-Za-z0-9_.-]+$/.test(name)) throw new Error(`run name "${name}": use letters, digits, "_", "." and "-" only`);
  const model = $('#model').value;
  if (!model) throw new Error('model: no model chosen (folders with config.json under --models)');
  const form = $('#new-run-form');
  const sections = {};
  const adapter = $('select[data-section="adapter"]').value;
  const fields = (section) => $(`.plugin-fields[data-section="${section}"]`);
  sections.adapter = adapter && adapter !== '@freeze' ? { plugin: adapter, ...collectFields(fields('adapter'), 'adapter') } : null;
  for (const s of ['objective', 'memory']) {
    const p = $(`select[data-section="${s}"]`).value;
    if (p) sections[s] = { plugin: p, ...collectFields(fields(s), s) };
  }
  const opt = $('#data-source').selectedOptions[0];
  if (!opt || !opt.dataset.kind) throw new Error('data: no data source chosen (files or registries under --data)');
  let data;
  if (opt.dataset.kind === 'file') {
    const plugin = $('select[data-section="data"]').value;
    if (!plugin) throw new Error('data plugin: none chosen');
    data = { plugin, path: opt.dataset.path };
    const cfg = collectFields(fields('data'), 'data.config');
    if (Object.keys(cfg).length) data.config = cfg;
  } else {
    const names = $$('input.registry-dataset', $('#registry-datasets'))
      .filter((c) => c.checked)
      .map((c) => c.value);
    if (names.length === 0) throw new Error('data sets: check at least one data set of the registry');
    data = { dataset_dir: opt.dataset.dir, datasets: names };
  }
  Object.assign(data, collectFields($('.host-fields[data-section="data"]'), 'data'));
  sections.data = data;
  for (const s of ['optimizer', 'scheduler', 'training']) sections[s] = collectFields($(`.host-fields[data-section="${s}"]`, form), s);
  return {
    name,
    model,
    device: $('#device').value,
    dtype: $('#dtype').value,
    sections,
    finetuning: adapter === '' ? 'full' : adapter === '@freeze' ? 'freeze' : 'adapter',
  };
}

async function makeDraft() {
  const body = draftBody();
  // Top-level keys (seed, …) are not a section of the draft request: they are scalars, added
  // to the drafted YAML as top-level lines (JSON scalars are YAML).
  const top = collectFields($('.host-fields[data-section="top"]'), 'top');
  const r = await api('/api/draft', { method: 'POST', body });
  let yaml = (r && r.yaml) || '';
  const extra = Object.entries(top).filter(([k]) => !new RegExp(`^${k.replace(/[^A-Za-z0-9_]/g, '')}:`, 'm').test(yaml));
  if (extra.length) yaml = yaml.replace(/\n*$/, '\n') + extra.map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join('\n') + '\n';
  $('#yaml').value = yaml;
  showError($('#draft-error'), null);
  return yaml;
}

/** The YAML to check or start: the textarea's, drafted from the form when empty. */
async function currentYaml() {
  const y = $('#yaml').value;
  if (y.trim()) return y;
  return makeDraft();
}

function renderCheck(r) {
  const box = $('#check-result');
  box.textContent = '';
  box.hidden = false;
  box.dataset.ok = r && r.ok ? 'true' : 'false';
  box.classList.toggle('ok', !!(r && r.ok));
  box.classList.toggle('bad', !(r && r.ok));
  const rep = (r && r.report) || {};
  box.append(el('strong', { text: r && r.ok ? 'data check passed' : 'data check found problems' }));
  if (r && r.error) box.append(el('div', { class: 'error', text: r.error }));
  if (r && r.report) {
    const facts = [
      ['rows', rep.rows],
      ['usable', rep.usable],
      ['errors', rep.errors],
      ['skipped', rep.skipped],
      ['warnings', rep.warnings],
      ['images', rep.images],
      ['image tokens', rep.image_tokens],
      ['videos', rep.videos],
      ['label tokens', rep.label_tokens],
      ['longest', rep.max_tokens],
    ].filter(([k, v]) => v !== undefined && v !== null && !(k === 'videos' && v === 0));
    box.append(el('div', { class: 'facts' }, facts.map(([k, v]) => el('span', { class: 'fact', dataset: { key: k } }, el('b', { text: String(v) }), ' ' + k))));
    if (rep.packing) box.append(el('div', { class: 'muted', text: 'packing: ' + (typeof rep.packing === 'string' ? rep.packing : JSON.stringify(rep.packing)) }));
    for (const d of rep.datasets || []) {
      box.append(el('div', { class: 'muted', text: `data set ${d.name}: ${d.rows} rows, ${d.usable} usable, ${d.errors} with errors, ${d.skipped} skipped, ${d.warnings} warnings` }));
    }
    const notes = rep.notes || [];
    if (notes.length) {
      const ul = el('ul', { class: 'notes' });
      for (const n of notes.slice(0, 200)) ul.append(el('li', { class: 'note-' + n.level, text: `row ${n.row}: ${n.level}: ${n.message}` }));
      if (notes.length > 200) ul.append(el('li', { class: 'muted', text: `… ${notes.length - 200} more` }));
      box.append(ul);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Data preview

async function enterData() {
  const sel = $('#preview-run');
  const keep = sel.value;
  try {
    const runs = await fetchRuns();
    sel.textContent = '';
    sel.append(el('option', { value: '', text: '— the YAML below —' }));
    for (const r of runs) sel.append(el('option', { value: r.name, text: r.name }));
    if (keep && runs.some((r) => r.name === keep)) sel.value = keep;
    showError($('#preview-error'), null);
  } catch (e) {
    showError($('#preview-error'), e);
  }
  if (!$('#preview-yaml').value.trim() && $('#yaml').value.trim()) $('#preview-yaml').value = $('#yaml').value;
}

async function runPreview() {
  const n = Math.max(1, Math.min(100, parseInt($('#preview-n').value, 10) || 3));
  const run = $('#preview-run').value;
  let body;
  if (run) body = { run, n };
  else {
    const yaml = $('#preview-yaml').value;
    if (!yaml.trim()) throw new Error('preview: choose a run or paste a config YAML');
    body = { yaml, n };
  }
  const r = await api('/api/preview', { method: 'POST', body });
  renderPreview(r || {});
}

function renderPreview(r) {
  const out = $('#preview-samples');
  out.textContent = '';
  const samples = r.samples || [];
  const refused = (r.refused || []).length;
  $('#preview-summary').textContent = `${samples.length} of ${r.total ?? '?'} samples` + (refused ? ` · ${refused} refused` : '') + (r.layout && typeof r.layout === 'string' ? ` · layout ${r.layout}` : '');
  const layout = $('#preview-layout');
  layout.textContent = '';
  if (r.layout !== undefined && r.layout !== null && typeof r.layout !== 'string') {
    layout.append(el('summary', { text: 'layout' }), el('pre', { text: typeof r.layout === 'string' ? r.layout : JSON.stringify(r.layout, null, 2) }));
    layout.hidden = false;
  } else layout.hidden = true;
  for (const s of samples) {
    const card = el('div', { class: 'sample card', dataset: { index: s.index } });
    const counts = `${s.tokens} tokens · ${s.labelled_tokens} labelled` + (s.truncated_from ? ` · truncated from ${s.truncated_from}` : '');
    card.append(
      el(
        'div',
        { class: 'sample-head' },
        el('b', { text: `sample ${s.index}` }),
        el('span', { class: 'sample-tokens', dataset: { tokens: s.tokens, labelled: s.labelled_tokens }, text: counts }),
      ),
    );
    const media = el('div', { class: 'sample-media' });
    for (const img of s.images || []) {
      const fig = el('figure', { class: 'sample-figure' });
      if (img.url) {
        fig.append(el('img', { class: 'sample-image', src: mediaUrl(img.url), alt: `image ${img.width}×${img.height}`, title: img.source || '', dataset: { width: img.width, height: img.height, tokens: img.tokens } }));
      } else {
        fig.append(el('div', { class: 'error', text: img.error || 'image not shown' }));
      }
      const resized = Array.isArray(img.resized) && (img.resized[0] !== img.width || img.resized[1] !== img.height) ? ` → ${img.resized[0]}×${img.resized[1]}` : '';
      fig.append(el('figcaption', { text: `${img.width}×${img.height}${resized} · ${img.tokens} tokens` }));
      media.append(fig);
    }
    for (const v of s.videos || []) {
      const frames = v.frames || [];
      const strip = el('div', { class: 'video-strip' });
      for (const f of frames) {
        if (f.url) strip.append(el('img', { class: 'video-frame', src: mediaUrl(f.url), alt: `frame ${f.width}×${f.height}`, dataset: { width: f.width, height: f.height } }));
      }
      const fig = el('figure', { class: 'sample-video', dataset: { tokens: v.tokens, frames: frames.length } }, strip);
      if (v.error) fig.append(el('div', { class: 'error', text: v.error }));
      const w = v.width ?? (frames[0] && frames[0].width);
      const h = v.height ?? (frames[0] && frames[0].height);
      const kept = v.frames_kept !== undefined ? `${v.frames_kept}${v.frames_total ? ' of ' + v.frames_total : ''} frames` : `${frames.length} frames`;
      fig.append(el('figcaption', { text: `video ${w ?? '?'}×${h ?? '?'} · ${v.describe || kept} · ${v.tokens} tokens` }));
      media.append(fig);
    }
    if (media.children.length) card.append(media);
    const text = el('div', { class: 'sample-text' });
    for (const seg of s.segments || []) text.append(el('span', { class: seg.labelled ? 'labelled' : 'prompt', text: seg.text }));
    card.append(text);
    out.append(card);
  }
  for (const bad of r.refused || []) {
    out.append(el('div', { class: 'card refused', dataset: { index: bad.index } }, el('b', { text: `row ${bad.index}: refused` }), el('div', { class: 'error', text: bad.error })));
  }
}

/** An image address from the board: data URLs as they are, board paths with the token. */
function mediaUrl(url) {
  return String(url).startsWith('/') ? withToken(url) : url;
}

// ---------------------------------------------------------------------------------------------
// Chat

const CHAT = { base: null, adapter: null, vision: false, history: { base: [], tuned: [] }, loaded: false };

async function enterChat() {
  const box = $('#chat-error');
  const [models, runs] = await Promise.allSettled([api('/api/models'), fetchRuns()]);
  const fails = [models, runs].filter((p) => p.status === 'rejected').map((p) => messageOf(p.reason));
  showError(box, fails.length ? fails.join('\n') : null);
  if (models.status === 'fulfilled') fillModelSelect($('#chat-model'), models.value.models || []);
  if (runs.status === 'fulfilled') {
    const sel = $('#chat-adapter');
    const keep = sel.value;
    sel.textContent = '';
    sel.append(el('option', { value: '', text: '— none (base only) —' }));
    for (const r of runs.value) {
      const ckpts = r.checkpoints || [];
      // Runs that trained an adapter; their checkpoints hold the adapter of that step.
      if (!r.has_adapter) continue;
      const g = el('optgroup', { label: `${r.name} (${r.state})` });
      g.append(el('option', { value: r.path, text: `${r.name} · final`, dataset: { run: r.name, adapter: adapterName(r.name) } }));
      for (const c of ckpts) {
        g.append(el('option', { value: `${r.path}/${c}`, text: `${r.name} · ${c}`, dataset: { run: r.name, adapter: adapterName(`${r.name}-${c}`) } }));
      }
      sel.append(g);
    }
    if (keep && $$('option', sel).some((o) => o.value === keep)) sel.value = keep;
  }
}

async function chatStart() {
  const status = $('#chat-status');
  const model = $('#chat-model').value;
  if (!model) throw new Error('model: no model chosen');
  status.dataset.ready = 'false';
  status.textContent = 'loading the model… (slow the first time)';
  let started;
  try {
    started = await api('/api/chat/start', { method: 'POST', body: { model } });
  } catch (e) {
    status.textContent = 'not loaded';
    throw e;
  }
  CHAT.base = started.base;
  CHAT.vision = !!started.vision;
  CHAT.adapter = null;
  const opt = $('#chat-adapter').selectedOptions[0];
  if (opt && opt.value) {
    status.textContent = `loaded ${CHAT.base}; loading the adapter…`;
    const name = opt.dataset.adapter || adapterName(opt.dataset.run || opt.value);
    try {
      // Loaded before (a second Load on the same model): unload it, so the files on disk now
      // are the ones served (a run may have saved a newer adapter since).
      if (Array.isArray(started.adapters) && started.adapters.includes(name)) {
        await api('/api/serve/v1/unload_lora_adapter', { method: 'POST', body: { lora_name: name } });
      }
      await api('/api/serve/v1/adapters', { method: 'POST', body: { name, path: opt.value } });
    } catch (e) {
      status.textContent = `loaded ${CHAT.base}, the adapter failed`;
      throw e;
    }
    CHAT.adapter = name;
  }
  CHAT.history = { base: [], tuned: [] };
  $('#chat-base .messages').textContent = '';
  $('#chat-tuned .messages').textContent = '';
  $('#chat-base .col-title').textContent = `base · ${CHAT.base}`;
  $('#chat-tuned .col-title').textContent = CHAT.adapter ? `adapter · ${CHAT.adapter}` : 'adapter · none chosen';
  $('#chat-image').disabled = !CHAT.vision;
  $('#chat-image-hint').textContent = CHAT.vision ? '' : 'this model takes no images';
  status.textContent = `ready: ${CHAT.base}${CHAT.vision ? ' (vision)' : ''}${CHAT.adapter ? ` + adapter ${CHAT.adapter}` : ''}`;
  status.dataset.ready = 'true';
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error(`image ${file.name}: could not be read`));
    r.readAsDataURL(file);
  });
}

async function chatSend() {
  if (!CHAT.base) throw new Error('chat: press "Load" first');
  const text = $('#chat-input').value;
  const file = $('#chat-image').files && $('#chat-image').files[0];
  if (!text.trim() && !file) throw new Error('chat: write a message');
  let content = text;
  let imageUrl = null;
  if (file) {
    imageUrl = await readAsDataUrl(file);
    content = [{ type: 'image_url', image_url: { url: imageUrl } }, { type: 'text', text }];
  }
  const maxTokens = parseInt($('#chat-max-tokens').value, 10);
  const temperature = parseFloat($('#chat-temperature').value);
  const targets = [['base', CHAT.base]];
  if (CHAT.adapter) targets.push(['tuned', CHAT.adapter]);
  $('#chat-input').value = '';
  $('#chat-image').value = '';
  await Promise.all(targets.map(([col, model]) => chatOne(col, model, content, text, imageUrl, Number.isFinite(maxTokens) ? maxTokens : 64, Number.isFinite(temperature) ? temperature : 0)));
}

async function chatOne(col, model, content, text, imageUrl, maxTokens, temperature) {
  const box = $(`#chat-${col} .messages`);
  const user = el('div', { class: 'bubble user' }, imageUrl ? el('img', { class: 'chat-thumb', src: imageUrl, alt: 'your image' }) : null, el('div', { text }));
  const reply = el('div', { class: 'bubble reply', dataset: { done: 'false' }, text: '…' });
  box.append(user, reply);
  box.scrollTop = box.scrollHeight;
  const history = CHAT.history[col];
  history.push({ role: 'user', content });
  try {
    const r = await api('/api/serve/v1/chat/completions', { method: 'POST', body: { model, messages: history, max_tokens: maxTokens, temperature } });
    const msg = r && r.choices && r.choices[0] && r.choices[0].message;
    let answer = msg ? msg.content : '';
    if (Array.isArray(answer)) answer = answer.map((p) => p.text || '').join('');
    answer = answer == null ? '' : String(answer);
    history.push({ role: 'assistant', content: answer });
    reply.textContent = answer;
    // An answer of whitespace alone (a tiny random model's) is said as such, not shown as a
    // tall empty bubble; the text stays the answer.
    if (!answer.trim()) {
      reply.classList.add('blank');
      reply.title = `${answer.length} whitespace characters`;
    }
  } catch (e) {
    history.pop();
    reply.textContent = messageOf(e);
    reply.classList.add('error');
  }
  reply.dataset.done = 'true';
  box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// Wiring

function wire() {
  window.addEventListener('hashchange', route);
  $('#stop-run').addEventListener('click', () => runAction('stop'));
  $('#resume-run').addEventListener('click', () => runAction('resume'));
  $('#smooth-loss').addEventListener('change', () => runView && redrawCharts());

  $('#new-run-form').addEventListener('submit', (ev) => ev.preventDefault());
  for (const section of ['adapter', 'objective', 'memory', 'data']) {
    $(`select[data-section="${section}"]`).addEventListener('change', () => onPluginChange(section));
  }
  $('#data-source').addEventListener('change', onDataSource);
  $('#reload-new').addEventListener('click', () => act($('#reload-new'), $('#new-error'), loadNewForm));
  $('#draft').addEventListener('click', () => act($('#draft'), $('#draft-error'), makeDraft));
  $('#check').addEventListener('click', () =>
    act($('#check'), $('#check-error'), async () => {
      const box = $('#check-result');
      box.dataset.ok = '';
      box.hidden = false;
      box.textContent = 'checking…';
      try {
        renderCheck(await api('/api/check', { method: 'POST', body: { yaml: await currentYaml() } }));
      } catch (e) {
        box.dataset.ok = 'false';
        box.textContent = '';
        box.classList.add('bad');
        throw e;
      }
    }),
  );
  $('#start').addEventListener('click', () =>
    act($('#start'), $('#start-error'), async () => {
      const name = $('#run-name').value.trim();
      if (!name) throw new Error('run name: give the run a name');
      const nproc = parseInt($('#nproc').value, 10);
      if (!(nproc >= 1 && nproc <= 8)) throw new Error(`processes: ${$('#nproc').value} is not between 1 and 8`);
      const yaml = await currentYaml();
      const r = await api('/api/runs', { method: 'POST', body: { name, yaml, nproc } });
      location.hash = '#run/' + encodeURIComponent((r && r.name) || name);
    }),
  );

  $('#preview').addEventListener('click', () => act($('#preview'), $('#preview-error'), runPreview));
  $('#preview-from-form').addEventListener('click', () => {
    $('#preview-yaml').value = $('#yaml').value;
    $('#preview-run').value = '';
  });

  $('#chat-start').addEventListener('click', () => act($('#chat-start'), $('#chat-error'), chatStart));
  $('#chat-send').addEventListener('click', () => act($('#chat-send'), $('#chat-error'), chatSend));
  $('#chat-clear').addEventListener('click', () => {
    CHAT.history = { base: [], tuned: [] };
    $('#chat-base .messages').textContent = '';
    $('#chat-tuned .messages').textContent = '';
  });
  $('#chat-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $('#chat-send').click();
    }
  });

  api('/api/info')
    .then((info) => {
      $('#info').textContent = `v${info.version} · runs ${info.runs_dir}`;
      $('#info').title = `runs: ${info.runs_dir}\nmodels: ${info.models_dir ?? '(none)'}\ndata: ${info.data_dir ?? '(none)'}`;
      $('#runs-dir').textContent = info.runs_dir;
    })
    .catch((e) => showError($('#global-error'), e));
  route();
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', wire);
else wire();
