"""The web console in a real browser: the README's ``make demo KEEP=1`` leaves the demo pair
running, and Debian's headless Chromium, driven through chromedriver (selenium), does what a
person would on the pages.

One browser and one stub+agent pair for the whole module (session-scoped fixtures), so the
tests below run in order on the same pair: the demo has already run its scenario (scaled to 5
replicas, collected metrics once, refused a scale to 10 ...), and each test adds to it.

Every page is checked with axe-core (from the npm registry, ``make browser-deps``) inside the
same browser, and saved as a screenshot under ``build/test-artifacts/console/`` (or
``$BYOC_TEST_ARTIFACTS/console``). Chromium, chromedriver and npm are installed by ``.ci/run``;
without them the module is skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psutil
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.ci import unavailable
from tests.conftest import scaled

REPO = Path(__file__).resolve().parent.parent
AXE = REPO / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(os.environ.get("BYOC_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
CHROMIUM_FLAGS = (
    # Chromium as root, offline: without these it tries the network (and fails) or refuses.
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
SERIOUS = ("serious", "critical")
T = TypeVar("T")


def _readme_blocks(suite: str) -> list[str]:
    """The fenced blocks of README.md marked ``<!-- readme-test: SUITE -->``, in order."""
    text = (REPO / "README.md").read_text()
    pattern = rf"<!-- readme-test: {re.escape(suite)} -->\n```\w*\n(.*?)```"
    return re.findall(pattern, text, flags=re.DOTALL)


def _browser_or_skip() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [
        what
        for what, found in (
            ("chromium (apt: chromium)", chromium),
            ("chromedriver (apt: chromium-driver)", driver),
            (f"axe-core ({AXE.relative_to(REPO)}: make browser-deps)", AXE.exists()),
        )
        if not found
    ]
    if missing:
        unavailable(f"the console's browser tests need {', '.join(missing)}")
    assert chromium is not None
    assert driver is not None
    return chromium, driver


# -- the pair and the browser (one each for the session) --------------------------------------


@dataclass
class KeptDemo:
    url: str
    token: str
    root: Path
    notes: dict[str, Any] = field(default_factory=dict)
    """What one test leaves for a later one (the audit head it saw first)."""

    @property
    def agent_config(self) -> Path:
        return self.root / "agent" / "agent.toml"


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    chromium, chromedriver = _browser_or_skip()
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: never download
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path_factory.getbasetemp())
    options.add_argument(f"--user-data-dir={profile}")
    log = tmp_path_factory.getbasetemp() / "chromedriver.log"
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=chromedriver, log_output=str(log))
    )
    driver.set_script_timeout(scaled(30))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def demo(browser: WebDriver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeptDemo]:
    """``make demo KEEP=1`` from the README, then ``make demo-stop`` from the README."""
    keep, stop = _readme_blocks("console")
    root = tmp_path_factory.mktemp("console") / "demo"
    env = {**os.environ, "BYOC_DEMO_DIR": str(root)}

    def run(block: str, seconds: float) -> str:
        done = subprocess.run(
            ["sh", "-ec", block],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=scaled(seconds),
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    ran = run(keep, 300)
    url = re.search(r"^  console:\s+(\S+)$", ran, re.MULTILINE)
    token = re.search(r"^  token:\s+(\S+)$", ran, re.MULTILINE)
    assert url is not None, ran
    assert token is not None, ran
    assert token.group(1) == (root / "console.token").read_text().strip()
    try:
        yield KeptDemo(url=url.group(1), token=token.group(1), root=root)
    finally:
        stopped = run(stop, 120)
        assert "byoc-agent (pid" in stopped, stopped  # stopped here, or by the last test
        assert "stopped cp-stub" in stopped, stopped


# -- helpers ----------------------------------------------------------------------------------


def wait_for(
    driver: WebDriver, condition: Callable[[WebDriver], T | None], seconds: float = 30
) -> T:
    """Poll the page (WebDriver's own wait) until ``condition`` holds; a region that the page
    replaced meanwhile is simply looked up again."""
    wait = WebDriverWait(
        driver,
        scaled(seconds),
        poll_frequency=0.1,
        ignored_exceptions=[StaleElementReferenceException],
    )
    result = wait.until(condition)
    assert result is not None  # until() returns only a truthy value
    return result


def axe_violations(driver: WebDriver) -> list[dict[str, Any]]:
    """axe-core's violations on the current page (injected into it if not there yet)."""
    if not driver.execute_script("return typeof window.axe === 'object'"):
        driver.execute_script(AXE.read_text())
    report = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        axe.run(document, {resultTypes: ["violations"]})
          .then((r) => done(JSON.stringify(r.violations)))
          .catch((e) => done(JSON.stringify({error: String(e)})));"""
    )
    violations = json.loads(report)
    assert isinstance(violations, list), violations
    return violations


def check_page(driver: WebDriver, name: str) -> None:
    """Save a screenshot of the whole page, then check it with axe-core: no serious or
    critical violation (the report is saved beside the screenshot)."""
    out = ARTIFACTS / "console"
    out.mkdir(parents=True, exist_ok=True)
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(max(full + 120, height), 8000))
    try:
        assert driver.save_screenshot(str(out / f"{name}.png"))
    finally:
        driver.set_window_size(width, height)
    violations = axe_violations(driver)
    (out / f"{name}.axe.json").write_text(json.dumps(violations, indent=2))
    serious = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
        for v in violations
        if v["impact"] in SERIOUS
    ]
    assert not serious, "\n".join(serious)


def row_of(driver: WebDriver, ref: str) -> WebElement:
    return driver.find_element(By.ID, f"cmd-{ref}")


def command_refs(driver: WebDriver) -> set[str]:
    return {
        str(row.get_attribute("data-ref"))
        for row in driver.find_elements(By.CSS_SELECTOR, "#commands tr[data-ref]")
    }


def new_command(driver: WebDriver, before: set[str], command_type: str, state: str) -> str:
    """Wait for a command not in ``before`` of ``command_type`` to show ``state``; its ref."""

    def arrived(d: WebDriver) -> str | None:
        for row in d.find_elements(By.CSS_SELECTOR, f'#commands tr[data-type="{command_type}"]'):
            ref = str(row.get_attribute("data-ref"))
            if ref not in before and row.get_attribute("data-state") == state:
                return ref
        return None

    return wait_for(driver, arrived)


def anchor_seq(driver: WebDriver, region: str) -> int:
    return int(
        str(
            driver.find_element(By.CSS_SELECTOR, f"{region} [data-anchor-seq]").get_attribute(
                "data-anchor-seq"
            )
        )
    )


def mark_document(driver: WebDriver) -> None:
    """Tag this document: if the page reloads, the tag is gone."""
    driver.execute_script("window.__sameDocument = true;")


def same_document(driver: WebDriver) -> bool:
    return driver.execute_script("return window.__sameDocument === true;") is True


def open_agent(driver: WebDriver, demo: KeptDemo) -> None:
    driver.get(f"{demo.url}agents/agent-1")
    wait_for(driver, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Agent agent-1")
    wait_for(driver, lambda d: d.execute_script("return document.readyState") == "complete")


def send_form(driver: WebDriver, kind: str, **fields: str) -> None:
    """Fill one of the send forms and press its button (as a person with a mouse would)."""
    form = driver.find_element(By.XPATH, f"//form[.//input[@name='kind' and @value='{kind}']]")
    for name, value in fields.items():
        box = form.find_element(By.NAME, name)
        box.clear()
        box.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


# -- the scenario through the pages -----------------------------------------------------------


def test_the_accessibility_check_finds_what_it_should(browser: WebDriver) -> None:
    """The checker itself, on a page built to fail it: an image without a text alternative,
    a field without a label, grey on grey (so a clean console page means something)."""
    bad = (
        "<!doctype html><html lang=en><head><title>bad</title></head><body><main>"
        "<h1>bad</h1><img src='x.png'><input type=text>"
        "<p style='color:#bbb;background:#ccc'>faint</p></main></body></html>"
    )
    browser.get("data:text/html;charset=utf-8," + quote(bad))
    found = {v["id"]: v["impact"] for v in axe_violations(browser)}
    assert found.get("image-alt") == "critical"
    assert found.get("label") == "critical"
    assert found.get("color-contrast") == "serious"


def test_signing_in_shows_the_fleet_with_the_agent_connected(
    browser: WebDriver, demo: KeptDemo
) -> None:
    browser.get(demo.url)
    assert browser.current_url.endswith("/login")  # nothing without the token
    check_page(browser, "login")
    token = browser.find_element(By.ID, "token")
    token.send_keys("not-the-token" * 4 + Keys.ENTER)
    wait_for(browser, lambda d: d.find_elements(By.ID, "login-error"))
    assert "not this stub's console token" in browser.find_element(By.ID, "login-error").text
    browser.find_element(By.ID, "token").send_keys(demo.token + Keys.ENTER)  # keyboard only
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Fleet")
    row = browser.find_element(By.ID, "agent-agent-1")
    assert row.find_element(By.CSS_SELECTOR, "[data-connection]").text == "connected"
    cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")]
    assert cells[1] == "0.1.0"  # the agent's version, from its hello
    assert "UTC" in cells[2]  # its certificate's expiry
    assert cells[3].endswith("ago")
    assert cells[4].startswith("seq ")
    assert cells[5].endswith(" s")  # a clock offset, in seconds
    demo.notes["first_anchor"] = anchor_seq(browser, "#agent-agent-1")
    check_page(browser, "fleet")


def test_a_scale_sent_from_the_form_reaches_succeeded_without_reloading(
    browser: WebDriver, demo: KeptDemo
) -> None:
    open_agent(browser, demo)
    before, anchor_before = command_refs(browser), anchor_seq(browser, "#summary")
    mark_document(browser)
    # Keyboard only: Tab to the replicas field, type, Enter submits the form.
    browser.find_element(By.TAG_NAME, "body").click()
    for _ in range(40):
        if browser.switch_to.active_element.get_attribute("id") == "scale-replicas":
            break
        browser.switch_to.active_element.send_keys(Keys.TAB)
    field = browser.switch_to.active_element
    assert field.get_attribute("id") == "scale-replicas", "Tab never reached the form"
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("4" + Keys.ENTER)

    ref = new_command(browser, before, "scale", "succeeded")
    assert same_document(browser), "the page reloaded: the result should arrive in place"
    row = row_of(browser, ref)
    assert "replicas=4" in row.text
    steps = [li.text.split()[0] for li in row.find_elements(By.CSS_SELECTOR, "ol.timeline li")]
    assert steps == ["queued", "delivered", "received", "running", "succeeded"]
    receipt = row.find_element(By.CSS_SELECTOR, "[data-receipt]")
    assert receipt.get_attribute("data-receipt") == "verified"
    # The agent anchors its audit head after each command: the page shows it move on.
    wait_for(browser, lambda d: anchor_seq(d, "#summary") > anchor_before)
    assert same_document(browser)
    demo.notes["scaled"] = ref
    check_page(browser, "agent")


def test_a_policy_refusal_shows_its_reason(browser: WebDriver, demo: KeptDemo) -> None:
    open_agent(browser, demo)
    before = command_refs(browser)
    mark_document(browser)
    send_form(browser, "scale", replicas="10")
    ref = new_command(browser, before, "scale", "rejected")
    assert same_document(browser)
    assert "policy_denied" in row_of(browser, ref).text
    refusal = wait_for(browser, lambda d: d.find_element(By.ID, f"refusal-{ref}"))
    assert "policy_denied" in refusal.text
    assert "10 replicas is above the policy maximum of 6" in refusal.text


def test_collected_metrics_show_as_a_chart_per_replica(browser: WebDriver, demo: KeptDemo) -> None:
    open_agent(browser, demo)
    before = command_refs(browser)
    send_form(browser, "collect_metrics")
    new_command(browser, before, "collect_metrics", "succeeded")

    def current_replicas(d: WebDriver) -> dict[str, WebElement] | None:
        figures = d.find_elements(By.CSS_SELECTOR, "#metrics figure.replica")
        current = {
            str(f.get_attribute("id")): f
            for f in figures
            if "not in the latest" not in f.find_element(By.TAG_NAME, "figcaption").text
        }
        return current if len(current) == 4 else None  # scaled to 4 by the test above

    figures = wait_for(browser, current_replicas)
    assert sorted(figures) == ["replica-0", "replica-1", "replica-2", "replica-3"]
    for figure in figures.values():
        chart = figure.find_element(By.CSS_SELECTOR, "svg[role=img]")
        assert chart.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        assert chart.find_elements(By.TAG_NAME, "circle")
        assert "MiB" in figure.find_element(By.CSS_SELECTOR, "table.figures").text
    # Replica 0 was also in the demo's own collection: two points, joined by a line.
    assert len(figures["replica-0"].find_elements(By.TAG_NAME, "circle")) == 2
    assert figures["replica-0"].find_elements(By.TAG_NAME, "polyline")


def test_a_command_that_needs_approval_shows_as_pending_until_approved_on_the_host(
    browser: WebDriver, demo: KeptDemo
) -> None:
    open_agent(browser, demo)
    before = command_refs(browser)
    mark_document(browser)
    send_form(browser, "scale", replicas="5")  # above the policy's approval_above = 4
    ref = new_command(browser, before, "scale", "pending_approval")
    pending = wait_for(browser, lambda d: d.find_element(By.ID, f"pending-{ref}"))
    assert "byoc-agent approve" in pending.text
    section = browser.find_element(By.CSS_SELECTOR, "section[aria-labelledby=h-pending]")
    assert "Approval stays on the customer's host, by design" in section.text
    assert not section.find_elements(By.TAG_NAME, "button")  # nothing here approves
    check_page(browser, "agent-pending")

    jti = pending.find_element(By.TAG_NAME, "code").text.split()[-1]
    approved = subprocess.run(  # the customer's operator, on the agent's host
        [sys.executable, "-m", "agent.cli", "approve", jti, "--config", str(demo.agent_config)],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert approved.returncode == 0, approved.stdout + approved.stderr
    wait_for(browser, lambda d: row_of(d, ref).get_attribute("data-state") == "succeeded")
    assert not browser.find_elements(By.ID, f"pending-{ref}")
    assert same_document(browser)


def test_without_javascript_the_pages_read_and_the_forms_send(
    browser: WebDriver, demo: KeptDemo
) -> None:
    """Scripts off in the same browser: the page is whole, a form posts the ordinary way and
    comes back to the agent's page naming what it queued; reloading shows the result."""
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        open_agent(browser, demo)
        assert browser.find_elements(By.CSS_SELECTOR, "#commands tr[data-ref]")
        assert browser.find_elements(By.CSS_SELECTOR, "#metrics svg[role=img]")
        before = command_refs(browser)
        form = browser.find_element(By.XPATH, "//form[.//input[@value='collect_metrics']]")
        form.find_element(By.ID, "target-workload").click()  # host only
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(browser, lambda d: "?sent=" in d.current_url)
        notice = browser.find_element(By.CSS_SELECTOR, "p.notice").text
        (ref,) = command_refs(browser) - before
        assert ref[:12] in notice

        def finished(d: WebDriver) -> bool:
            d.refresh()  # no script: a person reloads
            return row_of(d, ref).get_attribute("data-state") == "succeeded"

        wait_for(browser, finished)
        assert 'targets=["host"]' in row_of(browser, ref).text
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})


def test_a_command_page_shows_its_timeline_and_receipt(browser: WebDriver, demo: KeptDemo) -> None:
    open_agent(browser, demo)
    ref = demo.notes["scaled"]
    row_of(browser, ref).find_element(By.CSS_SELECTOR, "th a").click()
    wait_for(browser, lambda d: d.current_url.endswith(f"/commands/{ref}"))
    steps = [
        li.find_element(By.CSS_SELECTOR, ".step").text
        for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")
    ]
    assert steps == ["queued", "delivered", "received", "running", "succeeded"]
    summary = browser.find_element(By.ID, "command-summary").text
    assert "verified" in summary
    assert '"replicas": 4' in browser.find_element(By.CSS_SELECTOR, "pre.result").text
    check_page(browser, "command")

    browser.get(demo.url)  # and the fleet's anchor moved on with every command since
    wait_for(browser, lambda d: anchor_seq(d, "#agent-agent-1") > demo.notes["first_anchor"])


def test_the_fleet_follows_an_agent_going_offline_live(browser: WebDriver, demo: KeptDemo) -> None:
    """Last, as it ends the agent: stopped on its host, it turns offline on the open fleet page
    without a reload."""
    browser.get(demo.url)
    row = wait_for(browser, lambda d: d.find_element(By.ID, "agent-agent-1"))
    assert row.find_element(By.CSS_SELECTOR, "[data-connection]").text == "connected"
    mark_document(browser)
    kept = json.loads((demo.root / "kept.json").read_text())
    (agent,) = [psutil.Process(k["pid"]) for k in kept if k["name"] == "byoc-agent"]
    agent.terminate()
    agent.wait(scaled(60))
    wait_for(
        browser,
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#agent-agent-1 [data-connection]").text == "offline"
        ),
    )
    assert same_document(browser)
    check_page(browser, "fleet-offline")
