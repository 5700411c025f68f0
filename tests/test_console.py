"""The web console in a real headless browser (Debian's chromium through chromedriver): sign in,
type and run Python, run a C program that reads stdin, see streamed output and exit codes, keep a
session and destroy it from the sessions table.

``KB_CONSOLE_SCREENSHOTS=DIR`` also saves the screenshots the README shows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from .support import Server, run_server

T = TypeVar("T")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = os.environ.get("KB_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="module")
def console_server() -> Iterator[Server]:
    with run_server(pool_python="1") as s:
        yield s


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="kb-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    # As root, chromium needs --no-sandbox; nothing may reach the network or update itself.
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1280,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: WebDriver, timeout: float = 60) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout)


def run_and_wait(driver: WebDriver) -> tuple[str, str]:
    """Click Run; (output text, exit badge) once the exit code arrives."""
    driver.find_element(By.ID, "run").click()
    wait(driver, 90).until(lambda d: d.find_element(By.ID, "exit-code").is_displayed()
                           and d.find_element(By.ID, "run").is_enabled())
    return (driver.find_element(By.ID, "output").text,
            driver.find_element(By.ID, "exit-code").text)


def shot(driver: WebDriver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / name))


def stable(browser: Any, read: Callable[[Any], T]) -> T:
    """``read`` done against the sessions table, which the page re-renders every few seconds:
    an element found just before a refresh is stale by the time it is used, so look again."""
    def attempt(b: Any) -> T | None:
        try:
            return read(b)
        except StaleElementReferenceException:
            return None
    result: T = wait(browser).until(attempt)
    return result


def test_console_sign_in_run_code_and_destroy_a_session(console_server: Server,
                                                        browser: WebDriver) -> None:
    started = time.monotonic()
    with console_server.client() as api:  # a Backend.AI session, to see it in the table
        assert api.post("/session", json={"lang": "python",
                                          "clientSessionToken": "from-the-api"}).status_code == 201

    # Only the page's own files are served: not the npm tree beside them.
    for path in ("/console/package.json", "/console/editor-entry.mjs",
                 "/console/node_modules/codemirror/package.json", "/console/../app.py"):
        assert requests.get(console_server.url + path, timeout=30).status_code == 404, path
    for path in ("/console/", "/console/console.js", "/console/editor.js"):
        assert requests.get(console_server.url + path, timeout=30).status_code == 200, path

    browser.get(console_server.url + "/console")
    wait(browser).until(ec.visibility_of_element_located((By.ID, "signin")))
    # A wrong key is refused and the page says so.
    browser.find_element(By.ID, "key").send_keys("not-a-key", Keys.ENTER)
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "signin-error"), "refused"))
    assert not browser.find_element(By.ID, "app").is_displayed()
    shot(browser, "console-signin.png")

    browser.find_element(By.ID, "key").send_keys(console_server.secret_key, Keys.ENTER)
    wait(browser).until(ec.visibility_of_element_located((By.ID, "app")))
    assert browser.find_element(By.ID, "access-key").text == console_server.access_key
    # The editor is CodeMirror (the bundled component), not a textarea.
    content = browser.find_element(By.CSS_SELECTOR, "#editor .cm-editor .cm-content")
    languages = [o.text for o in Select(browser.find_element(By.ID, "language")).options]
    assert "python" in languages and "c" in languages

    # Python, typed into the editor.
    content.click()
    content.send_keys(Keys.CONTROL, "a")
    content.send_keys(Keys.DELETE)
    content.send_keys("print(6*7)")
    wait(browser).until(lambda d: "print(6*7)" in content.text)
    output, exit_badge = run_and_wait(browser)
    assert output.strip() == "42" and exit_badge == "exit 0"

    # A failing program: its stderr and its exit code.
    content.send_keys(Keys.CONTROL, "a")
    content.send_keys(Keys.DELETE)
    content.send_keys("import sys\nprint('bye')\nsys.exit(3")
    output, exit_badge = run_and_wait(browser)
    assert "bye" in output and exit_badge == "exit 3"

    # C reading stdin: the language's sample reads two numbers.
    Select(browser.find_element(By.ID, "language")).select_by_value("c")
    wait(browser).until(lambda d: "scanf" in content.text)
    browser.find_element(By.ID, "stdin").send_keys("6 7\n")
    output, exit_badge = run_and_wait(browser)
    assert output.strip() == "42" and exit_badge == "exit 0"
    shot(browser, "console-c-stdin.png")

    # Keep a Python session: it shows in the sessions table, beside the API's session.
    Select(browser.find_element(By.ID, "language")).select_by_value("python")
    browser.find_element(By.ID, "stdin").clear()
    browser.find_element(By.ID, "persist").click()
    content.send_keys(Keys.CONTROL, "a")
    content.send_keys(Keys.DELETE)
    content.send_keys("import time\nfor i in range(3):\nprint(i, flush=True); time.sleep(0.4)")
    output, exit_badge = run_and_wait(browser)
    assert output.split() == ["0", "1", "2"] and exit_badge == "exit 0"
    row = '#sessions tr[data-name="console-python"]'
    wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, row)))
    cells = stable(browser, lambda b: [c.text for c in b.find_elements(By.CSS_SELECTOR,
                                                                        row + " td")])
    assert cells[1:4] == ["sandbox", "python", "RUNNING"], cells
    assert browser.find_elements(By.CSS_SELECTOR, '#sessions tr[data-name="from-the-api"]')
    executions = browser.find_elements(By.CSS_SELECTOR, "#executions tbody tr")
    assert len(executions) >= 4
    shot(browser, "console.png")

    stable(browser, lambda b: b.find_element(By.CSS_SELECTOR, row + " button.destroy").click()
           or True)
    wait(browser).until(ec.invisibility_of_element_located((By.CSS_SELECTOR, row)))
    with console_server.client() as api:
        names = [s["name"] for s in api.get("/console/api/sessions").json()["sessions"]]
    assert "console-python" not in names and "from-the-api" in names
    print(f"console test took {time.monotonic() - started:.1f} s")
