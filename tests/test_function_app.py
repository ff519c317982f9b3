"""function_app.py declares what the contract promises, and stays a thin table of contents."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from shared.local.app_functions import index_functions, resolve_app_setting
from shared.local.command import load_function_app

REPO = Path(__file__).resolve().parent.parent


def test_http_routes_methods_and_auth_levels() -> None:
    http, _, _ = index_functions(load_function_app())
    declared = {(f.route, f.methods, f.auth_level) for f in http}
    assert declared == {
        ("webhooks/smartcar", ("POST",), "function"),
        ("webhooks/smartcar/errors", ("POST",), "function"),
        ("health", ("GET",), "anonymous"),
        ("vehicles/{vehicleId}", ("GET",), "function"),
    }


def test_webhook_functions_are_async() -> None:
    http, queues, _ = index_functions(load_function_app())
    for fn in http:
        if fn.route.startswith("webhooks/"):
            assert inspect.iscoroutinefunction(fn.handler), fn.name
    assert all(inspect.iscoroutinefunction(q.handler) for q in queues)


def test_queue_trigger_reads_the_queue_name_setting_and_identity_connection() -> None:
    _, queues, _ = index_functions(load_function_app())
    (processor,) = queues
    assert processor.queue_name == "%SERVICEBUS_QUEUE_NAME%"
    assert processor.connection == "ServiceBusConnection"
    assert resolve_app_setting(processor.queue_name, {"SERVICEBUS_QUEUE_NAME": "q1"}) == "q1"


def test_the_redrive_and_inbox_prune_timers_are_declared() -> None:
    _, _, timers = index_functions(load_function_app())
    assert [t.name for t in timers] == ["redrive_spilled", "prune_vehicle_inbox"]


def test_function_bodies_only_delegate_to_shared() -> None:
    tree = ast.parse((REPO / "function_app.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            statements = [s for s in node.body if not isinstance(s, ast.Expr)
                          or not isinstance(s.value, ast.Constant)]
            assert len(statements) == 1, f"{node.name} should hand over to shared/ in one line"
