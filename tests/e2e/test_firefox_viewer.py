"""The reading page in Firefox ESR (Debian's firefox-esr, headless, through Marionette: tests/e2e/firefox.py)
against telepacs under gunicorn with ../shared/testdata loaded. The same checks as the chromium tests of
tests/e2e/test_viewer.py, on one Firefox for the module (it takes seconds to start).

Every test fails on a console error, an uncaught error, a failed request or a request leaving the origin.
Screenshots go to the test's tmp dir (printed).
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from marionette_driver import By
from marionette_driver.keys import Keys
from PIL import Image

from tests.e2e import phantoms
from tests.e2e.conftest import Loaded
from tests.e2e.firefox import FIREFOX, Firefox, start_firefox
from tests.viewer.conftest import ADMIN, ADMIN_PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

# The image canvas of the active viewport as RGBA bytes (base64: a 4 MB JSON array would be slow).
_CANVAS = """
const c = telepacsViewer.viewer.active.image;
const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let text = '';
for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
return {width: c.width, height: c.height, rgba: btoa(text)};
"""


@pytest.fixture(scope="module")
def firefox(tmp_path_factory: pytest.TempPathFactory, loaded_web: Loaded) -> Iterator[Firefox]:
    """Headless Firefox ESR with the admin logged in through the login page. A missing Firefox fails (it is
    not skipped): scripts/test.sh installs firefox-esr."""
    assert FIREFOX.exists(), f"{FIREFOX} is not installed: apt-get install firefox-esr (scripts/test.sh does)"
    browser = start_firefox(tmp_path_factory.mktemp("firefox"))
    try:
        browser.watch(loaded_web.url)
        browser.client.navigate(loaded_web.url + "/login")
        browser.client.find_element(By.ID, "username").send_keys(ADMIN)
        browser.client.find_element(By.ID, "password").send_keys(ADMIN_PASSWORD)
        browser.client.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        browser.wait_for("!location.pathname.startsWith('/login') && document.readyState === 'complete'")
        yield browser
    finally:
        browser.close()


class Session:
    """One test's use of the module's Firefox: its screenshots and its share of the recorded problems."""

    def __init__(self, ff: Firefox, web: Loaded, shots: Path) -> None:
        self.ff, self.web, self.shots = ff, web, shots
        problems = ff.problems()
        self.seen = {name: len(getattr(problems, name)) for name in ("console", "failed", "external", "requests")}

    def problems(self) -> Any:
        """What went wrong since this test started."""
        found = self.ff.problems()
        for name, count in self.seen.items():
            setattr(found, name, getattr(found, name)[count:])
        return found

    def shot(self, name: str) -> Path:
        return self.ff.screenshot(self.shots / f"{name}.png")

    def js(self, script: str, *args: Any) -> Any:
        return self.ff.js(script, *args)

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        return self.ff.wait_for(expression, timeout)

    def keys(self, *keys: str) -> None:
        sequence = self.ff.client.actions.sequence("key", "keyboard")
        for key in keys:
            sequence.key_down(key).key_up(key)
        sequence.perform()

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8, button: int = 0) -> None:
        """Press ``button`` (0 left, 2 right) at ``start``, move to ``end`` in ``steps``, release."""
        pointer = self.ff.client.actions.sequence("pointer", "mouse", {"pointerType": "mouse"})
        pointer.pointer_move(round(start[0]), round(start[1])).pointer_down(button)
        for k in range(1, steps + 1):
            pointer.pointer_move(round(start[0] + (end[0] - start[0]) * k / steps),
                                 round(start[1] + (end[1] - start[1]) * k / steps))
        pointer.pointer_up(button).perform()

    def open_viewer(self, study: str, query: str = "") -> None:
        self.ff.client.navigate(f"{self.web.url}/viewer/{study}{query}")
        self.wait_for_viewer()

    def wait_for_viewer(self) -> None:
        self.wait_for("document.body.dataset.firstImageMs && window.telepacsViewer "
                      "&& telepacsViewer.getState().quality")

    def wait_full(self) -> None:
        self.wait_for("document.body.dataset.seriesLoadedMs")

    def state(self) -> dict[str, Any]:
        return self.js("return telepacsViewer.getState();")

    def overlay(self, corner: str = "bl") -> str:
        return self.js(f"return document.querySelector('.rv-vp.active .rv-{corner}').innerText;")

    def canvas(self) -> np.ndarray:
        found = self.js(_CANVAS)
        return np.frombuffer(base64.b64decode(found["rgba"]), dtype=np.uint8).reshape(found["height"],
                                                                                   found["width"], 4)

    def image_to_client(self, x: float, y: float) -> tuple[float, float]:
        """Where image point (column x, row y) is on the page, in CSS pixels."""
        return tuple(self.js("""
          const [x, y] = arguments;
          const vp = telepacsViewer.viewer.active;
          const p = vp.matrix().transformPoint(new DOMPoint(x, y));
          const r = vp.root.getBoundingClientRect();
          const dpr = window.devicePixelRatio || 1;
          return [r.left + p.x / dpr, r.top + p.y / dpr];""", x, y))


@pytest.fixture
def ff(firefox: Firefox, loaded_web: Loaded, tmp_path: Path) -> Iterator[Session]:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    session = Session(firefox, loaded_web, shots)
    yield session
    print(f"Firefox screenshots in {shots}")
    session.problems().assert_none()


def number_in(text: str, before: str) -> float:
    found = re.search(r"(-?\d+(?:\.\d+)?)\s*" + re.escape(before), text)
    assert found, f"no number before {before!r} in {text!r}"
    return float(found.group(1))


# ------------------------------------------------------------------------------------------------ tests


def test_study_list_opens_the_ct_and_draws_the_first_image(ff: Session) -> None:
    ff.ff.client.navigate(ff.web.url + "/")
    ct = ff.web.studies["ct"]
    assert ff.js("return document.querySelector('h1').innerText;") == "Studies"
    ff.shot("01-study-list")
    ff.ff.client.find_element(By.CSS_SELECTOR, f'tr.study[data-study="{ct}"] a.open').click()
    ff.wait_for(f"location.pathname === '/viewer/{ct}'")
    ff.wait_for_viewer()
    first = float(ff.js("return document.body.dataset.firstImageMs;"))
    assert "Slice 6 / 10" in ff.overlay()
    assert ff.js("return document.body.dataset.slice;") == "6"
    shown = ff.canvas()[..., 0].astype(int)
    # The image is drawn: many grey levels, not a black (or single-colour) canvas.
    assert shown.std() > 20 and len(np.unique(shown)) > 50, (shown.std(), len(np.unique(shown)))
    ff.shot("02-ct-first-image")
    ff.wait_full()
    assert ff.state()["quality"] == "full"
    # The browser's own record of the page's requests (what assert_none checks) saw the slices arrive.
    assert any(f"/studies/{ct}/" in url and "/rendered?" in url for url in ff.problems().requests)
    print(f"Firefox: first image {first:.0f} ms after navigation start")


def test_scrolls_with_keys_and_wheel(ff: Session) -> None:
    ff.open_viewer(ff.web.studies["ct"])
    ff.wait_full()
    ff.keys(Keys.DOWN, Keys.DOWN)
    ff.wait_for("document.body.dataset.slice === '8'")
    assert "Slice 8 / 10" in ff.overlay()
    ff.shot("01-slice-8-keys")
    ff.keys(Keys.HOME)
    ff.wait_for("document.body.dataset.slice === '1'")
    ff.keys(Keys.END)
    ff.wait_for("document.body.dataset.slice === '10'")
    assert "Slice 10 / 10" in ff.overlay()
    ff.keys(Keys.PAGE_UP)
    ff.wait_for("document.body.dataset.slice === '1'")
    # Three wheel notches down over the image (WebDriver wheel input: pixel deltas).
    wheel = ff.ff.client.actions.sequence("wheel", "wheel")
    for _ in range(3):
        wheel.scroll(700, 450, 0, 100)
    wheel.perform()
    ff.wait_for("document.body.dataset.slice === '4'")
    assert "Slice 4 / 10" in ff.overlay()
    ff.shot("02-slice-4-wheel")
    # A mouse wheel in Firefox reports lines (deltaMode 1, 3 lines a notch), not pixels: two notches up.
    ff.js("""
      const layer = telepacsViewer.viewer.active.layer;
      for (let i = 0; i < 2; i++) layer.dispatchEvent(new WheelEvent('wheel', {deltaY: -3, deltaMode: 1,
        clientX: 700, clientY: 450, bubbles: true, cancelable: true}));""")
    ff.wait_for("document.body.dataset.slice === '2'")
    assert "Slice 2 / 10" in ff.overlay()
    # Ctrl + one notch up in lines zooms in as much as one 100 px notch of Chromium does: e^(100/300).
    before = ff.state()["zoom"]
    ff.js("""telepacsViewer.viewer.active.layer.dispatchEvent(new WheelEvent('wheel', {deltaY: -3, deltaMode: 1,
      ctrlKey: true, clientX: 700, clientY: 450, bubbles: true, cancelable: true}));""")
    assert ff.state()["zoom"] == pytest.approx(before * math.exp(100 / 300), rel=1e-6)
    assert ff.js("return document.body.dataset.slice;") == "2"
    ff.shot("03-slice-2-zoomed-line-wheel")
    state = ff.state()
    listing = ff.web.http.get(f"{ff.web.url}/api/viewer/series/{state['series']}", timeout=10).json()
    assert listing["instances"][1]["sop"] == state["instance"]  # the slice on screen is the one named


def test_preset_matches_the_servers_rendering(ff: Session) -> None:
    ff.open_viewer(ff.web.studies["ct"])
    ff.wait_full()
    ff.js("window.__displays = []; telepacsViewer.onDisplay(e => window.__displays.push(e));")
    ff.keys("6")  # abdomen 50/400
    ff.wait_for("window.__displays.some(d => d.index === 5 && d.wc === 50 && d.ww === 400 && d.quality === 'full')")
    ff.wait_for("document.body.dataset.slice === '6'")
    assert "W 400  L 50" in ff.overlay("br")
    # One image pixel per device pixel on whole pixels: the canvas then holds the image unscaled.
    ff.js("""
      const vp = telepacsViewer.viewer.active;
      vp.zoom = 1 / (window.devicePixelRatio || 1); vp.pan = [0, 0];
      const m = vp.matrix();
      vp.pan = [Math.round(m.e) - m.e, Math.round(m.f) - m.f];
      vp.draw();""")
    ff.shot("preset-abdomen-1to1")
    rgba = ff.canvas()
    x0, y0 = (int(round(v)) for v in ff.js("const m = telepacsViewer.viewer.active.matrix(); return [m.e, m.f];"))
    shown = rgba[y0:y0 + 512, x0:x0 + 512, 0].astype(int)
    s = ff.state()
    url = (f"{ff.web.url}/dicomweb/studies/{ff.web.studies['ct']}/series/{s['series']}/instances/{s['instance']}"
           f"/frames/1/rendered?window=50,400,linear&quality=100")
    response = ff.web.http.get(url, headers={"Accept": "image/png"}, timeout=30)
    server = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"), dtype=int)
    assert shown.shape == server.shape == (512, 512)
    difference = np.abs(shown - server)
    assert difference.mean() < 0.5 and np.percentile(difference, 99.9) <= 1, (difference.mean(), difference.max())
    assert server.std() > 5  # a real image, not two blank ones


def test_length_in_millimetres_on_a_phantom(ff: Session) -> None:
    ff.open_viewer(ff.web.studies["measure"])
    ff.wait_full()
    ff.keys("l")
    start = ff.image_to_client(phantoms.DOT_A[0] + 0.5, phantoms.DOT_A[1] + 0.5)
    end = ff.image_to_client(phantoms.DOT_B[0] + 0.5, phantoms.DOT_B[1] + 0.5)
    ff.drag(start, end)
    ff.wait_for("document.querySelectorAll('#measurements li').length === 1")
    (text,) = ff.js("return [...document.querySelectorAll('#measurements li')].map(li => li.innerText);")
    # PixelSpacing 0.8 mm between rows, 0.5 mm between columns.
    dx, dy = phantoms.DOT_B[0] - phantoms.DOT_A[0], phantoms.DOT_B[1] - phantoms.DOT_A[1]
    expected = math.hypot(dx * 0.5, dy * 0.8)
    assert number_in(text, "mm") == pytest.approx(expected, abs=0.6), text
    assert "detector" not in text
    (annotation,) = ff.state()["annotations"]
    assert annotation["type"] == "length"
    for point, dot in zip(annotation["points"], (phantoms.DOT_A, phantoms.DOT_B)):
        assert point == pytest.approx([dot[0] + 0.5, dot[1] + 0.5], abs=0.6)
    ff.shot("length")


def test_switches_to_vietnamese(ff: Session) -> None:
    ff.open_viewer(ff.web.studies["ct"])
    ff.ff.client.find_element(By.CSS_SELECTOR, "a[hreflang=vi]").click()
    ff.wait_for("document.documentElement.lang === 'vi' && window.telepacsViewer "
                "&& telepacsViewer.getState().quality")
    assert "Lát cắt 6 / 10" in ff.overlay()
    assert ff.js("return document.querySelector(\"button[data-preset='4']\").innerText;") == "Phổi"
    ff.keys("?")
    ff.wait_for("document.getElementById('help').open")
    assert "Phím tắt" in ff.js("return document.querySelector('#help h2').innerText;")
    ff.shot("vietnamese-help")
    ff.keys(Keys.ESCAPE)
    ff.ff.client.find_element(By.CSS_SELECTOR, "a[hreflang=en]").click()
    ff.wait_for("document.documentElement.lang === 'en' && window.telepacsViewer "
                "&& telepacsViewer.getState().quality")
    assert "Slice 6 / 10" in ff.overlay()


def test_window_level_drag_with_the_right_button(ff: Session) -> None:
    ff.open_viewer(ff.web.studies["ct"])
    ff.wait_full()
    assert (ff.state()["wc"], ff.state()["ww"]) == (0, 200)  # the file's window
    ff.js("window.__displays = []; telepacsViewer.onDisplay(e => window.__displays.push(e));")
    # Right button (no context menu in the way): right 100 px widens by 100, down 50 px raises the centre by 50.
    ff.drag((700, 450), (800, 500), steps=10, button=2)
    ff.wait_for("window.__displays.some(d => d.index === 5 && d.wc === 50 && d.ww === 300 && d.quality === 'full')")
    assert "W 300  L 50" in ff.overlay("br")
    ff.shot("wl-dragged")
