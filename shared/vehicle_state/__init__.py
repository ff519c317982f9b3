"""The vehicle state store: the latest value of every signal and every open error per vehicle.

Smartcar delivers unordered and at least once, so the store never trusts arrival order: a
signal's stored value changes only for a newer `oemUpdatedAt`, and an error opens and resolves
by the rules in docs/vehicle-state.md. The processor applies each authenticated VEHICLE_STATE
and VEHICLE_ERROR before the handlers run; `registry.on_change` handlers are driven by what the
store accepted, never by what arrived.

This module is the one interface that the processor, the read route (`GET /api/vehicles/{id}`),
the CLI and the inspector use; the backends (Azure Table Storage in Azure, SQLite locally)
implement `VehicleStateStore`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol, overload

from ..events import Event

#: What a vehicleId may be for the read route and the CLI: Smartcar's ids are UUIDs; this
#: admits them and any other id of letters, digits, `-`, `_`, `.` and `:` up to 128
#: characters. Anything else (too long, `/`, `#`, `?`, `\\`, control characters) is refused
#: with 400 before it reaches a backend. The processor stores any vehicleId an authentic
#: event carries (escaped by the backend as its keys require).
VEHICLE_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_vehicle_id(vehicle_id: str) -> bool:
    """True when `vehicle_id` may be asked for through the read route and the CLI."""
    return VEHICLE_ID_PATTERN.fullmatch(vehicle_id) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalState:
    """The stored state of one signal of one vehicle."""

    code: str
    #: `Group.Name` when the delivery named both, e.g. `TractionBattery.StateOfCharge`.
    path: str | None = None
    value: Any = None
    unit: str | None = None
    oem_updated_at: datetime | None = None
    retrieved_at: datetime | None = None
    #: The eventId of the delivery that set this state.
    event_id: str | None = None
    #: "ok", or "error" for a signal that carried an error (then `error_type`/`error_code`).
    status: str = "ok"
    error_type: str | None = None
    error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of the read route, the CLI and the inspector."""
        body: dict[str, Any] = {
            "value": self.value,
            "unit": self.unit,
            "oemUpdatedAt": _iso(self.oem_updated_at),
            "retrievedAt": _iso(self.retrieved_at),
            "eventId": self.event_id,
            "status": self.status,
        }
        if self.path is not None:
            body["path"] = self.path
        if self.status != "ok":
            body["error"] = {"type": self.error_type, "code": self.error_code}
        return body


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorState:
    """One vehicle error, keyed by (vehicleId, type, code)."""

    type: str
    code: str | None
    #: "OPEN" or "RESOLVED".
    state: str
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    count: int = 0
    description: str | None = None
    resolution_type: str | None = None
    signals: tuple[str, ...] = ()
    #: The eventId of the delivery that last changed this error.
    event_id: str | None = None
    #: When RESOLVED: the `meta.deliveredAt` of the RESOLVED that closed it.
    resolved_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "code": self.code,
            "state": self.state,
            "firstSeen": _iso(self.first_seen),
            "lastSeen": _iso(self.last_seen),
            "count": self.count,
            "description": self.description,
            "resolutionType": self.resolution_type,
            "signals": list(self.signals),
            "eventId": self.event_id,
            "resolvedAt": _iso(self.resolved_at),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalChange:
    """A change the store accepted: what `registry.on_change` handlers receive."""

    vehicle_id: str
    code: str
    path: str | None
    #: The state before this change; None for a signal the store had never seen.
    previous: SignalState | None
    current: SignalState


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedSignal:
    """A signal of an authentic event that the store could not keep, and why (documented)."""

    code: str | None
    reason: str


class Changes(Sequence[SignalChange]):
    """The changes of one apply, in payload order: a read-only sequence that equals the tuple
    of the same changes.

    An apply accepts ~20 changes per delivery, and most are only counted and named (telemetry,
    handled.jsonl, the inspector). So a backend may give their codes and a way to build them,
    and each `SignalChange` is built on first use of the sequence's items.
    """

    __slots__ = ("_build", "_built", "codes")

    def __init__(self, changes: Iterable[SignalChange] = (), *,
                 codes: tuple[str, ...] | None = None,
                 build: Callable[[], tuple[SignalChange, ...]] | None = None) -> None:
        self._build = build
        if build is None:
            self._built: tuple[SignalChange, ...] | None = tuple(changes)
            #: The changed signals' codes, in payload order.
            self.codes: tuple[str, ...] = tuple(c.code for c in self._built)
        else:
            if codes is None:
                raise TypeError("a built-on-use Changes needs its codes")
            self._built = None
            self.codes = codes

    def _all(self) -> tuple[SignalChange, ...]:
        built = self._built
        if built is None:
            assert self._build is not None
            built = self._built = self._build()
            self._build = None
        return built

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, index: int) -> SignalChange: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[SignalChange, ...]: ...

    def __getitem__(self, index: int | slice) -> SignalChange | tuple[SignalChange, ...]:
        return self._all()[index]

    def __iter__(self) -> Iterator[SignalChange]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Changes | tuple | list):
            return len(self) == len(other) and self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return f"Changes({self._all()!r})"


class StoreConflictError(RuntimeError):
    """The vehicle's partition kept changing under every attempt (`conflicts` of them): the
    delivery is retried."""

    def __init__(self, message: str, *, conflicts: int) -> None:
        super().__init__(message)
        self.conflicts = conflicts


#: The attribute an `apply` that met write conflicts and then failed otherwise (a timeout, a
#: 503) sets on the exception it raises: how many it met.
CONFLICTS_ATTRIBUTE: Final = "vehicle_state_conflicts"


def conflicts_met(exc: BaseException) -> int:
    """The write conflicts an `apply` met before it raised `exc` (0 when none were noted)."""
    if isinstance(exc, StoreConflictError):
        return exc.conflicts
    return int(getattr(exc, CONFLICTS_ATTRIBUTE, 0))


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyResult:
    """What applying one event did. Applying the same event again yields no `changes`."""

    #: Signals whose stored state this event changed (in payload order); a tuple given here
    #: is kept as `Changes`.
    changes: Changes = field(default_factory=Changes)
    #: Codes of signals left alone because the store holds a newer (or the same) reading.
    stale: tuple[str, ...] = ()
    #: Codes of signals whose stored reading this event fetched again (the same
    #: `oemUpdatedAt` or none, the same content, a later `retrievedAt` or eventId:
    #: `rules.same_reading`): stored, but not changes.
    refreshed: tuple[str, ...] = ()
    #: Signals recorded or skipped as documented (no usable timestamp, too large, ...).
    skipped: tuple[SkippedSignal, ...] = ()
    #: Errors this event opened or updated, and errors it resolved.
    errors_opened: tuple[ErrorState, ...] = ()
    errors_resolved: tuple[ErrorState, ...] = ()
    #: Conditional writes that lost a race with another instance and were retried.
    conflicts_retried: int = 0
    #: Every change of this event whose handlers have not completed: `changes`, and those an
    #: earlier delivery stored before it was cut short (what `on_change` handlers run for).
    pending: tuple[SignalChange, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.changes, Changes):
            object.__setattr__(self, "changes", Changes(self.changes))

    def to_json(self) -> dict[str, Any]:
        return {
            "changed": list(self.changes.codes),
            "stale": list(self.stale),
            "refreshed": list(self.refreshed),
            "skipped": [{"code": s.code, "reason": s.reason} for s in self.skipped],
            "errorsOpened": [e.to_json() for e in self.errors_opened],
            "errorsResolved": [e.to_json() for e in self.errors_resolved],
            "conflictsRetried": self.conflicts_retried,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class VehicleView:
    """One vehicle as the read route shows it."""

    vehicle_id: str
    signals: Mapping[str, SignalState] = field(default_factory=dict)
    #: Open errors only.
    errors: Sequence[ErrorState] = ()
    updated_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """`GET /api/vehicles/{vehicleId}`'s body (contract.md)."""
        return {
            "vehicleId": self.vehicle_id,
            "updatedAt": _iso(self.updated_at),
            "signals": {code: s.to_json() for code, s in sorted(self.signals.items())},
            "errors": [e.to_json() for e in self.errors],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class VehicleSummary:
    """One row of `vehicles list`: most recently updated first."""

    vehicle_id: str
    updated_at: datetime | None
    signal_count: int
    open_errors: int

    def to_json(self) -> dict[str, Any]:
        return {
            "vehicleId": self.vehicle_id,
            "updatedAt": _iso(self.updated_at),
            "signals": self.signal_count,
            "openErrors": self.open_errors,
        }


#: Processed eventIds (the inbox) are kept at least 7 days (Smartcar's advice); those older
#: than this are deleted by `VehicleStateStore.prune_inbox`, which the `prune_vehicle_inbox`
#: timer runs hourly.
INBOX_RETENTION_SECONDS: Final = 8 * 86400.0

#: Which accepted changes an apply keeps pending for the handlers, by the signal's code and
#: `Group.Name` path (the processor passes its registry's `change_filter`: only the signals
#: some `on_change` handler is registered for).
Outbox = Callable[[str, str | None], bool]


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """An `Outbox` that keeps the changes of the signals it names, by code or `Group.Name`
    path. A backend may test `names` itself rather than call it for each of a delivery's
    ~20 changes."""

    names: frozenset[str]

    def __call__(self, code: str, path: str | None) -> bool:
        return code in self.names or path in self.names


@dataclass(frozen=True, slots=True)
class InboxPruned:
    """What a `prune_inbox` did: records deleted, and groups of them (Table: partitions)
    whose delete failed and waits for the next prune."""

    deleted: int = 0
    failed: int = 0


class VehicleStateStore(Protocol):
    """What both backends (Azure Table Storage, local SQLite) provide.

    Every method is safe to call from several processes/instances at once: writes are
    conditional (ETag / If-Match, or a SQLite transaction) and retried on conflict, and a
    stored value never goes back in time.
    """

    async def apply(self, event: Event, *, outbox: Outbox | None = None) -> ApplyResult:
        """Apply one authenticated VEHICLE_STATE or VEHICLE_ERROR (other types: no-op).

        Idempotent and order-free: applying an event twice changes nothing, and any order of
        a set of events ends in the same state. The accepted changes (those `outbox` selects;
        all without it) are also kept as this event's pending changes (the outbox), in the
        same write, until `mark_processed`.
        """
        ...

    async def pending_changes(self, vehicle_id: str, event_id: str) -> tuple[SignalChange, ...]:
        """The changes this event's apply accepted and whose handlers have not completed
        (so a crash between storing and handling still fires `on_change` on redelivery)."""
        ...

    async def is_processed(self, vehicle_id: str | None, event_id: str) -> bool:
        """True when this eventId's handlers completed within the inbox retention (≥ 7 days)."""
        ...

    async def mark_processed(self, vehicle_id: str | None, event_id: str) -> None:
        """Record that this eventId's handlers completed, and drop its pending changes."""
        ...

    async def prune_inbox(self) -> InboxPruned:
        """Delete the inbox records older than `INBOX_RETENTION_SECONDS`, of every vehicle
        (Table: of the vehicles its index notes for days wholly past the retention). A
        vehicle whose records cannot be deleted now is logged, counted in `failed` and left
        for the next prune."""
        ...

    async def get_vehicle(self, vehicle_id: str) -> VehicleView | None:
        """The vehicle's signals and open errors; None for a vehicle never seen."""
        ...

    async def list_vehicles(self, *, limit: int = 100) -> list[VehicleSummary]:
        """Vehicles, most recently updated first, with their count of open errors."""
        ...

    async def close(self) -> None: ...


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
