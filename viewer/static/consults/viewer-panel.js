// The consult panel on the viewer page (?consult=<id>): pin what is on screen to the consult's thread,
// and send review evidence — each image displayed, for how long, at which window, lossy or full quality.
const CATALOG = JSON.parse(document.getElementById('cp-i18n').textContent);
const _ = s => CATALOG[s] || s;
const panel = document.getElementById('consult-panel');
const consultId = panel.dataset.consult;
const CSRF = document.querySelector('meta[name="csrf-token"]')?.content
  || document.querySelector('meta[name="cp-csrf-token"]')?.content || '';
const statusEl = document.getElementById('cp-status');
const FLUSH_MS = 5000;
const MIN_MS = 50;  // a slice scrolled past faster than this was not looked at

function studyUid() {
  const m = location.pathname.match(/\/viewer\/([0-9.]+)/);
  return m ? m[1] : '';
}

async function post(path, body, keepalive = false) {
  const response = await fetch(`/consults/${consultId}/${path}`, {
    method: 'POST', credentials: 'same-origin', keepalive,
    headers: { 'Content-Type': 'application/json', 'Accept': 'application/json', 'X-CSRF-Token': CSRF },
    body: JSON.stringify(body),
  });
  let json = {};
  try { json = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) throw new Error(json.error || `HTTP ${response.status}`);
  return json;
}

function whenViewer(callback, tries = 0) {
  if (window.telepacsViewer) callback(window.telepacsViewer);
  else if (tries < 200) setTimeout(() => whenViewer(callback, tries + 1), 100);
  else statusEl.textContent = _('The viewer did not start: nothing can be pinned.');
}

// -- pin -------------------------------------------------------------------------------------
document.getElementById('cp-pin').addEventListener('click', () => whenViewer(async viewer => {
  const state = viewer.getState();
  const text = document.getElementById('cp-text').value;
  statusEl.textContent = _('Sending…');
  try {
    const result = await post('messages', { text, pin: { ...state, study: studyUid() } });
    document.getElementById('cp-text').value = '';
    statusEl.textContent = _('Pinned to the consult.');
    panel.dataset.lastMessage = result.id;
  } catch (err) {
    statusEl.textContent = _('Not sent') + ': ' + err.message;
  }
}));

document.getElementById('cp-toggle').addEventListener('click', e => {
  const collapsed = panel.classList.toggle('cp-collapsed');
  e.currentTarget.setAttribute('aria-expanded', String(!collapsed));
});

// -- review evidence -------------------------------------------------------------------------
let current = null;   // what is on screen now: {study, series, instance, frame, wc, ww, quality, start}
let queue = [];

function close(at) {
  if (current && at - current.start >= MIN_MS) queue.push({ ...current, end: at });
  current = null;
}

async function flush(keepalive = false) {
  if (!queue.length) return;
  const events = queue.splice(0, 500);
  try {
    await post('review-events', { events }, keepalive);
  } catch (err) {
    if (!keepalive) queue.unshift(...events);  // try again at the next flush
    console.warn('review evidence not recorded yet:', err.message);
  }
}

whenViewer(viewer => {
  if (typeof viewer.onDisplay !== 'function') return;
  viewer.onDisplay(d => {
    const now = Date.now();
    close(now);
    current = { study: d.study || studyUid(), series: d.series, instance: d.instance, frame: d.frame || 1,
                wc: d.wc ?? null, ww: d.ww ?? null, quality: d.quality === 'lossy' ? 'lossy' : 'full', start: now };
  });
});
setInterval(() => { if (current && Date.now() - current.start > FLUSH_MS) { const s = { ...current }; close(Date.now()); current = { ...s, start: Date.now() }; } flush(); }, FLUSH_MS);
addEventListener('pagehide', () => { close(Date.now()); flush(true); });
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'hidden') { const s = current; close(Date.now()); flush(true); if (s) current = { ...s, start: Infinity }; }
  else if (current) current.start = Date.now();
});
