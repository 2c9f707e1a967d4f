"""Debian's Firefox ESR (/usr/bin/firefox-esr), headless, driven through its own Marionette protocol with
Mozilla's client (PyPI ``marionette-driver``). No geckodriver (not packaged) and no downloaded browser.

``start_firefox`` runs ``firefox-esr --headless --marionette`` on a temporary profile whose user.js names a
free Marionette port, waits for the port and opens a session. From the browser's chrome (privileged)
context it then records what the pages do wrong, as the Playwright fixtures do for chromium: errors on
the console, uncaught errors, HTTP answers >= 400 and requests leaving telepacs' origin (those are
cancelled). Stop it with ``Firefox.close`` (by its PID).
"""

from __future__ import annotations

import base64
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from marionette_driver.marionette import Marionette

from tests.peers import free_port

FIREFOX = Path("/usr/bin/firefox-esr")

# Quiet, offline, deterministic: no first-run pages, updates, telemetry, or background fetches. Marionette
# adds its own "recommended" preferences on top (remote.prefs.recommended).
_PREFS: dict[str, Any] = {
    "app.update.disabledForTesting": True,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "toolkit.telemetry.enabled": False,
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "services.settings.server": "data:,#remote-settings-dummy/v1",
    "layout.css.devPixPerPx": "1.0",
    "dom.disable_beforeunload": True,
    "browser.tabs.warnOnClose": False,
    # The pages' console.* calls as "console.error: ..." lines on stdout (the log); the browser's own not.
    "devtools.console.stdout.content": True,
    "devtools.console.stdout.chrome": False,
}

# Runs once in the browser's chrome window (privileged): records the content pages' problems there.
_WATCH = """
const [origin] = arguments;
const problems = {console: [], failed: [], external: [], requests: []};
window.__telepacsProblems = problems;
const fromPage = (channel) => {
  const bc = channel.loadInfo && channel.loadInfo.browsingContext;
  return Boolean(bc && bc.isContent);
};
const observer = {
  observe(subject, topic) {
    let channel;
    try { channel = subject.QueryInterface(Ci.nsIHttpChannel); } catch (e) { return; }
    if (!fromPage(channel)) return;
    const url = channel.URI.spec;
    if (topic === 'http-on-modify-request') {
      problems.requests.push(url);
      if (!url.startsWith(origin + '/')) {
        problems.external.push(url);
        channel.cancel(Cr.NS_ERROR_ABORT);
      }
    } else if (channel.responseStatus >= 400) {
      problems.failed.push(`${channel.responseStatus} ${channel.requestMethod} ${url}`);
    }
  },
};
Services.obs.addObserver(observer, 'http-on-modify-request');
Services.obs.addObserver(observer, 'http-on-examine-response');
Services.obs.addObserver(observer, 'http-on-examine-cached-response');
// Uncaught errors of the pages' scripts (not warnings, not the browser's own chrome). Their console.error()
// calls reach the parent process only as text on stdout (devtools.console.stdout.content): see problems().
Services.console.registerListener({
  observe(message) {
    if (!(message instanceof Ci.nsIScriptError) || message.isWarning || message.isFromChromeContext) return;
    if (message.category !== 'content javascript') return;
    problems.console.push(`uncaught: ${message.errorMessage} (${message.sourceName}:${message.lineNumber})`);
  },
});
"""


@dataclass
class Problems:
    """What Firefox saw go wrong on telepacs' pages (the chromium fixtures' ``Problems``, read back)."""

    console: list[str]
    failed: list[str]
    external: list[str]
    requests: list[str]  # every URL the pages asked for, in order

    def assert_none(self) -> None:
        assert self.external == [], f"the viewer tried to load from outside telepacs: {self.external}"
        assert self.failed == [], f"failed requests: {self.failed}"
        assert self.console == [], f"browser console errors: {self.console}"


@dataclass
class Firefox:
    process: subprocess.Popen[bytes]
    client: Marionette
    profile: Path
    log: Path  # Firefox's stdout and stderr
    log_offset: int = 0  # where in the log watch() started

    def screenshot(self, path: Path) -> Path:
        """The viewport as Firefox draws it, as a PNG."""
        path.write_bytes(base64.b64decode(self.client.screenshot(full=False)))
        return path

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body: ``return ...``) in the page."""
        # sandbox=None: in the page's own global (as WebDriver clients do), so page variables are visible.
        return self.client.execute_script(script, script_args=list(args), sandbox=None)

    def wait_for(self, expression: str, timeout: float = 30.0, *args: Any) -> Any:
        """Poll the page until the JavaScript ``expression`` is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(f"return ({expression});", *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"Firefox: timed out after {timeout} s waiting for {expression}")
            time.sleep(0.05)

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"Firefox: timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    def watch(self, origin: str) -> None:
        """Start recording the pages' problems (see the module's docstring)."""
        with self.client.using_context(self.client.CONTEXT_CHROME):
            self.client.execute_script(_WATCH, script_args=[origin])
        self.log_offset = self.log.stat().st_size

    def problems(self) -> Problems:
        with self.client.using_context(self.client.CONTEXT_CHROME):
            found = self.client.execute_script("return window.__telepacsProblems;")
        with open(self.log, "rb") as log:
            log.seek(self.log_offset)
            printed = log.read().decode(errors="replace").splitlines()
        found["console"] += [line for line in printed if line.startswith("console.error:")]
        return Problems(**found)

    def resize_viewport(self, width: int, height: int) -> None:
        """Make the page's viewport (window.innerWidth x innerHeight) exactly this size."""
        for _ in range(3):
            inner = self.js("return [window.innerWidth, window.innerHeight];")
            if inner == [width, height]:
                return
            rect = self.client.window_rect
            self.client.set_window_rect(width=rect["width"] + width - inner[0],
                                        height=rect["height"] + height - inner[1])
        raise AssertionError(f"Firefox: cannot make the viewport {width}x{height}: {inner}")

    def close(self) -> None:
        try:
            self.client.delete_session()
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def _user_js(port: int, locale: str) -> str:
    prefs = dict(_PREFS, **{"marionette.port": port, "intl.accept_languages": locale})
    lines = []
    for name, value in prefs.items():
        text = ("true" if value else "false") if isinstance(value, bool) else (
            str(value) if isinstance(value, int) else '"' + str(value).replace('"', '\\"') + '"')
        lines.append(f'user_pref("{name}", {text});')
    return "\n".join(lines) + "\n"


def start_firefox(workdir: Path, *, width: int = 1280, height: int = 800, locale: str = "en-GB",
                  timeout: float = 60.0) -> Firefox:
    """Headless Firefox ESR on a fresh profile under ``workdir``, its viewport ``width`` x ``height``."""
    profile = workdir / "firefox-profile"
    profile.mkdir(parents=True)
    port = free_port()
    (profile / "user.js").write_text(_user_js(port, locale))
    log = workdir / "firefox.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(FIREFOX), "--headless", "--marionette", "-remote-allow-system-access", "--no-remote", "-profile", str(profile),
             f"--window-size={width},{height}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    client = Marionette(host="127.0.0.1", port=port)
    try:
        client.start_session(timeout=timeout)  # waits for the port first
        client.timeout.script = 30
        client.timeout.page_load = 30
        browser = Firefox(process, client, profile, log)
        browser.resize_viewport(width, height)
        return browser
    except BaseException:
        if process.poll() is not None:
            raise RuntimeError(f"firefox-esr exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        process.terminate()
        process.wait(timeout=15)
        raise
