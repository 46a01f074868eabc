"""Headless Chromium through selenium and /usr/bin/chromedriver, for the web client tests.

Each `Browser` is one browser profile (its own user data dir, so its own IndexedDB). The
performance log (CDP network events) lists every URL the page requested.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
WAIT = 60  # seconds: RSA 3072 generation and a fetch round on a busy two-core machine


def require_browser() -> None:
    if not (Path(CHROMEDRIVER).exists() and shutil.which(CHROMIUM)):
        pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them: apt-get install chromium chromium-driver)")


class Browser:
    def __init__(self, profile_dir: Path, width: int = 1000, height: int = 900):
        require_browser()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
                    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-extensions",
                    "--disable-features=Translate,OptimizationHints,MediaRouter",
                    "--metrics-recording-only", "--safebrowsing-disable-auto-update"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_script_timeout(WAIT)
        if width < 500:  # headless windows are at least 500 px wide: emulate a phone's viewport
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.requested: list[str] = []

    def quit(self) -> None:
        self.collect_requests()
        self.driver.quit()

    # -- waiting --------------------------------------------------------------------------

    def wait(self, condition: Callable[[Any], Any], timeout: float = WAIT, message: str = "") -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(condition, message)
        except Exception:
            raise AssertionError(f"{message or 'condition'} not met; error box: {self.text('error')!r}; "
                                 f"notice: {self.text('notice')!r}; console: {self.console()}")

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), message="the app started")

    # -- the page -------------------------------------------------------------------------

    def by_id(self, element_id: str):
        return self.driver.find_element("id", element_id)

    def text(self, element_id: str) -> str:
        try:
            element = self.by_id(element_id)
            return element.text if element.is_displayed() else ""
        except Exception:
            return ""

    def fill(self, element_id: str, value: str) -> None:
        element = self.by_id(element_id)
        element.clear()
        element.send_keys(value)

    def click(self, element_id: str) -> None:
        self.by_id(element_id).click()

    def go(self, view: str) -> None:
        self.click(f"nav-{view}")
        self.wait(lambda d: d.find_element("id", f"view-{view}").is_displayed(), message=f"view {view} shown")

    def notice(self, contains: str) -> str:
        self.wait(lambda d: contains in self.text("notice"), message=f"a notice containing {contains!r}")
        return self.text("notice")

    def error(self, contains: str) -> str:
        self.wait(lambda d: contains in self.text("error"), message=f"an error containing {contains!r}")
        return self.text("error")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))

    def console(self) -> list[str]:
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")]
        except Exception:
            return []

    def run_module(self, script: str, *args: Any) -> Any:
        """Run async JavaScript in the page (`arguments` holds `args`); returns what it resolves to."""
        wrapper = ("const done = arguments[arguments.length - 1];"
                   f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
                   ".then((v) => done({ok: v}), (e) => done({error: String(e && e.stack || e)}));")
        result = self.driver.execute_async_script(wrapper, *args)
        if "error" in result:
            raise AssertionError(f"JavaScript failed: {result['error']}")
        return result.get("ok")

    def collect_requests(self) -> list[str]:
        """Every URL the browser requested so far (CDP Network.requestWillBeSent events)."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
        return self.requested
