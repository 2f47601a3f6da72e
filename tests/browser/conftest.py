"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium.

Nothing is downloaded at run time: the driver's path is given, so Selenium Manager never
runs. Selenium's calls block, and the engine runs on the tests' event loop: every call goes
through :class:`Browser`, which runs it in a thread. Each test's pages are saved as
screenshots under ``test-artifacts/screenshots/<test>/<step>.png``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = ROOT / "test-artifacts" / "screenshots"
WAIT_S = 20.0
T = TypeVar("T")


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


class Browser:
    """One Chromium, its calls run off the event loop."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver, self.shots, self.step = driver, shots, 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def wait(self, condition: Callable[[Any], T], seconds: float = WAIT_S) -> T:
        from selenium.webdriver.support.ui import WebDriverWait

        return await self.run(WebDriverWait(self.driver, seconds).until, condition)

    async def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return await self.wait(ec.presence_of_element_located((By.CSS_SELECTOR, selector)))

    async def text(self, selector: str) -> str:
        el = await self.css(selector)
        return str(await self.run(lambda: el.text))

    async def wait_text(self, selector: str, text: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        await self.wait(ec.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))

    async def type(self, selector: str, text: str, clear: bool = True) -> None:
        el = await self.css(selector)

        def typing() -> None:
            if clear:
                el.clear()
            el.send_keys(text)

        await self.run(typing)

    async def click(self, selector: str) -> None:
        el = await self.css(selector)
        await self.run(el.click)

    async def submit_and_wait(self, selector: str) -> None:
        """Click a button that loads a new page, and wait until the old one is gone."""
        old = await self.css("html")
        await self.click(selector)
        await self.wait(_gone(old))

    async def select(self, selector: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        el = await self.css(selector)
        await self.run(lambda: Select(el).select_by_value(value))

    async def shot(self, name: str) -> Path:
        """The page as it is now, saved as the test's next screenshot."""
        self.step += 1
        path = self.shots / f"{self.step:02d}-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}.png"
        await self.run(self.driver.save_screenshot, str(path))
        return path

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    def cookie(self, name: str) -> str | None:
        c = self.driver.get_cookie(name)
        return None if c is None else str(c["value"])


@pytest.fixture
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Browser]:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--lang=en-US"):
        options.add_argument(arg)
    shots = SHOTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    driver = await asyncio.to_thread(webdriver.Chrome, options=options,
                                     service=Service(CHROMEDRIVER))
    try:
        yield Browser(driver, shots)
    finally:
        await asyncio.to_thread(driver.quit)


def _gone(old: Any) -> Callable[[Any], bool]:
    """Selenium's staleness_of, also when Chromium answers the old page's node with
    "Node with given id does not belong to the document" (a WebDriverException, not a
    StaleElementReferenceException: seen once in CI, on a page that was being replaced)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    def check(_: Any) -> bool:
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False
    return check
