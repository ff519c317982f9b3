"""The inspector page's own behaviour in a real headless Chromium against a real local host.

What a user saw go wrong: a vehicle listed as `.` or `..` that would not open (the previous
vehicle's detail stayed), an error in the status line that stayed after the host answered
again, a delivery's detail frozen while another tab's list failed, a slow answer drawn under
another row, a list cut at the server's limit without saying so, a turned-off store reported
as a host that does not answer, and markup in a stranger's body. A slow or failing network
is what the page's own `fetch` is wrapped for; everything else is the real host's.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from shared.cli.simulate import Shape, build_event

from .inspector_host import HostProcess
from .test_inspector_browser import (  # noqa: F401 - browser is a fixture
    FAILING_HOST,
    FAILING_VEHICLE,
    browser,
    cells,
    click_row,
    event_id,
    poison_event,
    row,
    rows,
    text_of,
    until,
)
from .vehicle_fakes import error_body, state_body

OEM_MS = 1_764_000_000_000


def title(driver: Any, pane: str) -> str | None:
    found: str | None = driver.execute_script(
        "const h = document.querySelector(`#${arguments[0]} h2`); return h ? h.innerText : null",
        pane)
    return found


def click_where(driver: Any, table: str, key: str, value: str) -> None:
    """Click the row of `table` whose `data-*` `key` is `value`, however it is spelled."""
    until(driver, lambda d: d.execute_script(
        "const r = [...document.querySelectorAll(`#${arguments[0]} tbody tr`)]"
        ".find((r) => r.dataset[arguments[1]] === arguments[2]);"
        "if (r) r.click(); return Boolean(r)", table, key, value),
        f"the row of {key} {value!r} in #{table}")


def click_vehicle(driver: Any, vehicle_id: str) -> None:
    click_where(driver, "vehicles", "vehicleId", vehicle_id)


def status(driver: Any) -> str:
    return text_of(driver, "status")


def for_a_while(driver: Any, seconds: float, probe: Any) -> list[Any]:
    """What `probe` reads every 0.1 s for `seconds` (several polls of the page)."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(probe(driver))
        time.sleep(0.1)
    return seen


# Makes the page's requests whose URL starts with one of `window.__fail` fail as a dropped
# connection does, and delays those in `window.__slow` (prefix -> milliseconds).
NETWORK = """
if (!window.__wrapped) {
  window.__wrapped = true;
  window.__fail = [];
  window.__slow = {};
  const real = window.fetch.bind(window);
  window.fetch = (url, options) => {
    if (window.__fail.some((p) => String(url).startsWith(p))) {
      return Promise.reject(new TypeError("Failed to fetch"));
    }
    const delay = Object.entries(window.__slow).find(([p]) => String(url) === p);
    if (delay) return new Promise((ok) => setTimeout(() => ok(real(url, options)), delay[1]));
    return real(url, options);
  };
}
"""


def network(driver: Any, *, fail: list[str] | None = None,
            slow: dict[str, int] | None = None) -> None:
    driver.execute_script(NETWORK)
    driver.execute_script("window.__fail = arguments[0]; window.__slow = arguments[1];",
                          fail or [], slow or {})


class TestVehicles:
    def test_vehicles_named_dot_and_dot_dot_open_and_a_failed_open_clears_the_detail(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        from selenium.webdriver.common.by import By

        with HostProcess(tmp_path) as host:
            for vehicle in ("car-a", ".", ".."):
                assert host.post(state_body(vehicle, oem_ms=OEM_MS)).status == 200
            browser.get(host.url)
            browser.find_element(By.ID, "tab-vehicles").click()
            until(browser, lambda d: len(rows(d, "vehicles")) == 3, "three vehicles listed")

            for vehicle in ("car-a", ".", "..", "car-a", ".."):
                click_vehicle(browser, vehicle)
                until(browser, lambda d, v=vehicle: title(d, "vehicle-detail") == f"Vehicle {v}",
                      f"the detail of vehicle {vehicle!r}, shown {title(browser, 'vehicle-detail')}")
                assert cells(browser, "vehicle-signals"), vehicle
            assert "Cannot show" not in status(browser)

            # The host goes away: opening another vehicle fails, and the detail of the one
            # before does not stay under the row just clicked.
            host.__exit__(None, None, None)
            click_vehicle(browser, ".")
            until(browser, lambda d: "Cannot show vehicle ." in status(d), "the failure said")
            assert not browser.find_element(By.ID, "vehicle-detail").is_displayed()
            assert title(browser, "vehicle-detail") is None
            assert browser.execute_script(
                "return document.querySelectorAll('#vehicles tr[aria-current]').length") == 0

    def test_with_the_store_off_the_tab_says_so_and_the_host_is_not_reported_down(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        from selenium.webdriver.common.by import By

        with HostProcess(tmp_path, extra_env={"VEHICLE_STATE_STORE": "off"}) as host:
            browser.get(host.url)
            browser.find_element(By.ID, "tab-vehicles").click()
            until(browser, lambda d: d.find_element(By.ID, "vehicles-unavailable").is_displayed(),
                  "the tab says why it has no vehicles")
            assert "VEHICLE_STATE_STORE=off" in text_of(browser, "vehicles-unavailable")
            statuses = for_a_while(browser, 3.0, status)
            assert not any("does not answer" in s or "503" in s for s in statuses), statuses
            assert not browser.find_element(By.ID, "vehicles-empty").is_displayed()


LIMITED_HOST = textwrap.dedent(
    """
    import runpy, sys
    import shared.local.inspector_server as server
    server.VEHICLES_LIMIT = 2
    server.DLQ_LIMIT = 1
    sys.argv = ["shared.local"]
    runpy.run_module("shared.local", run_name="__main__", alter_sys=True)
    """
)


class TestLimits:
    def test_a_list_cut_at_the_server_s_limit_says_so(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        """The real host with its limits lowered (500 in use): three vehicles, two listed;
        two dead letters, one listed; and each tab says the list is cut."""
        from selenium.webdriver.common.by import By

        with HostProcess(tmp_path, python=[sys.executable, "-c", LIMITED_HOST]) as host:
            for vehicle in ("car-a", "car-b", "car-c"):
                assert host.post(state_body(vehicle, oem_ms=OEM_MS)).status == 200
            for _ in range(2):
                assert host.post(poison_event()).status == 200

            def listed(kind: str) -> dict[str, Any] | None:
                doc: dict[str, Any] = json.loads(host.inspector(f"api/{kind}").body)
                return doc if doc["more"] else None

            assert len(host.wait_for(lambda: listed("vehicles"))["vehicles"]) == 2
            assert len(host.wait_for(lambda: listed("dlq"))["deadLetters"]) == 1

            browser.get(host.url)
            browser.find_element(By.ID, "tab-vehicles").click()
            until(browser, lambda d: d.find_element(By.ID, "vehicles-more").is_displayed(),
                  "the Vehicles tab says its list is cut")
            assert "first 2 vehicles" in text_of(browser, "vehicles-more")
            assert text_of(browser, "count-vehicles") == "(first 2)"
            browser.find_element(By.ID, "tab-dlq").click()
            until(browser, lambda d: d.find_element(By.ID, "dlq-more").is_displayed(),
                  "the Dead letters tab says its list is cut")
            assert "first 1 dead letters" in text_of(browser, "dlq-more")


class TestStatusLine:
    def test_a_poll_error_clears_when_the_host_answers_again_an_action_s_message_stays(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        from selenium.webdriver.common.by import By

        with HostProcess(tmp_path) as host:
            state = build_event("state")
            assert host.post(state).status == 200
            browser.get(host.url)
            until(browser, lambda d: row(d, "deliveries", event_id(state)), "the delivery")
            network(browser, fail=["api/deliveries?"])
            until(browser, lambda d: "does not answer" in status(d), "the poll's failure")
            network(browser)
            until(browser, lambda d: status(d) == "", "the error cleared by a good poll")

            click_row(browser, "deliveries", event_id(state))
            until(browser, lambda d: d.find_elements(By.ID, "copy-curl"), "Copy as curl")
            browser.find_element(By.ID, "copy-curl").click()
            until(browser, lambda d: "curl command" in status(d), "the action's message")
            said = status(browser)
            assert set(for_a_while(browser, 3.0, status)) == {said}, "polls keep it"


class TestDetailRefresh:
    def test_the_open_delivery_follows_its_retry_while_another_tab_fails(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        """A failing handler, retried after 3 s: its delivery is opened after the first
        attempt; the Dead letters tab is shown while its list cannot be read. Back on the
        Deliveries tab, the detail shows the second attempt, and its Vehicle state section
        what the first attempt (which applied the event) did, the second named as applied
        again rather than shown as all stale."""
        from selenium.webdriver.common.by import By

        host = HostProcess(tmp_path, python=[sys.executable, "-c", FAILING_HOST], extra_env={
            "MAX_DELIVERY_COUNT": "2", "RETRY_BACKOFF_BASE_SECONDS": "3",
            "RETRY_BACKOFF_MAX_SECONDS": "3"})
        with host:
            browser.get(host.url)
            failing = build_event("state", shape=Shape(vehicle_id=FAILING_VEHICLE))
            assert host.post(failing).status == 200
            until(browser, lambda d: (row(d, "deliveries", event_id(failing)) or {}).get(
                "processing") == "retried", "the first attempt failed")
            click_row(browser, "deliveries", event_id(failing))
            until(browser, lambda d: len(cells(d, "attempts")) == 1, "one attempt shown")

            network(browser, fail=["api/dlq"])
            browser.find_element(By.ID, "tab-dlq").click()
            until(browser, lambda d: status(d) != "", "the tab's failure said")

            def attempts() -> int:
                (summary,) = [d for d in host.deliveries() if d["eventId"] == event_id(failing)]
                return int(summary["attempts"])

            host.wait_for(lambda: attempts() == 2)
            time.sleep(2.5)  # a few polls while the Dead letters tab fails
            browser.find_element(By.ID, "tab-deliveries").click()
            until(browser, lambda d: len(cells(d, "attempts")) == 2, "both attempts shown")
            network(browser)

            state_rows: dict[str, str] = {r[0]: r[1] for r in cells(browser, "delivery-state")}
            assert state_rows["changed"].startswith(
                "tractionbattery-stateofcharge, charge-ischarging")
            assert state_rows["left alone as stale"] == "none"
            assert state_rows["applied again"].startswith(
                "by attempt 2: already applied by an earlier attempt")
            caption = browser.execute_script(
                "return document.querySelector('#delivery-state caption').innerText")
            assert "first processing that applied it (attempt 1)" in caption


class TestSlowAnswers:
    def test_a_slow_answer_is_not_drawn_under_the_row_opened_after_it(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        from selenium.webdriver.common.by import By

        with HostProcess(tmp_path) as host:
            first, second = build_event("state"), build_event("state")
            assert host.post(first).status == 200
            assert host.post(second).status == 200
            for vehicle in ("car-a", "car-b"):
                assert host.post(state_body(vehicle, oem_ms=OEM_MS)).status == 200
            browser.get(host.url)
            until(browser, lambda d: row(d, "deliveries", event_id(second)), "the deliveries")
            slow_id = row(browser, "deliveries", event_id(first))["id"]  # type: ignore[index]
            network(browser, slow={f"api/deliveries/{slow_id}": 1500,
                                   "api/vehicle?id=car-a": 1500, "api/vehicles/car-a": 1500})
            click_row(browser, "deliveries", event_id(first))
            click_row(browser, "deliveries", event_id(second))
            second_id = row(browser, "deliveries", event_id(second))["id"]  # type: ignore[index]
            until(browser, lambda d: title(d, "delivery-detail") == f"Delivery #{second_id} · "
                  "VEHICLE_STATE", "the second delivery's detail")
            time.sleep(2.5)  # the first one's answer has come
            assert title(browser, "delivery-detail") == f"Delivery #{second_id} · VEHICLE_STATE"
            assert browser.execute_script(
                "return document.querySelector('#deliveries tr[aria-current]').dataset.id"
            ) == second_id

            browser.find_element(By.ID, "tab-vehicles").click()
            until(browser, lambda d: {"car-a", "car-b"} <= {r["vehicleId"] for r in rows(
                d, "vehicles")}, "both vehicles listed")
            click_vehicle(browser, "car-a")
            click_vehicle(browser, "car-b")
            until(browser, lambda d: title(d, "vehicle-detail") == "Vehicle car-b", "car-b")
            time.sleep(2.5)
            assert title(browser, "vehicle-detail") == "Vehicle car-b"


MARKUP = '<img src=x onerror="window.__xss=1">'


def hostile_state() -> bytes:
    event = json.loads(build_event("state"))
    event["eventId"] = MARKUP + event["eventId"]
    event["vehicleId"] = MARKUP
    signals = event["data"]["signals"]
    signals[0]["code"] = MARKUP
    signals[0]["body"]["unit"] = MARKUP
    signals[1]["body"]["value"] = MARKUP
    return json.dumps(event).encode()


class TestStrangersText:
    def test_markup_in_a_delivery_stays_text_and_every_element_id_is_unique(
        self, tmp_path: Path, browser: Any  # noqa: F811
    ) -> None:
        """Markup in vehicleId, eventId, a signal's code, unit and value, and an error's
        description: shown as written, never run. With a delivery, a dead letter and a
        vehicle open at once, no two elements share an id."""
        from selenium.webdriver.common.by import By

        state = hostile_state()
        error = error_body(MARKUP, description=MARKUP)
        poison = poison_event()
        with HostProcess(tmp_path) as host:
            assert host.post(state).status == 200
            assert host.post(error, path="/api/webhooks/smartcar/errors").status == 200
            assert host.post(poison).status == 200
            browser.get(host.url)
            until(browser, lambda d: len(rows(d, "deliveries")) == 3, "three deliveries")
            listed = row(browser, "deliveries", event_id(state))
            assert listed is not None and MARKUP in listed["text"]

            click_where(browser, "deliveries", "eventId", event_id(state))
            signals = until(browser, lambda d: cells(d, "signals"), "the hostile signals")
            assert signals[0][0] == MARKUP and signals[0][2] == MARKUP
            assert signals[1][1] == MARKUP
            detail = text_of(browser, "delivery-detail")
            assert event_id(state) in detail and f"vehicleId\n{MARKUP}" in detail

            click_where(browser, "deliveries", "eventId", event_id(error))
            until(browser, lambda d: MARKUP in d.execute_script(
                "return [...document.querySelectorAll('#delivery-detail td')]"
                ".map((c) => c.innerText)"), "the error's description, as written")

            browser.find_element(By.ID, "tab-dlq").click()
            click_row(browser, "dead-letters", event_id(poison))
            until(browser, lambda d: d.find_elements(By.ID, "replay"), "the dead letter")

            browser.find_element(By.ID, "tab-vehicles").click()
            click_vehicle(browser, MARKUP)
            until(browser, lambda d: title(d, "vehicle-detail") == f"Vehicle {MARKUP}",
                  "the vehicle whose id is markup")
            vehicle = cells(browser, "vehicle-errors")
            assert vehicle and vehicle[0][5] == MARKUP
            assert MARKUP in [r[0] for r in cells(browser, "vehicle-signals")]

            assert browser.execute_script("return window.__xss") is None
            assert browser.execute_script("return document.querySelectorAll('img').length") == 0
            duplicates = browser.execute_script(
                "const ids = [...document.querySelectorAll('[id]')].map((e) => e.id);"
                "return ids.filter((id, i) => ids.indexOf(id) !== i)")
            assert duplicates == []
            for pane in ("delivery-detail", "dlq-detail", "vehicle-detail"):
                assert browser.execute_script(
                    "return document.getElementById(arguments[0]).hidden", pane) is False
