"""The inspector page in a real headless Chromium (Debian's chromium + chromium-driver).

A real local host process receives signed events of each type, a forged one, a duplicate and
a poison one; the page must show each with the outcome the receiver and the processor
decided, open a delivery (by keyboard) on its parsed signals, and replay the poison message
from the dead-letter tab until it comes back. A screenshot of each view goes to
`test-artifacts/inspector/`; the browser's console must stay free of errors.

Without chromium the test is skipped with the reason, except in CI (CI=true), where that is
a failure: `.ci/run` installs chromium.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.cli.simulate import Shape, build_event
from shared.signature import sign

from .inspector_host import REPO, HostProcess
from .support import TOKEN

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts" / "inspector"
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage",
)
WAIT = 60.0


def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (requirements-dev.txt)")
    if not missing:
        return
    reason = (f"the inspector's browser test needs {', '.join(missing)}; install them with "
              "`apt-get install chromium chromium-driver` (.ci/run does) and `make test`")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # Both paths are given, so Selenium Manager has nothing to look up or download.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot saved at {path}"
    return path


def until(driver: Any, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders while it polls: an element found a moment ago may be replaced.
    return WebDriverWait(driver, WAIT, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, message=what)


def rows(driver: Any, table: str) -> list[dict[str, str]]:
    """The rows of a table as one snapshot (data attributes and text): the page re-renders
    its lists while it polls, so elements found one by one could go stale in between."""
    found: list[dict[str, str]] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(r => Object.assign({text: r.innerText}, r.dataset))",
        f"#{table} tbody tr",
    )
    return found


def text_of(driver: Any, element_id: str) -> str:
    text: str = driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : ''",
        element_id)
    return text


def cells(driver: Any, table_id: str) -> list[list[str]]:
    found: list[list[str]] = driver.execute_script(
        "const t = document.getElementById(arguments[0]); return t ? [...t.tBodies[0].rows]"
        ".map(r => [...r.cells].map(c => c.innerText)) : []", table_id)
    return found


def row(driver: Any, table: str, event_id: str) -> dict[str, str] | None:
    return next((r for r in rows(driver, table) if r["eventId"] == event_id), None)


def click_row(driver: Any, table: str, event_id: str) -> None:
    """Click the row once it is there; the list may re-render between find and click."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d: Any) -> bool:
        try:
            found = d.find_elements(
                By.CSS_SELECTOR, f'#{table} tbody tr[data-event-id="{event_id}"]')
            if not found:
                return False
            found[0].click()
            return True
        except StaleElementReferenceException:
            return False

    until(driver, clicked, f"a clickable row for {event_id} in #{table}")


def event_id(body: bytes) -> str:
    value: str = json.loads(body)["eventId"]
    return value


def poison_event() -> bytes:
    """Signed and object-shaped, so accepted; `data` is not an object, so InvalidPayload."""
    return json.dumps({
        "eventId": f"poison-{uuid.uuid4()}", "eventType": "VEHICLE_STATE",
        "vehicleId": "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2", "data": "not an object",
        "meta": {"version": "4.0", "mode": "TEST"},
    }).encode()


class TestInspectorInChromium:
    def test_deliveries_detail_and_dead_letter_replay_as_a_developer_sees_them(
        self, tmp_path: Path, browser: Any
    ) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        with HostProcess(tmp_path) as host:
            browser.get(host.url)
            until(browser, lambda d: d.find_element(By.ID, "deliveries-empty").is_displayed(),
                  "the empty deliveries list")

            verify, state, error = (build_event(k) for k in ("verify", "state", "error"))
            forged, poison = build_event("state"), poison_event()
            assert host.post(verify).status == 200
            assert host.post(state).status == 200
            assert host.post(error, path="/api/webhooks/smartcar/errors").status == 200
            assert host.post(forged, signature=sign("not-the-token", forged)).status == 401
            assert host.post(poison).status == 200
            assert host.post(state).status == 200  # Smartcar retried: a duplicate

            expected = {  # eventId -> (receive outcome, processing outcome)
                event_id(verify): ("verify_answered", ""),
                event_id(error): ("accepted", "unhandled"),
                event_id(forged): ("signature_rejected", ""),
                event_id(poison): ("accepted", "dead_lettered"),
            }

            def shown(eid: str) -> tuple[str, str] | None:
                r = row(browser, "deliveries", eid)
                return None if r is None else (r["outcome"], r["processing"])

            for eid, outcomes in expected.items():
                until(browser, lambda d, eid=eid, o=outcomes: shown(eid) == o,
                      f"row {eid} with outcomes {outcomes}, shown {shown(eid)}")
            until(browser, lambda d: sorted(
                (r["outcome"], r["processing"]) for r in rows(d, "deliveries")
                if r["eventId"] == event_id(state)) == [("accepted", "handled"), ("duplicate", "")],
                "the state event accepted and handled once, then its duplicate")

            listed = rows(browser, "deliveries")
            ids = [int(r["id"]) for r in listed]
            assert ids == sorted(ids, reverse=True) and len(ids) == 6, "newest first"
            forged_row = row(browser, "deliveries", event_id(forged))
            assert forged_row is not None and "invalid signature" in forged_row["text"], "why"
            poison_row = row(browser, "deliveries", event_id(poison))
            assert poison_row is not None and "InvalidPayload" in poison_row["text"]
            until(browser, lambda d: text_of(d, "stat-deadLettered") == "1",
                  "one dead letter in the header")
            screenshot(browser, "deliveries")

            # Keyboard: focus the accepted state row, Enter opens it.
            accepted = next(r for r in listed if r["eventId"] == event_id(state)
                            and r["outcome"] == "accepted")
            browser.execute_script(
                "document.querySelector(arguments[0]).focus()",
                f'#deliveries tbody tr[data-id="{accepted["id"]}"]')
            browser.switch_to.active_element.send_keys(Keys.ENTER)
            signals = until(browser, lambda d: cells(d, "signals"),
                            "the signals table of the state event")
            assert ["tractionbattery-stateofcharge", "78", "percent"] == signals[0][:3]
            assert signals[0][3].startswith("20"), "oemUpdatedAt as an ISO time"
            assert "tractionbattery-stateofcharge" in text_of(browser, "body")
            assert len(text_of(browser, "trace-id")) == 32
            signature = sign("amt", state)
            detail = text_of(browser, "delivery-detail")
            assert signature[:8] in detail and signature not in browser.page_source
            screenshot(browser, "delivery-detail")
            browser.switch_to.active_element.send_keys(Keys.ESCAPE)
            until(browser, lambda d: not d.find_element(By.ID, "delivery-detail").is_displayed(),
                  "Escape closes the detail")

            # Dead-letter tab: the poison message, its reason, replay; it comes back.
            browser.find_element(By.ID, "tab-dlq").click()
            letter = until(browser, lambda d: row(d, "dead-letters", event_id(poison)),
                           "the poison message in the dead-letter list")
            first_seq = letter["seq"]
            assert "InvalidPayload" in letter["text"]
            screenshot(browser, "dead-letters")
            click_row(browser, "dead-letters", event_id(poison))
            until(browser, lambda d: d.find_elements(By.ID, "replay"), "the dead-letter detail")
            pane = text_of(browser, "dlq-detail")
            assert "data must be an object, got str" in pane and "Delivery count" in pane
            screenshot(browser, "dead-letter-detail")
            until(browser, lambda d: d.find_element(By.ID, "replay").click() or True, "replay")
            until(browser, lambda d: "Replayed dead letter" in text_of(d, "status"),
                  "the replay confirmed")

            def came_back(d: Any) -> Any:
                r = row(d, "dead-letters", event_id(poison))
                return r if r is not None and r["seq"] != first_seq else None

            until(browser, came_back, "the replayed poison message dead-lettered again")
            browser.find_element(By.ID, "tab-deliveries").click()
            until(browser, lambda d: "\u00d72" in (row(d, "deliveries", event_id(poison))
                                                    or {}).get("text", ""),
                  "the poison delivery processed twice (x2)")

            # Purge asks first: Cancel keeps it, confirming removes it.
            browser.find_element(By.ID, "tab-dlq").click()
            until(browser, came_back, "the poison message listed again")
            click_row(browser, "dead-letters", event_id(poison))
            until(browser, lambda d: d.find_element(By.ID, "purge").is_displayed(), "purge button")
            until(browser, lambda d: d.find_element(By.ID, "purge").click() or True, "purge")
            dialog = browser.find_element(By.ID, "confirm-purge")
            until(browser, lambda d: dialog.is_displayed(), "the purge confirmation")
            screenshot(browser, "purge-confirmation")
            browser.find_element(By.ID, "confirm-cancel").click()
            assert row(browser, "dead-letters", event_id(poison)) is not None
            until(browser, lambda d: d.find_element(By.ID, "purge").click() or True, "purge")
            until(browser, lambda d: dialog.is_displayed(), "the purge confirmation")
            browser.find_element(By.ID, "confirm-ok").click()
            until(browser, lambda d: row(d, "dead-letters", event_id(poison)) is None,
                  "the purged dead letter gone")
            until(browser, lambda d: text_of(d, "stat-deadLettered") == "0",
                  "no dead letter in the header")

            # A narrow window: everything fits its width.
            browser.find_element(By.ID, "tab-deliveries").click()
            browser.set_window_size(420, 800)
            until(browser, lambda d: d.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"),
                "no horizontal scrolling at 420 px")
            screenshot(browser, "narrow")

            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors


class TestVehiclesInChromium:
    def test_the_vehicles_tab_and_what_each_delivery_did_to_the_state(
        self, tmp_path: Path, browser: Any
    ) -> None:
        """A newer reading, then an older one of the same signals (Smartcar delivers unordered),
        an error, and another vehicle: the Vehicles tab lists both vehicles with their open
        errors and shows the newer value; each delivery's detail says what it changed and what
        it left alone as stale."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        from .test_inspector_vehicles import VEHICLE_HOST
        from .vehicle_fakes import VEHICLE, error_body, state_body

        other = "0b9ab6c1-2b1a-4b85-8f53-3d4c2f1e0a99"
        oem_ms = 1_764_000_000_000
        newer = state_body(oem_ms=oem_ms + 60_000, soc=80)
        older = state_body(oem_ms=oem_ms, soc=50)
        with HostProcess(tmp_path, python=VEHICLE_HOST) as host:
            browser.get(host.url)
            until(browser, lambda d: d.find_element(By.ID, "deliveries-empty").is_displayed(),
                  "the empty deliveries list")
            for body, path in ((newer, "/api/webhooks/smartcar"),
                               (older, "/api/webhooks/smartcar"),
                               (error_body(), "/api/webhooks/smartcar/errors"),
                               (state_body(other, oem_ms=oem_ms), "/api/webhooks/smartcar")):
                assert host.post(body, path=path).status == 200
            for body in (newer, older):  # handled, or unhandled when no handler wants it
                until(browser, lambda d, b=body: (row(d, "deliveries", event_id(b)) or {})
                      .get("processing") in ("handled", "unhandled"), "the state events processed")

            # The older reading's detail: nothing changed, both dated signals stale.
            click_row(browser, "deliveries", event_id(older))
            state_rows = until(browser, lambda d: cells(d, "delivery-state"),
                               "the vehicle state section of the older delivery")
            assert state_rows[0] == ["changed", "none"]
            assert state_rows[1] == ["left alone as stale",
                                     "tractionbattery-stateofcharge, charge-ischarging"]
            assert state_rows[2] == ["fetched again, unchanged", "none"]
            assert state_rows[3] == ["skipped", "location-isathome (no oemUpdatedAt)"]
            screenshot(browser, "delivery-vehicle-state")
            click_row(browser, "deliveries", event_id(newer))
            until(browser, lambda d: (cells(d, "delivery-state") or [[]])[0] == [
                "changed", "tractionbattery-stateofcharge, charge-ischarging"],
                "the newer delivery changed both dated signals")

            # The Vehicles tab, reached from the dead-letter tab by keyboard.
            browser.find_element(By.ID, "tab-dlq").click()
            browser.find_element(By.ID, "tab-dlq").send_keys(Keys.ARROW_RIGHT)
            until(browser, lambda d: d.find_element(By.ID, "view-vehicles").is_displayed(),
                  "ArrowRight from Dead letters opens Vehicles")
            assert browser.switch_to.active_element.get_attribute("id") == "tab-vehicles"

            def listed(d: Any) -> list[dict[str, str]] | None:
                found: list[dict[str, str]] = d.execute_script(
                    "return [...document.querySelectorAll('#vehicles tbody tr')]"
                    ".map(r => Object.assign({text: r.innerText}, r.dataset))")
                return found if [r["openErrors"] for r in found] == ["0", "1"] else None

            vehicles = until(browser, listed, "two vehicles, the one with an error second")
            assert [r["vehicleId"] for r in vehicles] == [other, VEHICLE]
            assert text_of(browser, "count-vehicles") == "(2)"
            screenshot(browser, "vehicles")

            browser.execute_script(
                "document.querySelector(arguments[0]).focus()",
                f'#vehicles tbody tr[data-vehicle-id="{VEHICLE}"]')
            browser.switch_to.active_element.send_keys(Keys.ENTER)
            signals = until(browser, lambda d: cells(d, "vehicle-signals"),
                            "the vehicle's signals")
            soc = next(r for r in signals if r[0] == "tractionbattery-stateofcharge")
            assert soc[1:3] == ["80", "percent"], "the newer reading wins"
            assert soc[5] == event_id(newer)
            errors = cells(browser, "vehicle-errors")
            assert [r[:3] for r in errors] == [["COMPATIBILITY", "VEHICLE_NOT_CAPABLE", "1"]]
            screenshot(browser, "vehicle-detail")
            browser.switch_to.active_element.send_keys(Keys.ESCAPE)
            until(browser, lambda d: not d.find_element(By.ID, "vehicle-detail").is_displayed(),
                  "Escape closes the vehicle")

            browser.set_window_size(420, 800)
            until(browser, lambda d: d.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"),
                "no horizontal scrolling at 420 px")
            errors_logged = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors_logged == [], errors_logged


    def test_the_open_vehicle_follows_a_change_that_leaves_the_list_as_it_was(
        self, tmp_path: Path, browser: Any
    ) -> None:
        """The real host and store: a failed signal (no oemUpdatedAt) fetched again with
        another error is a change that moves neither the vehicle's updatedAt nor its counts,
        so the list reads the same; the open vehicle's detail shows it all the same."""
        from selenium.webdriver.common.by import By

        from .vehicle_fakes import VEHICLE, state_body

        oem_ms = 1_764_000_000_000
        with HostProcess(tmp_path) as host:
            assert host.post(state_body(oem_ms=oem_ms, soc=80)).status == 200
            browser.get(host.url)
            browser.find_element(By.ID, "tab-vehicles").click()
            until(browser, lambda d: d.find_elements(
                By.CSS_SELECTOR, f'#vehicles tbody tr[data-vehicle-id="{VEHICLE}"]'),
                "the vehicle listed")
            listed = browser.find_element(By.CSS_SELECTOR, "#vehicles tbody").text
            browser.find_element(
                By.CSS_SELECTOR, f'#vehicles tbody tr[data-vehicle-id="{VEHICLE}"]').click()

            def at_home(d: Any) -> str | None:
                found = [r for r in cells(d, "vehicle-signals") or []
                         if r[0] == "location-isathome"]
                return found[0][4] if found else None

            until(browser, lambda d: at_home(d) == "error COMPATIBILITY VEHICLE_NOT_CAPABLE",
                  "the failed signal as first stored")
            changed = json.loads(state_body(oem_ms=oem_ms, soc=80))
            for item in changed["data"]["signals"]:
                if item["code"] == "location-isathome":  # fetched later: it ranks higher
                    item["status"]["error"]["code"] = "VEHICLE_ASLEEP"
                    item["meta"] = {"retrievedAt": oem_ms + 120_000}
            assert host.post(json.dumps(changed).encode()).status == 200
            until(browser, lambda d: at_home(d) == "error COMPATIBILITY VEHICLE_ASLEEP",
                  "the open vehicle shows the failed signal's new error")
            assert browser.find_element(By.CSS_SELECTOR, "#vehicles tbody").text == listed


# The app's own handlers, plus one that takes 0.3 s and then fails for one vehicle: the page
# must show its exception and its own run time, apart from the 1 s backoff between attempts.
FAILING_VEHICLE = "car-that-fails"
FAILING_HOST = textwrap.dedent(
    f"""
    import runpy, sys, time
    from shared.handlers import registry

    @registry.on_signal("Charge.IsCharging")
    def refuse_while_charging(event, signal, context):
        if event.vehicle_id == "{FAILING_VEHICLE}":
            time.sleep(0.3)
            raise ValueError(f"charging state rejected for {{event.vehicle_id}}")

    sys.argv = ["shared.local"]
    runpy.run_module("shared.local", run_name="__main__", alter_sys=True)
    """
)
BACKOFF_MS = 1000

# Every word of every visible table cell, checked for being laid out on more than one line.
BROKEN_TOKENS = """
const broken = [];
for (const td of document.querySelectorAll("td")) {
  if (!td.getClientRects().length) continue;
  const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const m of node.data.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].filter((r) => r.width > 0)
        .map((r) => Math.round(r.top)));
      if (tops.size > 1) broken.push(m[0]);
    }
  }
}
return broken;
"""


def milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+) ms", text.strip())
    assert match is not None, f"not a duration: {text!r}"
    return float(match.group(1))


def select(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    until(driver, lambda d: value in [o.get_attribute("value") for o in
                                      Select(d.find_element("id", element_id)).options],
          f"the option {value!r} in #{element_id}")
    Select(driver.find_element("id", element_id)).select_by_value(value)


def type_into(driver: Any, element_id: str, text: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    if text:
        field.send_keys(text)
    else:  # clear() fires no input event
        driver.execute_script(
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))", field)


def shown_event_ids(driver: Any) -> list[str]:
    return [r["eventId"] for r in rows(driver, "deliveries")]


class TestInspectorAdditionsInChromium:
    def test_errors_handler_time_copy_as_curl_resend_filter_and_unbroken_words(
        self, tmp_path: Path, browser: Any
    ) -> None:
        from selenium.webdriver.common.by import By

        host = HostProcess(tmp_path, python=[sys.executable, "-c", FAILING_HOST], extra_env={
            "MAX_DELIVERY_COUNT": "2", "RETRY_BACKOFF_BASE_SECONDS": str(BACKOFF_MS / 1000),
            "RETRY_BACKOFF_MAX_SECONDS": str(BACKOFF_MS / 1000)})
        with host:
            browser.get(host.url)
            failing = build_event("state", shape=Shape(vehicle_id=FAILING_VEHICLE))
            state, error, forged = build_event("state"), build_event("error"), build_event("state")
            assert host.post(failing).status == 200
            assert host.post(state).status == 200
            assert host.post(error, path="/api/webhooks/smartcar/errors").status == 200
            assert host.post(forged, signature=sign("not-the-token", forged)).status == 401
            until(browser, lambda d: (row(d, "deliveries", event_id(failing)) or {}).get(
                "processing") == "dead_lettered", "the failing event dead-lettered")
            until(browser, lambda d: (row(d, "deliveries", event_id(state)) or {}).get(
                "processing") == "handled", "the state event handled")

            # A failed attempt: its exception type and message, and the handler's own time.
            click_row(browser, "deliveries", event_id(failing))
            attempts = until(browser, lambda d: (lambda a: a if len(a) == 2 else None)(
                cells(d, "attempts")), "two attempts of the failing event")
            for attempt in attempts:
                assert f"ValueError: charging state rejected for {FAILING_VEHICLE}" in attempt[3]
                handler_ms, function_ms = milliseconds(attempt[4]), milliseconds(attempt[5])
                assert 250 <= handler_ms < BACKOFF_MS, f"the handler ran ~300 ms: {attempt}"
                assert handler_ms <= function_ms
            listed = row(browser, "deliveries", event_id(failing))
            assert listed is not None and re.search(r"\b\d{3}(\.\d)? ms\b", listed["text"])
            assert "ValueError" in listed["text"]
            screenshot(browser, "failed-attempts")

            # No replay of what did not verify.
            click_row(browser, "deliveries", event_id(forged))
            until(browser, lambda d: "signature_rejected" in text_of(d, "delivery-detail"),
                  "the forged delivery's detail")
            assert browser.find_elements(By.ID, "copy-curl") == []
            assert browser.find_elements(By.ID, "resend") == []

            # Copy as curl: the original bytes and signature, so the copy still verifies.
            click_row(browser, "deliveries", event_id(state))
            until(browser, lambda d: d.find_elements(By.ID, "copy-curl"), "Copy as curl")
            browser.find_element(By.ID, "copy-curl").click()
            command = until(browser, lambda d: text_of(d, "curl-command"), "the curl command")
            assert sign(TOKEN, state) in command
            sent = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                  timeout=30, check=True)
            assert json.loads(sent.stdout) == {"status": "duplicate",
                                               "eventId": event_id(state)}
            screenshot(browser, "copy-as-curl")

            # Resend from the page: the same bytes and signature, answered duplicate.
            browser.find_element(By.ID, "resend").click()
            until(browser, lambda d: "HTTP 200" in text_of(d, "status")
                  and '"duplicate"' in text_of(d, "status"), "the resend's answer")
            until(browser, lambda d: sorted(r["outcome"] for r in rows(d, "deliveries")
                                            if r["eventId"] == event_id(state))
                  == ["accepted", "duplicate", "duplicate"], "the curl copy and the resend")

            # The filter: by outcome, eventType, vehicleId and any text.
            select(browser, "filter-outcome", "dead_lettered")
            until(browser, lambda d: shown_event_ids(d) == [event_id(failing)],
                  "only the dead-lettered delivery")
            select(browser, "filter-outcome", "")
            select(browser, "filter-eventType", "VEHICLE_ERROR")
            until(browser, lambda d: shown_event_ids(d) == [event_id(error)],
                  "only the VEHICLE_ERROR delivery")
            assert "(1 of 6)" in text_of(browser, "count-deliveries")
            select(browser, "filter-eventType", "")
            type_into(browser, "filter-vehicleId", "that-fails")
            until(browser, lambda d: shown_event_ids(d) == [event_id(failing)],
                  "only the failing vehicle")
            type_into(browser, "filter-vehicleId", "")
            type_into(browser, "filter-text", "charging state REJECTED")
            until(browser, lambda d: shown_event_ids(d) == [event_id(failing)],
                  "the error message found by text")
            type_into(browser, "filter-text", event_id(forged)[:13])
            until(browser, lambda d: shown_event_ids(d) == [event_id(forged)],
                  "the forged delivery found by its eventId")
            type_into(browser, "filter-text", "no such delivery")
            until(browser, lambda d: d.find_element(By.ID, "deliveries-filtered").is_displayed(),
                  "says nothing matches")
            type_into(browser, "filter-text", "")
            until(browser, lambda d: len(rows(d, "deliveries")) == 6, "all six again")
            screenshot(browser, "filtered")

            # No word broken mid-token in any table cell, wide, beside a detail, and narrow.
            click_row(browser, "deliveries", event_id(failing))
            until(browser, lambda d: cells(d, "attempts"), "the failing event's detail")
            for width in (1280, 900, 700, 420):
                browser.set_window_size(width, 800)
                assert browser.execute_script(BROKEN_TOKENS) == [], f"at {width} px"
            screenshot(browser, "narrow-detail")

            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors


def test_a_missing_browser_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "exists", lambda self: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test"):
        require_chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        require_chromium()

