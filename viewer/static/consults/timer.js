// Live countdown to each consult's due time (emergencies: 1 hour). Red once it is past.
const CATALOG = JSON.parse(document.getElementById('i18n').textContent);
const _ = s => CATALOG[s] || s;

function label(ms) {
  const late = ms < 0;
  let s = Math.floor(Math.abs(ms) / 1000);
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  const text = `${h}:${String(m).padStart(2, '0')}:${String(s).padStart(2, '0')}`;
  return late ? _('Overdue by') + ' ' + text : text + ' ' + _('left');
}

function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll('.c-timer[data-due]')) {
    const due = Date.parse(el.dataset.due);
    if (Number.isNaN(due)) continue;
    el.textContent = label(due - now);
    el.classList.toggle('c-late', due < now);
    el.title = new Date(due).toLocaleString();
  }
}
// Times are written in UTC by the server; show them in the reader's own time zone.
for (const el of document.querySelectorAll('time.c-time[datetime]')) {
  const at = new Date(el.getAttribute('datetime'));
  if (Number.isNaN(at.getTime())) continue;
  const pad = n => String(n).padStart(2, '0');
  el.textContent = `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())} ${pad(at.getHours())}:${pad(at.getMinutes())}`;
  el.title = at.toString();
}

tick();
setInterval(tick, 1000);
