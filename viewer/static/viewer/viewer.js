// telepacs reading page: stack view over the server's renderer. Plain ES module, no build step, no CDN.
// Contract (briefs): window.telepacsViewer {getState, setState, scrollTo, onDisplay}; body data markers
// firstImageMs, seriesLoadedMs, slice; query parameters series, instance, frame, wc, ww, zoom, panx, pany,
// invert, rotate, flip, ann, lowbw.

const CATALOG = JSON.parse(document.getElementById('i18n').textContent);
const _ = (s) => CATALOG[s] || s;
// Strings used inside template literals (pybabel's extractor does not look inside those).
const T = {
  slowLink: _('Slow link detected'),
  showing: _('Loading: showing slice'),
  area: _('Area'),
  id: _('ID'),
  level: _('L'),
  width: _('W'),
  sd: _('SD'),
  lowbwMode: _('low-bandwidth mode'),
  seriesFailed: _('The series could not be loaded'),
  play: _('Play'),
  frames: _('frames'),
  images: _('images'),
  frame: _('frame'),
  auto: _('auto'),
  detector: _('(detector plane)'),
  stop: _('Stop'),
  thickness: _('Thickness'),
  mean: _('Mean'),
  wl: _('W/L'),
  position: _('Position'),
  inverted: _('Inverted'),
};
const DATA = JSON.parse(document.getElementById('viewer-data').textContent);
const STUDY = DATA.study;
const PARAMS = new URLSearchParams(location.search);

// Same as viewer/reader.py (the page preloads the first preview with this exact URL).
const PREVIEW_QUALITY = 50;
const PREVIEW_VIEWPORT = '256,256';
const DRAG_QUALITY = 80;            // while dragging window/level: a fast lossy JPEG of the current slice
const MAX_IN_FLIGHT = 4;            // slice requests at a time per viewport
const BITMAP_BUDGET = 48e6;         // decoded pixels kept per viewport (RGBA: ~4 bytes each)
const SLOW_LINK_BPS = 4e6;          // below this, low-bandwidth mode turns itself on
const LARGE_IMAGE = 1024;           // images wider/taller than this are fetched at display size first

// The page may carry the first preview inline (a data: URI on its <img>, data-url its rendered URL):
// the viewer's own request for that preview then stays in the browser.
function inlinePreview(url) {
  const img = document.querySelector('#first-preview img[data-url]');
  if (!img || !img.src.startsWith('data:')) return url;
  return new URL(img.dataset.url, location.href).href === new URL(url, location.href).href ? img.src : url;
}

// CT windows (centre/width, HU). Source: Radiopaedia "Windowing (CT)"; subdural 75/215, stroke 40/40,
// liver 60/160, bone 400/1800 as listed there among the usual values.
const PRESETS = [
  { name: _('Brain'), c: 40, w: 80 },
  { name: _('Subdural'), c: 75, w: 215 },
  { name: _('Stroke'), c: 40, w: 40 },
  { name: _('Lung'), c: -600, w: 1500 },
  { name: _('Mediastinum'), c: 50, w: 350 },
  { name: _('Abdomen'), c: 50, w: 400 },
  { name: _('Liver'), c: 60, w: 160 },
  { name: _('Bone'), c: 400, w: 1800 },
];

const TOOLS = [
  { id: 'scroll', label: _('Scroll'), key: 's' },
  { id: 'wl', label: _('Window/level'), key: 'w' },
  { id: 'pan', label: _('Pan'), key: 'p' },
  { id: 'zoom', label: _('Zoom'), key: 'z' },
  { id: 'length', label: _('Length'), key: 'l' },
  { id: 'angle', label: _('Angle'), key: 'a' },
  { id: 'ellipse', label: _('Ellipse ROI'), key: 'e' },
  { id: 'arrow', label: _('Arrow'), key: 'q' },
  { id: 'text', label: _('Text'), key: 't' },
];

const fmt = (n, d = 1) => (Number.isFinite(n) ? n.toFixed(d) : '–');
const numText = (n) => String(n);
const personName = (pn) => (pn || '').split('=')[0].replace(/\^+/g, ' ').trim();
const dicomDate = (d) => (d && d.length === 8 ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : d || '');
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---------------------------------------------------------------------------------------------- series

const seriesCache = new Map(); // uid -> Promise<Series>

class Series {
  constructor(json) {
    this.uid = json.uid;
    this.json = json;
    this.number = json.number;
    this.modality = json.modality;
    this.description = json.description;
    this.instances = json.instances.map((inst) => ({ ...json.common, ...inst }));
    this.stack = [];
    this.instances.forEach((inst, i) => {
      if (inst.rows == null) return; // no pixels (SR, KO, PR...): nothing to render
      for (let f = 1; f <= (inst.frames || 1); f++) this.stack.push({ inst, instIndex: i, frame: f });
    });
    this.normal = normalOf(this.instances[0] && this.instances[0].iop);
  }
  url(item, query) {
    return this.json.rendered.replace('{sop}', item.inst.sop).replace('{frame}', item.frame) + '?' + query;
  }
  roiUrl(item) { return this.json.roi.replace('{sop}', item.inst.sop).replace('{frame}', item.frame); }
  // Position of a slice along `normal` (mm), for synchronised scrolling; null when unknown.
  positionAlong(index, normal) {
    const item = this.stack[index];
    if (!item) return null;
    if (normal && item.inst.ipp) return dot(item.inst.ipp, normal);
    return item.inst.position;
  }
}

function normalOf(iop) {
  if (!iop || iop.length !== 6) return null;
  const [r0, r1, r2, c0, c1, c2] = iop;
  return [r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0];
}
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];

function loadSeries(uid) {
  if (!seriesCache.has(uid)) {
    seriesCache.set(uid, fetch(`/api/viewer/series/${uid}`).then((r) => {
      if (!r.ok) throw new Error(`series ${uid}: HTTP ${r.status}`);
      return r.json();
    }).then((json) => new Series(json)));
  }
  return seriesCache.get(uid);
}
seriesCache.set(DATA.series.uid, Promise.resolve(new Series(DATA.series)));

// --------------------------------------------------------------------------------------- link speed

// Link speed from the Resource Timing of full-quality slices: body bytes over the time bodies were
// arriving (the union of responseStart..responseEnd), so server time and latency do not count.
const link = {
  bytes: 0, intervals: [], samples: 0, auto: null,
  record(url) {
    const entries = performance.getEntriesByName(new URL(url, location.href).href);
    const e = entries[entries.length - 1];
    if (!e || !e.transferSize || !e.encodedBodySize) return; // from the HTTP cache: says nothing
    this.bytes += e.encodedBodySize;
    this.intervals.push([e.responseStart, e.responseEnd]);
    this.samples += 1;
  },
  bps() {
    const sorted = [...this.intervals].sort((a, b) => a[0] - b[0]);
    let busy = 0; let end = -Infinity;
    for (const [a, b] of sorted) {
      if (b <= end) continue;
      busy += b - Math.max(a, end);
      end = b;
    }
    return (this.bytes * 8) / (Math.max(busy, 1) / 1000);
  },
};
if (performance.setResourceTimingBufferSize) performance.setResourceTimingBufferSize(5000);

// ------------------------------------------------------------------------------------------- viewport

let firstImageMarked = false;
const displayListeners = [];

class Viewport {
  constructor(viewer, container, slot) {
    this.viewer = viewer;
    this.slot = slot;
    this.root = el('div', { class: 'rv-vp', tabindex: '0', 'data-slot': String(slot) });
    this.image = el('canvas', { class: 'rv-image' });
    this.layer = el('canvas', { class: 'rv-layer' });
    this.ov = {
      tl: el('div', { class: 'rv-ov rv-tl' }), tr: el('div', { class: 'rv-ov rv-tr' }),
      bl: el('div', { class: 'rv-ov rv-bl' }), br: el('div', { class: 'rv-ov rv-br' }),
    };
    this.bar = el('span'); this.lossyBar = el('span', { class: 'lossy' });
    this.progress = el('div', { class: 'rv-progress' }, this.lossyBar, this.bar);
    this.slider = el('input', { type: 'range', class: 'rv-slider', min: '0', max: '0', value: '0',
      'aria-label': _('Slice') });
    this.root.append(this.image, this.layer, this.ov.tl, this.ov.tr, this.ov.bl, this.ov.br, this.progress,
      this.slider);
    container.append(this.root);
    this.series = null;
    this.index = 0;
    this.dir = 1;
    this.window = null;          // {c, w} chosen by the reader; null: each slice's own (file) window
    this.zoom = null;            // CSS px per image pixel; null: fit
    this.pan = [0, 0];
    this.invert = false; this.rotate = 0; this.flipH = false; this.flipV = false;
    this.annotations = [];
    this.draft = null;
    this.slices = [];
    this.inFlight = new Map();
    this.bitmapPixels = 0;
    this.shown = null;           // what is on the canvas: {index, wkey, quality}
    this.lastReported = '';
    this.roiCache = new Map();
    this.generation = 0;
    this.slider.addEventListener('input', () => this.scrollTo(Number(this.slider.value)));
    new ResizeObserver(() => this.resize()).observe(this.root);
    this.root.addEventListener('pointerdown', () => viewer.activate(this), true);
    installPointer(this);
  }

  // -- series and slices ----------------------------------------------------------------------------
  setSeries(series, start = null) {
    this.generation += 1;
    if (!series.stack.length) {
      this.series = null;
      this.viewer.status(_('This series has no images.'));
      return;
    }
    this.series = series;
    for (const s of this.slices) if (s && s.bitmap) s.bitmap.close();
    this.slices = series.stack.map(() => null);
    this.bitmapPixels = 0;
    this.inFlight.clear();
    this.index = start == null ? Math.floor(series.stack.length / 2) : Math.max(0, Math.min(start, series.stack.length - 1));
    this.slider.max = String(series.stack.length - 1);
    this.slider.value = String(this.index);
    this.slider.hidden = series.stack.length < 2;
    this.shown = null;
    this.loadedMarked = false;
    const frameTime = series.instances[0] && series.instances[0].frame_time;
    if (frameTime > 0) $('cine-fps').value = String(Math.max(1, Math.min(60, Math.round(1000 / frameTime))));
    this.viewer.renderSeriesList();
    this.pump();
    this.requestDraw();
  }

  item(index = this.index) { return this.series && this.series.stack[index]; }

  // Window of slice `index` as requested: the reader's, else the file's first, else none (server default).
  windowFor(index) {
    if (this.window) return this.window;
    const w = this.item(index) && this.item(index).inst.windows;
    return w && w.length ? { c: w[0].center, w: w[0].width } : null;
  }
  wkey() { return this.window ? `${this.window.c},${this.window.w}` : 'file'; }

  large(item) { return Math.max(item.inst.rows || 0, item.inst.cols || 0) > LARGE_IMAGE; }

  urlFor(index, kind) {
    const item = this.item(index);
    const win = this.windowFor(index);
    const parts = [];
    if (win) parts.push(`window=${numText(win.c)},${numText(win.w)},linear`);
    if (kind === 'preview') parts.push(`quality=${PREVIEW_QUALITY}`, `viewport=${PREVIEW_VIEWPORT}`);
    else if (kind === 'drag') parts.push(`quality=${DRAG_QUALITY}`);
    else parts.push('quality=100');
    if (kind !== 'preview' && this.large(item) && !this.wantFullResolution()) {
      parts.push(`viewport=${this.fetchViewport()}`);
    }
    return this.series.url(item, parts.join('&'));
  }
  fetchViewport() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(256, Math.ceil(this.root.clientWidth * dpr / 256) * 256);
    const h = Math.max(256, Math.ceil(this.root.clientHeight * dpr / 256) * 256);
    return `${w},${h}`;
  }
  // Zoomed in beyond what the display-sized rendering holds: fetch the image at its own resolution.
  wantFullResolution() {
    const item = this.item();
    if (!item) return false;
    const dpr = window.devicePixelRatio || 1;
    const [vw, vh] = this.fetchViewport().split(',').map(Number);
    const fetched = Math.min(1, vw / (item.inst.cols || 1), vh / (item.inst.rows || 1));
    return this.scale() * dpr > fetched * 1.01;
  }

  quality(slice) { return slice ? slice.quality : null; }

  // Which slice to fetch next and how: the current one first, then outward, ahead of the scroll direction.
  nextTask() {
    const n = this.series.stack.length;
    const wkey = this.wkey();
    const lowbw = this.viewer.lowBandwidth();
    const order = [];
    order.push(this.index);
    for (let k = 1; order.length < n; k++) {
      const ahead = this.index + k * this.dir;
      if (ahead >= 0 && ahead < n) order.push(ahead);
      if (k % 2 === 0 || ahead < 0 || ahead >= n) {
        const behind = this.index - Math.ceil(k / 2) * this.dir;
        if (behind >= 0 && behind < n && !order.includes(behind)) order.push(behind);
      }
      if (k > 2 * n + 2) break;
    }
    for (let i = 0; i < n; i++) if (!order.includes(i)) order.push(i);
    const need = (i, kind) => {
      const s = this.slices[i];
      const key = `${i}|${kind}|${wkey}`;
      if (this.inFlight.has(key)) return false;
      if (s && s.wkey === wkey && (s.quality === 'full' || kind === 'preview')) return false;
      if (kind === 'full' && this.inFlight.has(`${i}|preview|${wkey}`) && lowbw) return false;
      return true;
    };
    // The current slice: a preview first when nothing of this window is on screen yet (tiny, fast).
    const cur = this.index;
    const curSlice = this.slices[cur];
    if ((!curSlice || curSlice.wkey !== wkey) && !this.inFlight.has(`${cur}|full|${wkey}`) && need(cur, 'preview')
        && (lowbw || !firstImageMarked)) return { index: cur, kind: 'preview' };
    if (need(cur, 'full') && !(lowbw && this.inFlight.has(`${cur}|preview|${wkey}`))) return { index: cur, kind: 'full' };
    if (lowbw) for (const i of order) if (need(i, 'preview') && !this.inFlight.has(`${i}|full|${wkey}`)) return { index: i, kind: 'preview' };
    for (const i of order) if (need(i, 'full')) return { index: i, kind: 'full' };
    return null;
  }

  pump() {
    if (!this.series || this.dragging) return;  // while dragging W/L only the current slice is asked for
    while (this.inFlight.size < MAX_IN_FLIGHT) {
      const task = this.nextTask();
      if (!task) break;
      this.fetchSlice(task.index, task.kind);
    }
    this.updateProgress();
  }

  async fetchSlice(index, kind) {
    const wkey = this.wkey();
    const win = this.windowFor(index);
    const key = `${index}|${kind}|${wkey}`;
    const generation = this.generation;
    const url = this.urlFor(index, kind);
    const controller = new AbortController();
    this.inFlight.set(key, controller);
    try {
      // Previews go without an Accept header (the server answers JPEG), like the page's preload.
      const init = kind === 'preview' ? {} : { headers: { Accept: kind === 'full' ? 'image/png' : 'image/jpeg' } };
      const response = await fetch(kind === 'preview' ? inlinePreview(url) : url, { ...init, signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status} for ${url}`);
      const blob = await response.blob();
      if (kind === 'full' && link.auto == null) link.record(url);
      if (generation !== this.generation) return;
      const quality = kind === 'full' ? 'full' : 'lossy';
      const old = this.slices[index];
      const current = wkey === this.wkey();
      const fullRes = kind === 'full' && !(this.large(this.item(index)) && url.includes('viewport='));
      // Never trade a full-resolution image for a display-sized one of the same window.
      const better = !old || old.wkey !== wkey || (quality === 'full' && old.quality !== 'full')
        || (quality === old.quality && kind !== 'drag' && !(old.fullRes && !fullRes));
      // A drag result is shown even if the window moved on meanwhile: it is the newest picture there is.
      const dragShown = kind === 'drag' && (!old || old.wkey !== this.wkey());
      if ((better && current) || dragShown) {
        if (old && old.bitmap) { old.bitmap.close(); this.bitmapPixels -= old.pixels || 0; }
        this.slices[index] = { blob, wkey, quality, kind, window: win, bitmap: null, decoding: null, fullRes };
        if (Math.abs(index - this.index) < 24 || this.bitmapPixels < BITMAP_BUDGET * 0.8) await this.decode(index);
        if (index === this.index) this.requestDraw();
      } else if (!old) {
        this.slices[index] = { blob, wkey, quality, kind, window: win, bitmap: null, decoding: null };
      }
    } catch (err) {
      if (err.name !== 'AbortError') {
        console.warn('telepacs viewer:', err.message);
        this.viewer.status(_('A slice could not be loaded; retrying.'));
        await new Promise((r) => setTimeout(r, 1000));
      }
    } finally {
      this.inFlight.delete(key);
      if (generation === this.generation) {
        this.viewer.checkLink();
        this.pump();
        this.checkLoaded();
      }
    }
  }

  async decode(index) {
    const s = this.slices[index];
    if (!s || s.bitmap) return s && s.bitmap;
    if (!s.decoding) {
      s.decoding = createImageBitmap(s.blob).then((bitmap) => {
        if (this.slices[index] !== s) { bitmap.close(); return null; }
        s.bitmap = bitmap; s.pixels = bitmap.width * bitmap.height; this.bitmapPixels += s.pixels;
        this.evict();
        return bitmap;
      }).catch((err) => { console.warn('telepacs viewer: cannot decode slice', index, err.message); return null; });
    }
    return s.decoding;
  }

  // Keep decoded bitmaps near the current slice; the compressed blobs stay for all.
  evict() {
    while (this.bitmapPixels > BITMAP_BUDGET) {
      let far = -1; let farDist = -1;
      this.slices.forEach((s, i) => {
        const d = Math.abs(i - this.index);
        if (s && s.bitmap && d > farDist) { far = i; farDist = d; }
      });
      if (far < 0 || farDist < 2) break;
      const s = this.slices[far];
      s.bitmap.close(); this.bitmapPixels -= s.pixels; s.bitmap = null; s.decoding = null;
    }
  }

  checkLoaded() {
    if (!this.series || this.loadedMarked) return;
    const wkey = this.wkey();
    if (this.slices.every((s) => s && s.wkey === wkey && s.quality === 'full')) {
      this.loadedMarked = true;
      if (this.slot === 0 && !document.body.dataset.seriesLoadedMs) {
        document.body.dataset.seriesLoadedMs = String(performance.now());
      }
      this.viewer.seriesLoaded(this);
    }
    this.updateProgress();
  }

  updateProgress() {
    if (!this.series) return;
    const wkey = this.wkey();
    const n = this.slices.length;
    let full = 0; let lossy = 0;
    for (const s of this.slices) {
      if (s && s.wkey === wkey) { if (s.quality === 'full') full++; else lossy++; }
    }
    this.bar.style.width = `${(100 * full) / n}%`;
    this.lossyBar.style.width = `${(100 * (full + lossy)) / n}%`;
    this.progress.classList.toggle('done', full === n);
    this.progress.title = `${full}/${n}`;
  }

  // -- navigation --------------------------------------------------------------------------------
  scrollTo(index, { fromSync = false } = {}) {
    if (!this.series) return;
    const n = this.series.stack.length;
    const next = Math.max(0, Math.min(n - 1, Math.round(index)));
    if (next === this.index) return;
    this.dir = next > this.index ? 1 : -1;
    this.index = next;
    this.slider.value = String(next);
    this.draft = null;
    // Decode ahead in the scroll direction so that scrolling never waits for a decode.
    for (let k = 0; k <= 6; k++) { const i = next + k * this.dir; if (this.slices[i] && !this.slices[i].bitmap) this.decode(i).then(() => { if (i === this.index) this.requestDraw(); }); }
    if (this.large(this.item()) && this.wantFullResolution()) this.refetchForZoom();
    this.requestDraw();
    this.pump();
    if (!fromSync) this.viewer.syncFrom(this);
    this.viewer.stateChanged();
  }
  scrollBy(delta) { this.scrollTo(this.index + delta); }

  setWindow(win, { dragging = false } = {}) {
    this.window = win ? { c: Math.round(win.c * 100) / 100, w: Math.max(1, Math.round(win.w * 100) / 100) } : null;
    this.loadedMarked = false;
    this.dragging = dragging;
    // Requests for a window no longer wanted only delay the ones that are: cancel them.
    const wkey = this.wkey();
    for (const [key, controller] of this.inFlight) {
      if (!key.endsWith(`|${wkey}`) && !key.includes('|drag|')) controller.abort();
    }
    if (dragging) this.fetchDrag();
    else { this.dragPending = false; this.pump(); }
    this.requestDraw();
    this.viewer.stateChanged();
  }

  // While dragging: only the current slice, one request at a time, the latest window wins.
  fetchDrag() {
    if (this.dragBusy) { this.dragPending = true; return; }
    this.dragBusy = true;
    const key = `${this.index}|drag|${this.wkey()}`;
    if (this.inFlight.has(key)) { this.dragBusy = false; return; }
    this.fetchSlice(this.index, 'drag').finally(() => {
      this.dragBusy = false;
      if (this.dragPending) { this.dragPending = false; this.fetchDrag(); }
    });
  }

  // -- geometry ----------------------------------------------------------------------------------
  resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(this.root.clientWidth * dpr));
    const h = Math.max(1, Math.round(this.root.clientHeight * dpr));
    for (const c of [this.image, this.layer]) { if (c.width !== w) c.width = w; if (c.height !== h) c.height = h; }
    this.requestDraw();
  }
  dims() {
    const inst = this.item() ? this.item().inst : { rows: 1, cols: 1 };
    return { cols: inst.cols || 1, rows: inst.rows || 1 };
  }
  aspect() {
    const sp = this.item() && this.item().inst.spacing;
    return sp ? sp[0] / sp[1] : 1; // row spacing / column spacing: a pixel's height over its width
  }
  fitScale() {
    const { cols, rows } = this.dims();
    const h = rows * this.aspect();
    const quarter = this.rotate % 180 !== 0;
    const [iw, ih] = quarter ? [h, cols] : [cols, h];
    return Math.min(this.root.clientWidth / iw, this.root.clientHeight / ih) || 1;
  }
  scale() { return this.zoom == null ? this.fitScale() : this.zoom; }
  // Image pixel coordinates (column, row) -> canvas device pixels.
  matrix() {
    const dpr = window.devicePixelRatio || 1;
    const { cols, rows } = this.dims();
    const s = this.scale();
    const m = new DOMMatrix();
    m.translateSelf((this.root.clientWidth / 2 + this.pan[0]) * dpr, (this.root.clientHeight / 2 + this.pan[1]) * dpr);
    m.rotateSelf(this.rotate);
    m.scaleSelf(this.flipH ? -1 : 1, this.flipV ? -1 : 1);
    m.scaleSelf(s * dpr, s * dpr * this.aspect());
    m.translateSelf(-cols / 2, -rows / 2);
    return m;
  }
  toImage(clientX, clientY) {
    const rect = this.root.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const p = this.matrix().inverse().transformPoint(new DOMPoint((clientX - rect.left) * dpr, (clientY - rect.top) * dpr));
    return [p.x, p.y];
  }

  // -- drawing -----------------------------------------------------------------------------------
  requestDraw() {
    if (this.drawQueued) return;
    this.drawQueued = true;
    requestAnimationFrame(() => { this.drawQueued = false; this.draw(); });
  }

  // The slice to show for the current index: its own image if decoded, else the nearest decoded one.
  pick() {
    const s = this.slices[this.index];
    if (s && s.bitmap) return { index: this.index, slice: s };
    if (s && !s.bitmap) this.decode(this.index).then(() => this.requestDraw());
    for (let k = 1; k < this.slices.length; k++) {
      for (const i of [this.index - k * this.dir, this.index + k * this.dir]) {
        const t = this.slices[i];
        if (t && t.bitmap) return { index: i, slice: t };
      }
    }
    return null;
  }

  draw() {
    if (!this.series) return;
    const picked = this.pick();
    const ctx = this.image.getContext('2d');
    if (picked) {
      // Keep the previous picture rather than a blank canvas when the wanted slice is not decoded yet.
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = '#000';
      ctx.fillRect(0, 0, this.image.width, this.image.height);
      ctx.setTransform(this.matrix());
      // Bilinear: 'high' cost ~80 ms a frame where the canvas is rastered on the CPU (30 slices/s needs < 33).
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = 'low';
      ctx.filter = this.invert ? 'invert(1)' : 'none';
      const { cols, rows } = this.dims();
      ctx.drawImage(picked.slice.bitmap, 0, 0, cols, rows);
      ctx.filter = 'none';
      this.shown = { index: picked.index, wkey: picked.slice.wkey, quality: picked.slice.quality,
        window: picked.slice.window, kind: picked.slice.kind };
      if (!firstImageMarked) {
        firstImageMarked = true;
        if (!document.body.dataset.firstImageMs) document.body.dataset.firstImageMs = String(performance.now());
        const preview = $('first-preview');
        if (preview) preview.remove();
      }
      if (this === this.viewer.active) {
        document.body.dataset.slice = picked.index === this.index ? String(this.index + 1) : '';
      }
      this.report();
    }
    this.drawLayer();
    this.drawOverlay();
    if (this === this.viewer.active) this.listMeasurements();
  }

  // The measurements of the slice on screen as text too (readable by screen readers, copyable).
  listMeasurements() {
    const list = $('measurements');
    const rows = this.annotations.filter((a) => this.onThisSlice(a) && a.type !== 'text' && a.type !== 'arrow')
      .map((a) => `${{ length: _('Length'), angle: _('Angle'), ellipse: _('Ellipse ROI') }[a.type]}: ${this.measure(a).replace('\n', '; ')}`);
    const text = rows.join('\n');
    if (list.dataset.text === text) return;
    list.dataset.text = text;
    list.replaceChildren(...rows.map((r) => el('li', { 'data-measurement': '' }, r)));
  }

  report() {
    const s = this.shown;
    const item = this.item(s.index);
    const win = s.window;
    const key = `${this.series.uid}|${s.index}|${s.wkey}|${s.quality}|${win ? win.c + '/' + win.w : ''}`;
    if (key === this.lastReported) return;
    this.lastReported = key;
    const event = {
      study: STUDY.uid, series: this.series.uid, instance: item.inst.sop, frame: item.frame, index: s.index,
      wc: win ? win.c : null, ww: win ? win.w : null, quality: s.quality, at: new Date().toISOString(),
    };
    for (const callback of displayListeners) {
      try { callback(event); } catch (err) { console.warn('telepacs viewer: onDisplay callback failed', err); }
    }
  }

  drawOverlay() {
    const item = this.item();
    if (!item) return;
    const inst = item.inst;
    const n = this.series.stack.length;
    const s = this.shown;
    this.ov.tl.textContent = [personName(STUDY.patient.name), `${T.id}: ${STUDY.patient.id}`,
      [STUDY.patient.sex, dicomDate(STUDY.patient.birth_date)].filter(Boolean).join(' · ')].join('\n');
    this.ov.tr.textContent = [STUDY.description, dicomDate(STUDY.date),
      `${_('Series')} ${this.series.number ?? ''} · ${this.series.modality}`, this.series.description].filter(Boolean).join('\n');
    const lines = [`${_('Slice')} ${this.index + 1} / ${n}` + (inst.frames > 1 ? ` (${T.frame} ${item.frame})` : '')];
    const pos = this.series.positionAlong(this.index, null);
    if (pos != null) lines.push(`${T.position} ${fmt(pos)} mm`);
    if (inst.thickness) lines.push(`${T.thickness} ${fmt(inst.thickness)} mm`);
    this.ov.bl.textContent = lines.join('\n');
    if (s && s.index !== this.index) {
      this.ov.bl.append(el('div', { class: 'rv-marker' }, `${T.showing} ${s.index + 1}`));
    }
    const br = this.ov.br;
    br.textContent = '';
    const win = s && s.window;
    br.append(win ? `${T.width} ${fmt(win.w, 0)}  ${T.level} ${fmt(win.c, 0)}\n` : `${T.wl}: ${T.auto}\n`);
    if (s && s.wkey !== this.wkey()) br.append(el('div', { class: 'rv-marker' }, _('Updating window…')));
    br.append(`${_('Zoom')}: ${Math.round(this.scale() * (window.devicePixelRatio || 1) * 100)}%` +
      (this.invert ? ` · ${T.inverted}` : '') + (this.rotate ? ` · ${this.rotate}°` : '') + '\n');
    if (s) {
      const full = s.quality === 'full';
      br.append(el('span', { class: `rv-quality ${full ? 'full' : 'lossy'}`, 'data-quality': s.quality },
        full ? _('FULL QUALITY') : _('LOSSY PREVIEW')));
    }
  }

  // -- annotations -------------------------------------------------------------------------------
  spacing() {
    const inst = this.item() && this.item().inst;
    if (!inst || !inst.spacing) return null;
    return { row: inst.spacing[0], col: inst.spacing[1], detector: inst.spacing_source === 'ImagerPixelSpacing' };
  }
  onThisSlice(a) {
    const item = this.item();
    return !a.sop || (a.sop === item.inst.sop && (a.frame || 1) === item.frame);
  }
  measure(a) {
    const sp = this.spacing();
    const note = sp && sp.detector ? ` ${T.detector}` : '';
    const p = a.points;
    if (a.type === 'length') {
      const dx = p[1][0] - p[0][0]; const dy = p[1][1] - p[0][1];
      if (sp) return `${fmt(Math.hypot(dx * sp.col, dy * sp.row))} mm${note}`;
      return `${fmt(Math.hypot(dx, dy))} px`;
    }
    if (a.type === 'angle') {
      const sx = sp ? sp.col : 1; const sy = sp ? sp.row : 1;
      const v1 = [(p[0][0] - p[1][0]) * sx, (p[0][1] - p[1][1]) * sy];
      const v2 = [(p[2][0] - p[1][0]) * sx, (p[2][1] - p[1][1]) * sy];
      const cos = (v1[0] * v2[0] + v1[1] * v2[1]) / (Math.hypot(...v1) * Math.hypot(...v2));
      return `${fmt((Math.acos(Math.max(-1, Math.min(1, cos))) * 180) / Math.PI)}°`;
    }
    if (a.type === 'ellipse') {
      const rx = Math.abs(p[1][0] - p[0][0]) / 2; const ry = Math.abs(p[1][1] - p[0][1]) / 2;
      const area = sp ? `${fmt(Math.PI * rx * ry * sp.col * sp.row)} mm²${note}` : `${fmt(Math.PI * rx * ry)} px²`;
      const stats = this.roiStats(a);
      if (!stats) return `${T.area} ${area}\n${T.mean} …`;
      if (stats.error) return `${T.area} ${area}\n${stats.error}`;
      const unit = stats.unit ? ` ${stats.unit}` : '';
      return `${T.mean} ${fmt(stats.mean)}${unit} ${T.sd} ${fmt(stats.sd)}${unit}\n${T.area} ${area}`;
    }
    return '';
  }
  roiStats(a) {
    const item = this.item();
    const p = a.points;
    const box = [p[0][0], p[0][1], p[1][0], p[1][1]].map((v) => Math.round(v * 100) / 100);
    const url = `${this.series.roiUrl(item)}?x0=${box[0]}&y0=${box[1]}&x1=${box[2]}&y1=${box[3]}`;
    if (!this.roiCache.has(url)) {
      this.roiCache.set(url, null);
      fetch(url).then(async (r) => {
        const body = await r.json();
        this.roiCache.set(url, r.ok ? body : { error: body.error || `HTTP ${r.status}` });
        this.requestDraw();
      }).catch((err) => { this.roiCache.set(url, { error: err.message }); this.requestDraw(); });
    }
    return this.roiCache.get(url);
  }

  drawLayer() {
    const ctx = this.layer.getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.layer.width, this.layer.height);
    if (!this.series) return;
    const m = this.matrix();
    const dpr = window.devicePixelRatio || 1;
    const toScreen = (pt) => { const q = m.transformPoint(new DOMPoint(pt[0], pt[1])); return [q.x, q.y]; };
    const all = this.annotations.filter((a) => this.onThisSlice(a));
    if (this.draft) all.push(this.draft);
    ctx.lineWidth = 1.5 * dpr;
    ctx.font = `${12 * dpr}px system-ui, sans-serif`;
    for (const a of all) {
      const pts = a.points.map(toScreen);
      ctx.strokeStyle = a === this.draft ? '#ffd43b' : '#69db7c';
      ctx.fillStyle = ctx.strokeStyle;
      ctx.beginPath();
      if (a.type === 'ellipse' && pts.length === 2) {
        // Drawn in image space so that it follows rotation, flips and anisotropic pixels.
        ctx.save();
        ctx.setTransform(m);
        const p = a.points;
        ctx.ellipse((p[0][0] + p[1][0]) / 2, (p[0][1] + p[1][1]) / 2, Math.abs(p[1][0] - p[0][0]) / 2,
          Math.abs(p[1][1] - p[0][1]) / 2, 0, 0, 2 * Math.PI);
        ctx.restore();
        ctx.stroke();
      } else if (a.type === 'text') {
        ctx.fillText(a.text || '', pts[0][0], pts[0][1]);
      } else {
        pts.forEach((pt, i) => (i ? ctx.lineTo(pt[0], pt[1]) : ctx.moveTo(pt[0], pt[1])));
        ctx.stroke();
        if (a.type === 'arrow' && pts.length === 2) arrowHead(ctx, pts[1], pts[0], 10 * dpr);
      }
      for (const pt of pts) if (a.type !== 'text') ctx.fillRect(pt[0] - 2 * dpr, pt[1] - 2 * dpr, 4 * dpr, 4 * dpr);
      const label = a.points.length >= (a.type === 'angle' ? 3 : 2) ? this.measure(a) : '';
      if (label) {
        const anchor = pts[pts.length - 1];
        label.split('\n').forEach((line, i) => {
          ctx.lineWidth = 3 * dpr; ctx.strokeStyle = '#000';
          ctx.strokeText(line, anchor[0] + 8 * dpr, anchor[1] + (i * 14 + 4) * dpr);
          ctx.fillText(line, anchor[0] + 8 * dpr, anchor[1] + (i * 14 + 4) * dpr);
          ctx.lineWidth = 1.5 * dpr;
        });
      }
    }
  }

  // -- state --------------------------------------------------------------------------------------
  getState() {
    const item = this.item();
    const win = this.window || (this.shown && this.shown.window) || this.windowFor(this.index);
    const flip = [this.flipH ? 'h' : '', this.flipV ? 'v' : ''].join('');
    return {
      series: this.series ? this.series.uid : null, instance: item ? item.inst.sop : null, frame: item ? item.frame : 1,
      index: this.index, wc: win ? win.c : null, ww: win ? win.w : null,
      zoom: this.scale(), panx: this.pan[0], pany: this.pan[1], invert: this.invert, rotate: this.rotate,
      flip: flip || null, annotations: this.annotations.map((a) => ({ ...a, points: a.points.map((p) => [...p]) })),
      quality: this.shown ? this.shown.quality : null,
    };
  }
  applyView(state) {
    if (state.zoom != null && Number(state.zoom) > 0) this.zoom = Number(state.zoom);
    if (state.panx != null) this.pan[0] = Number(state.panx) || 0;
    if (state.pany != null) this.pan[1] = Number(state.pany) || 0;
    if (state.invert != null) this.invert = state.invert === true || state.invert === '1' || state.invert === 1;
    if (state.rotate != null) {
      const r = (((Number(state.rotate) || 0) % 360) + 360) % 360;
      this.rotate = r - (r % 90);
    }
    if (state.flip !== undefined) { const f = String(state.flip || ''); this.flipH = f.includes('h'); this.flipV = f.includes('v'); }
    if (Array.isArray(state.annotations)) this.annotations = state.annotations.filter(validAnnotation);
    if (state.wc != null && state.ww != null && Number(state.ww) >= 1) this.setWindow({ c: Number(state.wc), w: Number(state.ww) });
    this.requestDraw();
  }
}

function validAnnotation(a) {
  const counts = { length: 2, angle: 3, ellipse: 2, arrow: 2, text: 1 };
  return a && counts[a.type] && Array.isArray(a.points) && a.points.length === counts[a.type]
    && a.points.every((p) => Array.isArray(p) && p.length === 2 && p.every(Number.isFinite));
}

function arrowHead(ctx, tip, from, size) {
  const angle = Math.atan2(tip[1] - from[1], tip[0] - from[0]);
  ctx.beginPath();
  ctx.moveTo(tip[0], tip[1]);
  ctx.lineTo(tip[0] - size * Math.cos(angle - 0.4), tip[1] - size * Math.sin(angle - 0.4));
  ctx.lineTo(tip[0] - size * Math.cos(angle + 0.4), tip[1] - size * Math.sin(angle + 0.4));
  ctx.closePath();
  ctx.fill();
}

// ------------------------------------------------------------------------------ pointer, wheel, touch

function installPointer(vp) {
  const target = vp.layer;
  const pointers = new Map();
  let drag = null;
  let pinch = null;
  target.addEventListener('contextmenu', (e) => e.preventDefault());
  target.addEventListener('wheel', (e) => {
    e.preventDefault();
    const dy = wheelPixels(e, vp.root.clientHeight);
    if (e.ctrlKey || e.metaKey) zoomAt(vp, Math.exp(-dy / 300), e.clientX, e.clientY);
    else vp.scrollBy(Math.sign(dy) * Math.max(1, Math.round(Math.abs(dy) / 100)));
  }, { passive: false });
  target.addEventListener('pointerdown', (e) => {
    target.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, [e.clientX, e.clientY]);
    if (pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      pinch = { dist: Math.hypot(a[0] - b[0], a[1] - b[1]), mid: [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2] };
      if (drag && drag.tool !== 'scroll') vp.draft = null;
      drag = null;
      return;
    }
    const tool = e.button === 2 ? 'wl' : e.button === 1 ? 'pan' : vp.viewer.tool;
    drag = { tool, x: e.clientX, y: e.clientY, start: [e.clientX, e.clientY], win: vp.window || vp.windowFor(vp.index)
      || { c: vp.series && vp.series.modality === 'CT' ? 40 : 128, w: vp.series && vp.series.modality === 'CT' ? 400 : 256 },
    zoom: vp.scale(), pan: [...vp.pan], acc: 0 };
    const pt = vp.toImage(e.clientX, e.clientY);
    if (tool === 'angle' && vp.draft && vp.draft.type === 'angle' && vp.draft.points.length === 3) {
      drag.angleThird = true;
    } else if (['length', 'ellipse', 'arrow', 'angle'].includes(tool)) {
      const item = vp.item();
      vp.draft = { type: tool, points: [pt, pt.slice()], sop: item.inst.sop, frame: item.frame };
    } else if (tool === 'text') {
      drag = null;
      const text = window.prompt(_('Text of the note'));
      if (text) {
        const item = vp.item();
        vp.annotations.push({ type: 'text', points: [pt], text, sop: item.inst.sop, frame: item.frame });
        vp.viewer.stateChanged();
      }
      vp.requestDraw();
    }
  });
  target.addEventListener('pointermove', (e) => {
    if (!pointers.has(e.pointerId)) {
      if (vp.draft && vp.draft.type === 'angle' && vp.draft.points.length === 3) {
        vp.draft.points[2] = vp.toImage(e.clientX, e.clientY); vp.requestDraw();
      }
      return;
    }
    pointers.set(e.pointerId, [e.clientX, e.clientY]);
    if (pinch && pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      const dist = Math.hypot(a[0] - b[0], a[1] - b[1]);
      const mid = [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2];
      vp.pan[0] += mid[0] - pinch.mid[0]; vp.pan[1] += mid[1] - pinch.mid[1];
      zoomAt(vp, dist / pinch.dist, mid[0], mid[1]);
      pinch = { dist, mid };
      return;
    }
    if (!drag) return;
    const pt = vp.toImage(e.clientX, e.clientY);
    switch (drag.tool) {
      case 'scroll': {
        drag.acc += e.clientY - drag.y;
        const step = Math.max(4, vp.root.clientHeight / Math.max(20, vp.series.stack.length * 1.5));
        while (Math.abs(drag.acc) >= step) { vp.scrollBy(Math.sign(drag.acc)); drag.acc -= Math.sign(drag.acc) * step; }
        drag.x = e.clientX; drag.y = e.clientY;
        return;
      }
      case 'wl': {
        const gain = Math.max(1, drag.win.w / 256);
        vp.setWindow({ c: drag.win.c + (e.clientY - drag.start[1]) * gain, w: Math.max(1, drag.win.w + (e.clientX - drag.start[0]) * gain) }, { dragging: true });
        return;
      }
      case 'pan':
        vp.pan = [drag.pan[0] + e.clientX - drag.start[0], drag.pan[1] + e.clientY - drag.start[1]];
        vp.requestDraw(); vp.viewer.stateChanged();
        return;
      case 'zoom':
        vp.zoom = Math.max(0.02, drag.zoom * Math.exp(-(e.clientY - drag.start[1]) / 150));
        vp.requestDraw(); vp.viewer.stateChanged();
        return;
      default:
        if (vp.draft) {
          if (drag.angleThird) vp.draft.points[2] = pt;
          else vp.draft.points[1] = pt;
          vp.requestDraw();
        }
    }
  });
  const end = (e) => {
    pointers.delete(e.pointerId);
    if (pointers.size < 2) pinch = null;
    if (!drag) return;
    const tool = drag.tool;
    if (tool === 'wl') vp.setWindow(vp.window);
    if (vp.draft && ['length', 'ellipse', 'arrow', 'angle'].includes(tool)) {
      const p = vp.draft.points;
      const moved = Math.hypot(p[1][0] - p[0][0], p[1][1] - p[0][1]) * vp.scale() > 3;
      if (tool === 'angle' && !drag.angleThird) {
        if (moved) vp.draft.points.push(p[1].slice()); else vp.draft = null;
      } else if (moved || drag.angleThird) {
        vp.annotations.push(vp.draft);
        vp.draft = null;
        vp.viewer.stateChanged();
      } else vp.draft = null;
      vp.requestDraw();
    }
    drag = null;
  };
  target.addEventListener('pointerup', end);
  target.addEventListener('pointercancel', end);
}

// A wheel event's vertical distance in CSS pixels. Chromium reports pixels (100 a notch); Firefox reports a
// mouse wheel in lines (deltaMode 1, 3 a notch) to pages that read deltaMode, and pages (2) on some systems.
const WHEEL_LINE_PX = 100 / 3;
function wheelPixels(e, pageHeight) {
  if (e.deltaMode === WheelEvent.DOM_DELTA_LINE) return e.deltaY * WHEEL_LINE_PX;
  if (e.deltaMode === WheelEvent.DOM_DELTA_PAGE) return e.deltaY * pageHeight;
  return e.deltaY;
}

function zoomAt(vp, factor, clientX, clientY) {
  const rect = vp.root.getBoundingClientRect();
  const old = vp.scale();
  const next = Math.max(0.02, Math.min(50, old * factor));
  // Keep the point under the cursor where it is.
  const cx = clientX - rect.left - rect.width / 2; const cy = clientY - rect.top - rect.height / 2;
  vp.pan = [cx - (cx - vp.pan[0]) * (next / old), cy - (cy - vp.pan[1]) * (next / old)];
  vp.zoom = next;
  if (vp.large(vp.item()) && vp.wantFullResolution()) vp.refetchForZoom();
  vp.requestDraw();
  vp.viewer.stateChanged();
}

Viewport.prototype.refetchForZoom = function refetchForZoom() {
  const s = this.slices[this.index];
  if (s && s.quality === 'full' && !s.fullRes && !this.inFlight.has(`${this.index}|full|${this.wkey()}`)) {
    this.fetchSlice(this.index, 'full');
  }
};

// ------------------------------------------------------------------------------------------- viewer

class Viewer {
  constructor() {
    this.tool = 'scroll';
    this.container = $('viewports');
    this.viewports = [new Viewport(this, this.container, 0)];
    this.active = this.viewports[0];
    this.sync = true;
    this.lowbwChoice = PARAMS.get('lowbw') === '1' ? true : null; // null: decided from the link speed
    this.cine = null;
    this.background = false;
    this.buildToolbar();
    this.installKeys();
  }

  lowBandwidth() { return this.lowbwChoice != null ? this.lowbwChoice : Boolean(link.auto); }

  checkLink() {
    if (this.lowbwChoice != null || link.auto != null || link.samples < 3 || link.bytes < 64e3) return;
    const bps = link.bps();
    link.auto = bps < SLOW_LINK_BPS;
    document.body.dataset.linkMbps = (bps / 1e6).toFixed(2);
    if (link.auto) {
      this.status(`${T.slowLink} (${fmt(bps / 1e6)} Mbit/s): ${T.lowbwMode}`);
      $('lowbw').checked = true;
      for (const vp of this.viewports) vp.pump();
    }
  }

  status(text) { $('status').textContent = text; }

  activate(vp) {
    if (this.active === vp) return;
    this.active = vp;
    for (const v of this.viewports) v.root.classList.toggle('active', v === vp);
    this.renderSeriesList();
    this.stateChanged();
  }

  renderSeriesList() {
    const list = $('series-list');
    if (!list.children.length) {
      for (const s of STUDY.series) {
        const img = s.thumbnail ? el('img', { src: s.thumbnail, alt: '', loading: 'lazy', width: '128', height: '128' })
          : el('div', { class: 'meta' }, _('No images'));
        const count = s.frames > s.instances ? `${s.instances} ${T.images}, ${s.frames} ${T.frames}` : `${s.instances} ${T.images}`;
        const li = el('li', { 'data-series': s.uid, title: s.description || s.uid }, img,
          el('div', { class: 'meta' }, `${s.number ?? ''} ${s.modality} · ${count}`),
          el('div', { class: 'meta' }, s.description || ''));
        li.addEventListener('click', () => this.openSeries(s.uid, this.active));
        list.append(li);
      }
    }
    for (const li of list.children) {
      li.classList.toggle('current', this.viewports[0].series && li.dataset.series === this.viewports[0].series.uid);
      li.classList.toggle('second', this.viewports.length > 1 && this.viewports[1].series
        && li.dataset.series === this.viewports[1].series.uid);
    }
  }

  async openSeries(uid, vp = this.active, start = null) {
    if (vp.series && vp.series.uid === uid) return;
    this.status(_('Loading series…'));
    try {
      const series = await loadSeries(uid);
      vp.window = vp.window && series.modality === (vp.series && vp.series.modality) ? vp.window : null;
      vp.annotations = [];
      vp.zoom = null; vp.pan = [0, 0];
      vp.setSeries(series, start);
      this.status('');
      this.stateChanged();
    } catch (err) {
      this.status(`${T.seriesFailed}: ${err.message}`);
    }
  }

  seriesLoaded(vp) {
    if (vp.slot === 0 && !this.background) {
      this.background = true;
      this.status(_('Series loaded'));
      this.loadOthersInBackground();
    }
  }

  // Other series of the study, after the displayed one: their listings, then their slices at the file
  // window (HTTP cache: later fetches of the same URLs cost nothing). Two requests at a time.
  async loadOthersInBackground() {
    for (const entry of STUDY.series) {
      if (this.viewports.some((v) => v.series && v.series.uid === entry.uid)) continue;
      let series;
      try { series = await loadSeries(entry.uid); } catch (err) { continue; }
      if (this.lowBandwidth()) continue; // on a slow link only the metadata: slices would compete with reading
      const urls = series.stack.map((item, i) => {
        const w = item.inst.windows && item.inst.windows[0];
        const parts = w ? [`window=${numText(w.center)},${numText(w.width)},linear`] : [];
        parts.push('quality=100');
        if (Math.max(item.inst.rows, item.inst.cols) > LARGE_IMAGE) return null;
        return series.url(item, parts.join('&'));
      }).filter(Boolean);
      for (let i = 0; i < urls.length; i += 2) {
        if (this.viewports.some((v) => v.inFlight.size > 0)) await new Promise((r) => setTimeout(r, 200));
        await Promise.all(urls.slice(i, i + 2).map((u) => fetch(u, { headers: { Accept: 'image/png' } })
          .then((r) => r.blob()).catch(() => null)));
      }
    }
  }

  setCompare(on) {
    $('compare').checked = on;
    if (on && this.viewports.length === 1) {
      const vp = new Viewport(this, this.container, 1);
      this.viewports.push(vp);
      this.container.classList.add('two');
      const current = this.viewports[0].series.uid;
      const other = STUDY.series.find((s) => s.uid !== current) || STUDY.series[0];
      this.openSeries(other.uid, vp);
      this.activate(vp);
    } else if (!on && this.viewports.length > 1) {
      const vp = this.viewports.pop();
      vp.generation += 1;
      vp.root.remove();
      this.container.classList.remove('two');
      this.activate(this.viewports[0]);
    }
    for (const v of this.viewports) v.resize();
    this.renderSeriesList();
  }

  // Synchronised scrolling by slice position, for parallel slices (normals within ~8°).
  syncFrom(source) {
    if (!this.sync || this.viewports.length < 2) return;
    for (const vp of this.viewports) {
      if (vp === source || !vp.series || !source.series) continue;
      const n1 = source.series.normal; const n2 = vp.series.normal;
      if (n1 && n2 && Math.abs(dot(n1, n2)) < 0.99) continue;
      const normal = n1 && n2 ? n1 : null;
      const target = source.series.positionAlong(source.index, normal);
      if (target == null) continue;
      let best = null; let bestDist = Infinity;
      for (let i = 0; i < vp.series.stack.length; i++) {
        const p = vp.series.positionAlong(i, normal);
        if (p != null && Math.abs(p - target) < bestDist) { best = i; bestDist = Math.abs(p - target); }
      }
      if (best != null) vp.scrollTo(best, { fromSync: true });
    }
  }

  // -- cine ---------------------------------------------------------------------------------------
  toggleCine(on = !this.cine) {
    if (this.cine) { cancelAnimationFrame(this.cine.raf); this.cine = null; }
    if (on) {
      const fps = () => Math.max(1, Math.min(60, Number($('cine-fps').value) || 10));
      let last = performance.now();
      const step = (now) => {
        if (!this.cine) return;
        if (now - last >= 1000 / fps()) {
          last = now;
          const vp = this.active;
          const n = vp.series.stack.length;
          vp.scrollTo((vp.index + 1) % n);
          if (vp.index === 0) vp.dir = 1;
        }
        this.cine.raf = requestAnimationFrame(step);
      };
      this.cine = { raf: requestAnimationFrame(step) };
    }
    $('cine-play').textContent = this.cine ? `⏸ ${T.stop}` : `▶ ${T.play}`;
    $('cine-play').classList.toggle('active', Boolean(this.cine));
  }

  // -- toolbar and keys ---------------------------------------------------------------------------
  buildToolbar() {
    const tools = $('tools');
    for (const t of TOOLS) {
      tools.append(el('button', { type: 'button', 'data-tool': t.id, title: `${t.label} (${t.key})`,
        onclick: () => this.setTool(t.id) }, t.label));
    }
    this.setTool('scroll');
    const presets = $('presets');
    PRESETS.forEach((p, i) => presets.append(el('button', { type: 'button', 'data-preset': String(i + 1),
      title: `${p.name}: ${p.w}/${p.c} (${i + 1})`, onclick: () => this.preset(i + 1) }, p.name)));
    presets.append(el('button', { type: 'button', 'data-preset': '9', title: `${_('File window')} (9)`,
      onclick: () => this.preset(9) }, _('File window')));
    const view = $('view-buttons');
    const actions = [
      ['invert', _('Invert'), 'i'], ['rotate', _('Rotate 90°'), 'r'], ['fliph', _('Flip H'), 'h'],
      ['flipv', _('Flip V'), 'v'], ['fit', _('Fit'), 'f'], ['one', _('1:1'), 'o'], ['reset', _('Reset'), 'x'],
      ['clear', _('Clear annotations'), 'Delete'],
    ];
    for (const [id, label, key] of actions) {
      view.append(el('button', { type: 'button', 'data-action': id, title: `${label} (${key})`, onclick: () => this.action(id) }, label));
    }
    $('cine-play').addEventListener('click', () => this.toggleCine());
    $('cine-play').textContent = `▶ ${T.play}`;
    $('lowbw').checked = this.lowbwChoice === true;
    $('lowbw').addEventListener('change', (e) => {
      this.lowbwChoice = e.target.checked;
      for (const vp of this.viewports) vp.pump();
      this.stateChanged();
    });
    $('compare').addEventListener('change', (e) => this.setCompare(e.target.checked));
    $('sync').addEventListener('change', (e) => { this.sync = e.target.checked; });
    $('help-button').addEventListener('click', () => this.toggleHelp());
    const keys = [
      ['↑ ↓ ← →', _('Previous / next slice')], ['PageUp PageDown', _('Ten slices back / forward')],
      ['Home End', _('First / last slice')], ['1 – 8', _('CT window presets')], ['9', _('The file’s own window')],
      ['Space', _('Play / stop cine')], ['i', _('Invert')], ['r', _('Rotate 90°')], ['h / v', _('Flip horizontally / vertically')],
      ['+ −', _('Zoom in / out')], ['f', _('Fit to window')], ['o', _('Actual size (1:1)')], ['x', _('Reset the view')],
      ...TOOLS.map((t) => [t.key, t.label]), ['Delete', _('Remove the last annotation of this slice')],
      ['b', _('Low-bandwidth mode on/off')], ['d', _('Two series side by side')], ['?', _('This help')],
    ];
    const table = $('help-keys');
    for (const [k, what] of keys) table.append(el('tr', {}, el('td', {}, el('kbd', {}, k)), el('td', {}, what)));
  }

  setTool(id) {
    this.tool = id;
    for (const b of $('tools').children) b.classList.toggle('active', b.dataset.tool === id);
    for (const vp of this.viewports) { vp.draft = null; vp.requestDraw(); }
  }

  preset(n) {
    const vp = this.active;
    if (n >= 1 && n <= PRESETS.length) vp.setWindow({ c: PRESETS[n - 1].c, w: PRESETS[n - 1].w });
    else if (n === 9) vp.setWindow(null);
  }

  action(id) {
    const vp = this.active;
    switch (id) {
      case 'invert': vp.invert = !vp.invert; break;
      case 'rotate': vp.rotate = (vp.rotate + 90) % 360; break;
      case 'fliph': vp.flipH = !vp.flipH; break;
      case 'flipv': vp.flipV = !vp.flipV; break;
      case 'fit': vp.zoom = null; vp.pan = [0, 0]; break;
      case 'one': vp.zoom = 1 / (window.devicePixelRatio || 1); vp.pan = [0, 0]; vp.refetchForZoom(); break;
      case 'reset': vp.zoom = null; vp.pan = [0, 0]; vp.invert = false; vp.rotate = 0; vp.flipH = vp.flipV = false; vp.setWindow(null); break;
      case 'clear': vp.annotations = []; vp.draft = null; break;
      case 'zoomin': zoomAt(vp, 1.25, ...center(vp)); break;
      case 'zoomout': zoomAt(vp, 0.8, ...center(vp)); break;
      default: break;
    }
    vp.requestDraw();
    this.stateChanged();
  }

  toggleHelp() {
    const help = $('help');
    if (help.open) help.close(); else help.showModal();
  }

  installKeys() {
    document.addEventListener('keydown', (e) => {
      if (e.target.matches('input[type=number], input[type=text], textarea')) return;
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      if ($('help').open) {  // the dialog has the keys (Escape closes it); ? closes it too
        if (e.key === '?') { this.toggleHelp(); e.preventDefault(); }
        return;
      }
      const vp = this.active;
      const n = vp.series ? vp.series.stack.length : 0;
      const toolKey = TOOLS.find((t) => t.key === e.key);
      let handled = true;
      switch (e.key) {
        case 'ArrowDown': case 'ArrowRight': vp.scrollBy(1); break;
        case 'ArrowUp': case 'ArrowLeft': vp.scrollBy(-1); break;
        case 'PageDown': vp.scrollBy(10); break;
        case 'PageUp': vp.scrollBy(-10); break;
        case 'Home': vp.scrollTo(0); break;
        case 'End': vp.scrollTo(n - 1); break;
        case ' ': this.toggleCine(); break;
        case 'i': this.action('invert'); break;
        case 'r': this.action('rotate'); break;
        case 'h': this.action('fliph'); break;
        case 'v': this.action('flipv'); break;
        case 'f': this.action('fit'); break;
        case 'o': this.action('one'); break;
        case 'x': this.action('reset'); break;
        case '+': case '=': this.action('zoomin'); break;
        case '-': this.action('zoomout'); break;
        case 'b': $('lowbw').click(); break;
        case 'd': this.setCompare(this.viewports.length === 1); break;
        case '?': this.toggleHelp(); break;
        case 'Escape': vp.draft = null; vp.requestDraw(); break;
        case 'Delete': case 'Backspace': {
          const here = vp.annotations.filter((a) => vp.onThisSlice(a));
          if (here.length) vp.annotations.splice(vp.annotations.lastIndexOf(here[here.length - 1]), 1);
          vp.requestDraw(); this.stateChanged();
          break;
        }
        default:
          if (/^[1-9]$/.test(e.key)) this.preset(Number(e.key));
          else if (toolKey) this.setTool(toolKey.id);
          else handled = false;
      }
      if (handled) e.preventDefault();
    });
  }

  // -- state (URL and API) ------------------------------------------------------------------------
  stateChanged() {
    clearTimeout(this.urlTimer);
    this.urlTimer = setTimeout(() => {
      const s = this.active.getState();
      const q = new URLSearchParams();
      if (s.series) q.set('series', s.series);
      if (s.instance) q.set('instance', s.instance);
      if (s.frame > 1) q.set('frame', String(s.frame));
      if (this.active.window) { q.set('wc', numText(s.wc)); q.set('ww', numText(s.ww)); }
      if (this.active.zoom != null) { q.set('zoom', String(Math.round(s.zoom * 1000) / 1000)); q.set('panx', String(Math.round(s.panx))); q.set('pany', String(Math.round(s.pany))); }
      if (s.invert) q.set('invert', '1');
      if (s.rotate) q.set('rotate', String(s.rotate));
      if (s.flip) q.set('flip', s.flip);
      if (s.annotations.length) q.set('ann', encodeAnnotations(s.annotations));
      if (this.lowbwChoice) q.set('lowbw', '1');
      for (const keep of ['consult', 'lang']) if (PARAMS.get(keep)) q.set(keep, PARAMS.get(keep));
      history.replaceState(null, '', `${location.pathname}?${q}`);
    }, 400);
  }
}

function center(vp) {
  const r = vp.root.getBoundingClientRect();
  return [r.left + r.width / 2, r.top + r.height / 2];
}

function encodeAnnotations(list) {
  const bytes = new TextEncoder().encode(JSON.stringify(list));
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function decodeAnnotations(text) {
  try {
    const b64 = text.replace(/-/g, '+').replace(/_/g, '/');
    const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
    const list = JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
    return Array.isArray(list) ? list.filter(validAnnotation) : [];
  } catch (err) {
    console.warn('telepacs viewer: ignoring an unreadable ann parameter', err.message);
    return [];
  }
}

// ----------------------------------------------------------------------------------------------- start

const viewer = new Viewer();
const first = viewer.viewports[0];
first.applyView({
  zoom: PARAMS.get('zoom'), panx: PARAMS.get('panx'), pany: PARAMS.get('pany'), invert: PARAMS.get('invert'),
  rotate: PARAMS.get('rotate'), flip: PARAMS.get('flip') ?? undefined,
  annotations: PARAMS.get('ann') ? decodeAnnotations(PARAMS.get('ann')) : undefined,
});
if (PARAMS.get('wc') && PARAMS.get('ww') && Number(PARAMS.get('ww')) >= 1) {
  first.window = { c: Number(PARAMS.get('wc')), w: Number(PARAMS.get('ww')) };
}
seriesCache.get(DATA.series.uid).then((series) => {
  const start = DATA.start;
  first.setSeries(series, start);
  viewer.renderSeriesList();
  const item = series.stack[start];
  if (item) for (const a of first.annotations) if (!a.sop) { a.sop = item.inst.sop; a.frame = item.frame; }
  first.resize();
  viewer.activate(first);
  first.root.classList.add('active');
});

window.telepacsViewer = {
  getState: () => viewer.active.getState(),
  setState: (state) => {
    const vp = viewer.active;
    const apply = () => {
      vp.applyView(state);
      if (state.window === null) vp.setWindow(null);
      if (state.instance || state.index != null) {
        const i = state.index != null ? state.index
          : vp.series.stack.findIndex((it) => it.inst.sop === state.instance && it.frame === (state.frame || 1));
        if (i >= 0) vp.scrollTo(i);
      }
      if (state.lowbw != null || state.quality) {
        viewer.lowbwChoice = state.lowbw != null ? Boolean(state.lowbw) : viewer.lowbwChoice;
        $('lowbw').checked = viewer.lowBandwidth();
        vp.pump();
      }
      viewer.stateChanged();
    };
    if (state.series && (!vp.series || state.series !== vp.series.uid)) {
      return viewer.openSeries(state.series, vp).then(apply);
    }
    apply();
    return Promise.resolve();
  },
  scrollTo: (index) => viewer.active.scrollTo(index),
  onDisplay: (callback) => { displayListeners.push(callback); },
  // For tests and benchmarks: the viewer itself.
  viewer,
};
