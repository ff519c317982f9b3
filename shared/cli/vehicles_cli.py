"""`vehicles list` and `vehicles show VEHICLE_ID`: the vehicle state store, from the CLI.

    python -m shared.cli vehicles list [--limit N]
    python -m shared.cli vehicles show VEHICLE_ID

The store is the one the app uses with the same settings (`open_store`: SQLite in
${LOCAL_STATE_DIR} locally, Azure Table Storage in Azure), read directly: the CLI needs no key
because it needs the storage account's data role, which is stronger. `--json` prints exactly
what `GET /api/vehicles/{vehicleId}` answers (`show`) or one summary per vehicle (`list`);
human output escapes every stored string (a vehicle's values and error descriptions come from
outside).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from ..credentials import ProcessCredential
from ..settings import Settings
from ..vehicle_read import stored_vehicle_id_problem
from ..vehicle_state import VehicleStateStore, VehicleSummary, VehicleView
from .arguments import MAX_LIMIT, limit_argument

COMMANDS = frozenset({"vehicles"})
DEFAULT_LIMIT = 100

Table = Callable[[Sequence[Sequence[Any]], Sequence[str]], str]


def open_store(settings: Settings, credential: ProcessCredential) -> VehicleStateStore | None:
    """The store the app's settings choose (the app's own factory); None when it is off."""
    from ..vehicle_state.factory import open_store as factory

    store: VehicleStateStore | None = factory(settings, credential=credential)
    return store


def add_parsers(commands: Any, json_flag: argparse.ArgumentParser, parser_class: Any) -> None:
    vehicles = commands.add_parser("vehicles", parents=[json_flag],
                                   help="the vehicle state store: latest signals, open errors")
    sub = vehicles.add_subparsers(dest="vehicles_command", required=True,
                                  parser_class=parser_class)
    listing = sub.add_parser("list", parents=[json_flag],
                             help="vehicles, most recently updated first, with open errors")
    listing.add_argument("--limit", type=limit_argument, default=DEFAULT_LIMIT,
                         help=f"at most this many ({DEFAULT_LIMIT}; up to {MAX_LIMIT})")
    show = sub.add_parser("show", parents=[json_flag],
                          help="one vehicle's signals and open errors")
    show.add_argument("vehicle_id", metavar="VEHICLE_ID", help="a vehicleId, e.g. from the list")


def _with_store[T](settings: Settings,
                   action: Callable[[VehicleStateStore], Awaitable[T]]) -> T:
    """Run `action` on the store the settings choose, then close it; Failure when the store
    is off, cannot be opened or fails."""
    from .commands import Failure, private_state_directory

    if settings.vehicle_state_backend == "sqlite":
        # As the local host does: the store holds vehicle data, its directory the user's alone.
        private_state_directory(settings.local_state_dir)

    async def run() -> T:
        # Opened inside the loop: the Table backend's async client belongs to it. The
        # credential is the app's kind (its managed identity, else `az login`), closed here.
        credential = ProcessCredential(settings.azure_client_id)
        try:
            store = open_store(settings, credential)
            if store is None:
                raise Failure("the vehicle state store is turned off (VEHICLE_STATE_STORE=off): "
                              "nothing is kept to show")
            try:
                return await action(store)
            finally:
                await store.close()
        finally:
            await credential.close()

    try:
        return asyncio.run(run())
    except Failure:
        raise
    except Exception as exc:  # the backend's own errors: one line, no traceback
        raise Failure(f"the vehicle state store failed: {type(exc).__name__}: {exc}") from None


def run(args: argparse.Namespace, emit: Callable[[Any, str], None], err: TextIO,
        table: Table) -> int:
    """Run one `vehicles` command; UsageError / Failure as the other commands raise them."""
    from .commands import EXIT_OK, Failure, UsageError, _settings

    if args.vehicles_command == "list":
        limit = args.limit
        # One more than asked for tells whether --limit left some out.
        found = _with_store(_settings(), lambda store: store.list_vehicles(limit=limit + 1))
        summaries = found[:limit]
        emit([s.to_json() for s in summaries],
             list_text(summaries, table, more=len(found) > limit))
        return EXIT_OK

    problem = stored_vehicle_id_problem(args.vehicle_id)
    if problem is not None:
        raise UsageError(problem)
    view = _with_store(_settings(), lambda store: store.get_vehicle(args.vehicle_id))
    if view is None:
        raise Failure(f"no state for vehicle {args.vehicle_id}: no VEHICLE_STATE or "
                      "VEHICLE_ERROR of it has been processed (see `vehicles list`)")
    emit(view.to_json(), show_text(view, table))
    return EXIT_OK


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def list_text(summaries: Sequence[VehicleSummary], table: Table, *, more: bool) -> str:
    if not summaries:
        return "No vehicle state yet: no VEHICLE_STATE or VEHICLE_ERROR has been processed."
    rows = [(s.vehicle_id, _time(s.updated_at), s.signal_count, s.open_errors)
            for s in summaries]
    text = table(rows, ("VEHICLE ID", "UPDATED", "SIGNALS", "OPEN ERRORS"))
    shown = f"the {len(summaries)} most recently updated (raise --limit for more)" if more \
        else f"{len(summaries)} vehicle(s), most recently updated first"
    return f"{text}\n{shown}. Details: vehicles show VEHICLE_ID"


def _value(value: Any) -> Any:
    """A signal's value as JSON writes it (`true`, `{"lat":...}`); text as it is."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def show_text(view: VehicleView, table: Table) -> str:
    parts = [table([("vehicleId", view.vehicle_id), ("updatedAt", _time(view.updated_at)),
                    ("signals", len(view.signals)), ("open errors", len(view.errors))],
                   ("FIELD", "VALUE"))]
    if view.signals:
        rows = []
        for code, s in sorted(view.signals.items()):
            status = s.status if s.status == "ok" else \
                f"{s.status} {s.error_type or ''} {s.error_code or ''}".strip()
            rows.append((code, _value(s.value), s.unit, _time(s.oem_updated_at), status,
                         s.event_id))
        parts.append("Signals:\n" + table(
            rows, ("SIGNAL", "VALUE", "UNIT", "OEM UPDATED AT", "STATUS", "EVENT ID")))
    else:
        parts.append("Signals: none stored.")
    if view.errors:
        errors = [(e.type, e.code, e.count, _time(e.first_seen), _time(e.last_seen),
                   e.description) for e in view.errors]
        parts.append("Open errors:\n" + table(
            errors, ("TYPE", "CODE", "COUNT", "FIRST SEEN", "LAST SEEN", "DESCRIPTION")))
    else:
        parts.append("Open errors: none.")
    return "\n".join(parts)
