"""The inspector marks a delivery whose payload shape the project does not know.

The mark comes from the receiver's own span (`shapeId`, `shapeKnown`), so the page shows what
the deployed code decided. The API test runs the real local host process; the browser test
reads the same page in Chromium (skipped without it locally, required in CI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from shared import telemetry_names as names
from shared.cli.simulate import build_event
from shared.local.inspector import Recorder
from shared.shapes import fingerprint

from .inspector_host import HostProcess
from .test_inspector_browser import browser, row, text_of, until  # noqa: F401 - fixture


def drifted() -> bytes:
    """A fresh VEHICLE_STATE whose `meta.version` the project has never read."""
    event = json.loads(build_event("state"))
    event["meta"]["version"] = "5.0"
    return json.dumps(event).encode()


def by_event(deliveries: list[dict[str, Any]], body: bytes) -> dict[str, Any] | None:
    wanted = json.loads(body)["eventId"]
    return next((d for d in deliveries if d["eventId"] == wanted), None)


def listed(driver: Any, table: str, event_id: str) -> dict[str, str]:
    """The row of a delivery the page has listed already."""
    found = row(driver, table, event_id)
    assert found is not None, f"{event_id} is no longer listed in {table}"
    return found


class TestRecorder:
    def test_the_shape_is_read_from_the_receive_span(self) -> None:
        provider = TracerProvider()
        recorder = Recorder()
        recorder.attach(provider)
        tracer = provider.get_tracer("test")
        body = drifted()
        answered = recorder.http_request("webhooks/smartcar", "POST", {}, body)
        with tracer.start_as_current_span(names.SPAN_RECEIVE) as span:
            span.set_attribute(names.ATTR_OUTCOME, "accepted")
            span.set_attribute(names.ATTR_SHAPE_ID, "abc123abc123")
            span.set_attribute(names.ATTR_SHAPE_KNOWN, False)
        answered(200, b"{}")
        unsigned = recorder.http_request("webhooks/smartcar", "POST", {}, body)
        with tracer.start_as_current_span(names.SPAN_RECEIVE) as span:
            span.set_attribute(names.ATTR_OUTCOME, "unsigned_rejected")
        unsigned(401, b"{}")
        detail = recorder.detail(1)
        assert detail is not None
        assert detail["shape"] == {"id": "abc123abc123", "known": False,
                                   "newParts": ["meta.version '5.0'"]}
        rejected = recorder.detail(2)
        assert rejected is not None and rejected["shape"] is None


class TestOverHttp:
    def test_the_api_marks_unknown_shapes_only_on_authenticated_deliveries(
        self, tmp_path: Path
    ) -> None:
        known, new, forged = build_event("state"), drifted(), drifted()
        with HostProcess(tmp_path) as host:
            assert host.post(known).status == 200
            assert host.post(new).status == 200
            assert host.post(forged, signature="0" * 64).status == 401

            def all_three() -> list[dict[str, Any]] | None:
                found = host.deliveries()
                return found if len(found) == 3 and all(d["outcome"] for d in found) else None

            deliveries = host.wait_for(all_three)
            shape = fingerprint(new)
            assert shape is not None
            new_delivery, known_delivery = by_event(deliveries, new), by_event(deliveries, known)
            assert new_delivery is not None and known_delivery is not None
            assert new_delivery["shape"] == {"id": shape.id, "known": False}
            assert known_delivery["shape"]["known"] is True
            # A forged body is a stranger's: its shape is nobody's concern.
            assert [d["shape"] for d in deliveries if d["status"] == 401] == [None]


class TestInChromium:
    def test_the_row_and_the_detail_say_new_shape(self, tmp_path: Path,
                                                   browser: Any) -> None:  # noqa: F811
        known, new = build_event("state"), drifted()
        with HostProcess(tmp_path) as host:
            assert host.post(known).status == 200
            assert host.post(new).status == 200
            browser.get(host.url)
            new_id, known_id = json.loads(new)["eventId"], json.loads(known)["eventId"]
            until(browser, lambda d: row(d, "deliveries", new_id)
                  and row(d, "deliveries", known_id), "both deliveries listed")
            until(browser, lambda d: "new shape" in listed(d, "deliveries", new_id)["text"],
                  "the new shape marked in its row")
            assert "new shape" not in listed(browser, "deliveries", known_id)["text"]
            browser.execute_script(
                "document.querySelector(`#deliveries tbody tr[data-event-id='${arguments[0]}']`)"
                ".click()", new_id)
            until(browser, lambda d: "meta.version '5.0'" in text_of(d, "shape"),
                  "the detail naming the new part")
