// New consult form: more questions, and uploads of DICOM files / a folder / a zip through STOW-RS.
//
// Resumable: before sending, the browser asks which files the server already holds byte for byte
// (SOP Instance UID + size + SHA-256, POST /consults/uploads/check) and sends only the rest; a dropped
// link leaves a "Resume upload" button (and retries by itself a few times). The form is submitted
// only once every uploaded file is confirmed stored; the studies they belong to are then attached.
const CATALOG = JSON.parse(document.getElementById('i18n').textContent);
const _ = s => CATALOG[s] || s;
const CSRF = document.querySelector('meta[name="csrf-token"]')?.content || '';

const $ = id => document.getElementById(id);
const progress = $('upload-progress');
const status = $('upload-status');
const errors = $('upload-errors');
const retry = $('upload-retry');
const form = $('new-consult');

const BATCH_BYTES = 4 * 1024 * 1024;  // per STOW-RS request: small enough to lose little on a drop
const BATCH_FILES = 16;
const AUTO_RETRIES = 3;

let pending = [];        // {name, blob, uid, size, sha256}
let uploading = false;
let incomplete = false;

// -- questions ---------------------------------------------------------------------------
$('add-question').addEventListener('click', () => {
  const li = document.createElement('li');
  const ta = document.createElement('textarea');
  ta.name = 'question'; ta.rows = 2;
  li.append(ta); $('questions').append(li); ta.focus();
});

// -- reading files -----------------------------------------------------------------------
function u16(v, o) { return v.getUint16(o, true); }
function u32(v, o) { return v.getUint32(o, true); }

// The SOP Instance UID from the Part 10 file meta (group 0002 is always explicit VR little endian).
function metaInstanceUid(buf) {
  if (buf.byteLength < 132) return null;
  const v = new DataView(buf);
  if (String.fromCharCode(v.getUint8(128), v.getUint8(129), v.getUint8(130), v.getUint8(131)) !== 'DICM') return null;
  let o = 132;
  while (o + 8 <= buf.byteLength) {
    const group = u16(v, o), element = u16(v, o + 2);
    if (group !== 0x0002) break;
    const vr = String.fromCharCode(v.getUint8(o + 4), v.getUint8(o + 5));
    let len, head;
    if (['OB', 'OW', 'OF', 'SQ', 'UT', 'UN'].includes(vr)) { len = u32(v, o + 8); head = 12; }
    else { len = u16(v, o + 6); head = 8; }
    if (element === 0x0003) {
      return new TextDecoder().decode(new Uint8Array(buf, o + head, len)).replace(/[\0 ]+$/, '');
    }
    o += head + len;
  }
  return null;
}

// Entries of a zip file (stored or deflated), inflated with the browser's DecompressionStream.
async function unzip(file) {
  const buf = await file.arrayBuffer();
  const v = new DataView(buf);
  let eocd = -1;
  for (let i = buf.byteLength - 22; i >= Math.max(0, buf.byteLength - 65557); i--) {
    if (u32(v, i) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) throw new Error(_('not a zip file'));
  const count = u16(v, eocd + 10);
  let p = u32(v, eocd + 16);
  const out = [];
  for (let n = 0; n < count; n++) {
    if (u32(v, p) !== 0x02014b50) throw new Error(_('damaged zip file'));
    const method = u16(v, p + 10), csize = u32(v, p + 20), nameLen = u16(v, p + 28);
    const extraLen = u16(v, p + 30), commentLen = u16(v, p + 32), local = u32(v, p + 42);
    const name = new TextDecoder().decode(new Uint8Array(buf, p + 46, nameLen));
    p += 46 + nameLen + extraLen + commentLen;
    if (name.endsWith('/')) continue;
    const start = local + 30 + u16(v, local + 26) + u16(v, local + 28);
    const raw = new Blob([new Uint8Array(buf, start, csize)]);
    let blob;
    if (method === 0) blob = raw;
    else if (method === 8) blob = await new Response(raw.stream().pipeThrough(new DecompressionStream('deflate-raw'))).blob();
    else { addError(file.name + '/' + name, _('compression method not supported')); continue; }
    out.push({ name: `${file.name}/${name}`, blob });
  }
  return out;
}

async function sha256(buf) {
  if (globalThis.crypto?.subtle) {
    const d = await crypto.subtle.digest('SHA-256', buf);
    return [...new Uint8Array(d)].map(b => b.toString(16).padStart(2, '0')).join('');
  }
  return sha256Fallback(new Uint8Array(buf));  // plain-HTTP deployments have no crypto.subtle
}

// A small SHA-256 (FIPS 180-4) for browsers without crypto.subtle (not a secure context).
function sha256Fallback(data) {
  const K = new Uint32Array([0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152,
    0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138,
    0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70,
    0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5,
    0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa,
    0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
  const H = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const len = data.length, padded = new Uint8Array(((len + 9 + 63) >> 6) << 6);
  padded.set(data); padded[len] = 0x80;
  const dv = new DataView(padded.buffer);
  dv.setUint32(padded.length - 8, Math.floor(len / 0x20000000)); dv.setUint32(padded.length - 4, (len << 3) >>> 0);
  const W = new Uint32Array(64), r = (x, n) => (x >>> n) | (x << (32 - n));
  for (let o = 0; o < padded.length; o += 64) {
    for (let i = 0; i < 16; i++) W[i] = dv.getUint32(o + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = r(W[i - 15], 7) ^ r(W[i - 15], 18) ^ (W[i - 15] >>> 3);
      const s1 = r(W[i - 2], 17) ^ r(W[i - 2], 19) ^ (W[i - 2] >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, h] = H;
    for (let i = 0; i < 64; i++) {
      const t1 = (h + (r(e, 6) ^ r(e, 11) ^ r(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + W[i]) >>> 0;
      const t2 = ((r(a, 2) ^ r(a, 13) ^ r(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      h = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    H[0] += a; H[1] += b; H[2] += c; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
  }
  return [...H].map(x => x.toString(16).padStart(8, '0')).join('');
}

function addError(name, message) {
  const li = document.createElement('li');
  li.textContent = `${name}: ${message}`;
  li.dataset.file = name;
  errors.append(li);
}

function setStatus(text) { status.textContent = text; }

async function prepare(entries) {
  const out = [];
  let n = 0;
  for (const { name, blob } of entries) {
    n++;
    setStatus(_('Reading files') + ' ' + n + '/' + entries.length);
    const buf = await blob.arrayBuffer();
    const uid = metaInstanceUid(buf);
    if (!uid) { addError(name, _('not a DICOM file (no DICM header)')); continue; }
    out.push({ name, blob, uid, size: blob.size, sha256: await sha256(buf) });
  }
  return out;
}

// -- talking to the server ---------------------------------------------------------------
async function checkStored(files) {
  const result = new Map();
  for (let i = 0; i < files.length; i += 500) {
    const chunk = files.slice(i, i + 500);
    const response = await fetch('/consults/uploads/check', {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': CSRF },
      body: JSON.stringify({ files: chunk.map(f => ({ uid: f.uid, size: f.size, sha256: f.sha256 })) }),
    });
    if (!response.ok) throw new Error(_('check failed') + ' (HTTP ' + response.status + ')');
    for (const r of (await response.json()).files) result.set(r.uid, r);
  }
  return result;
}

function stow(batch, onProgress) {
  const boundary = 'telepacs-' + Math.random().toString(16).slice(2);
  const parts = [];
  for (const f of batch) {
    parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, f.blob, '\r\n');
  }
  parts.push(`--${boundary}--\r\n`);
  const body = new Blob(parts);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/dicomweb/studies');
    xhr.setRequestHeader('Content-Type', `multipart/related; type="application/dicom"; boundary=${boundary}`);
    xhr.setRequestHeader('Accept', 'application/dicom+json');
    xhr.setRequestHeader('X-CSRF-Token', CSRF);
    xhr.upload.onprogress = e => onProgress(e.loaded);
    xhr.onload = () => {
      let json = {};
      try { json = JSON.parse(xhr.responseText || '{}'); } catch { /* an HTML error page */ }
      resolve({ status: xhr.status, json });
    };
    xhr.onerror = () => reject(new Error(_('connection lost')));
    xhr.ontimeout = () => reject(new Error(_('connection lost')));
    xhr.send(body);
  });
}

function failedUids(json) {
  const failed = new Map();
  for (const item of json['00081198']?.Value || []) {
    const uid = item['00081155']?.Value?.[0];
    const reason = item['00081197']?.Value?.[0];
    if (uid) failed.set(uid, reason);
  }
  return failed;
}

function studiesFromChecks(checks) {
  return [...new Set([...checks.values()].filter(c => c.same && c.study).map(c => c.study))];
}

function addStudyCheckbox(uid, count) {
  const list = $('study-list');
  $('no-studies')?.remove();
  let box = list.querySelector(`input[value="${uid}"]`);
  if (!box) {
    const label = document.createElement('label');
    label.className = 'c-check c-study c-uploaded';
    box = document.createElement('input');
    box.type = 'checkbox'; box.name = 'study'; box.value = uid;
    label.append(box, ' ' + _('Uploaded study') + ' ' + uid + ' · ' + count + ' ' + _('images'));
    list.prepend(label);
  }
  box.checked = true;
}

// -- the upload run (re-entrant: a resume runs it again over the same files) --------------
async function run(files) {
  uploading = true; incomplete = true; retry.hidden = true;
  progress.hidden = false; progress.value = 0;
  try {
    let checks = await checkStored(files);
    const todo = files.filter(f => !checks.get(f.uid)?.same);
    const skipped = files.length - todo.length;
    const total = todo.reduce((s, f) => s + f.size, 0) || 1;
    let done = 0;
    setStatus(skipped + ' ' + _('already stored') + ', ' + todo.length + ' ' + _('to send'));
    for (let i = 0; i < todo.length;) {
      const batch = [];
      let bytes = 0;
      while (i < todo.length && batch.length < BATCH_FILES && (batch.length === 0 || bytes + todo[i].size <= BATCH_BYTES)) {
        bytes += todo[i].size; batch.push(todo[i]); i++;
      }
      const { status: code, json } = await stow(batch, loaded => { progress.value = Math.min(1, (done + loaded) / total); });
      if (code >= 500 || code === 401 || code === 403) throw new Error(`HTTP ${code}`);
      const failed = failedUids(json);
      for (const f of batch) {
        if (failed.has(f.uid)) addError(f.name, _('refused by the archive') + ' (0x' + Number(failed.get(f.uid)).toString(16).toUpperCase() + ')');
      }
      done += bytes; progress.value = Math.min(1, done / total);
      setStatus(_('Sent') + ' ' + Math.round(100 * done / total) + '%');
    }
    checks = await checkStored(files);
    const missing = files.filter(f => !checks.get(f.uid)?.same);
    const refused = new Set([...errors.querySelectorAll('li')].map(li => li.dataset.file));
    const stillMissing = missing.filter(f => !refused.has(f.name));
    for (const study of studiesFromChecks(checks)) {
      addStudyCheckbox(study, files.filter(f => checks.get(f.uid)?.study === study).length);
    }
    incomplete = stillMissing.length > 0;
    setStatus(incomplete ? stillMissing.length + ' ' + _('files not confirmed yet')
                         : (files.length - missing.length) + ' ' + _('files stored and confirmed'));
    progress.value = 1;
    document.body.dataset.uploadDone = incomplete ? '' : '1';
  } finally {
    uploading = false;
  }
}

async function runWithRetries(files, attempt = 0) {
  try {
    await run(files);
  } catch (err) {
    incomplete = true;
    setStatus(_('Upload interrupted') + ': ' + err.message);
    retry.hidden = false;
    if (attempt < AUTO_RETRIES) setTimeout(() => runWithRetries(files, attempt + 1), 2000 * 2 ** attempt);
  }
}

retry.addEventListener('click', () => { if (!uploading) runWithRetries(pending, AUTO_RETRIES); });

async function choose(entries) {
  errors.replaceChildren();
  pending = await prepare(entries);
  if (pending.length) await runWithRetries(pending);
  else setStatus(_('No DICOM file among the files chosen'));
}

$('upload-files').addEventListener('change', e => choose([...e.target.files].map(f => ({ name: f.name, blob: f }))));
$('upload-folder').addEventListener('change', e => choose([...e.target.files].map(f => ({ name: f.webkitRelativePath || f.name, blob: f }))));
$('upload-zip').addEventListener('change', async e => {
  try { await choose(await unzip(e.target.files[0])); } catch (err) { addError(e.target.files[0].name, err.message); }
});

form.addEventListener('submit', e => {
  if (uploading || (pending.length && incomplete)) {
    e.preventDefault();
    setStatus(_('Wait until every uploaded file is stored and confirmed before sending the request.'));
  }
});
