"""Operations CLI: smoke-test a deployment and work the dead-letter queue.

    python -m shared.cli send --url URL [--token T] [--type verify|state|error]
                              [--file PAYLOAD.json] [--unsigned] [--event-id ID]
                              [--vehicle-id ID] [--set Group.Name=value ...]
                              [--oem-updated-at TIME]
    python -m shared.cli stats
    python -m shared.cli dlq list [--limit N]
    python -m shared.cli dlq show ID
    python -m shared.cli dlq replay (--all | ID...)
    python -m shared.cli dlq purge (--all | ID...)
    python -m shared.cli check-endpoint URL [--send-test-event] [--token T]
    python -m shared.cli explain-signature --body FILE --signature HEX [--token T]
    python -m shared.cli vehicles list [--limit N]
    python -m shared.cli vehicles show VEHICLE_ID

Every command takes --json (one JSON document on stdout). The queue is the one the app uses
with the same settings: the embedded queue in ${LOCAL_STATE_DIR}, or Azure Service Bus when
ServiceBusConnection__fullyQualifiedNamespace is set (signed in through DefaultAzureCredential).
ID is a dead letter's sequence number (as `dlq list` shows it), its messageId or its eventId;
an ID that names more than one dead letter is refused with the candidates listed: then give
seq:N, which is the sequence number N and nothing else.
Exit status: 0 done, 1 failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..events import is_unicode, peek_envelope
from ..local.private import private_directory
from ..local.queue_open import QUEUE_FILE
from ..printable import printable
from ..settings import Settings, SettingsError, load_settings
from . import doctor_cli, vehicles_cli
from .arguments import MAX_LIMIT, limit_argument, read_input
from .doctor import TokenError, resolve_tokens, token_argument
from .ops import (
    DeadLetter,
    OpsError,
    PurgeResult,
    QueueOps,
    ReplayResult,
    Resolved,
    describe_ambiguous,
    open_ops,
    resolve_ids,
)
from .simulate import (
    EVENT_TYPES,
    Delivery,
    DeliveryError,
    Shape,
    build_event,
    check_url,
    deliver,
    parse_signal_setting,
    parse_timestamp_ms,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line or the configuration is wrong: exit 2."""


class Failure(Exception):
    """The operation failed: exit 1. `extra` goes into the --json error document."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 by itself; keep it in main
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def build_parser() -> argparse.ArgumentParser:
    json_flag = _Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not undo a --json given before it.
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="print one JSON document on stdout instead of text")
    parser = _Parser(prog="python -m shared.cli", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[json_flag])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    send = commands.add_parser("send", parents=[json_flag],
                               help="send a signed Smartcar webhook to a URL")
    send.add_argument("--url", required=True,
                      help="the callback URI, e.g. http://127.0.0.1:7071/api/webhooks/smartcar "
                           "or https://<app>.azurewebsites.net/api/webhooks/smartcar?code=<key>")
    send.add_argument("--token", type=token_argument, help="management token to sign with "
                      "(default: the one the app verifies with: the Key Vault secret when "
                      "KEY_VAULT_URI is set, else SMARTCAR_MANAGEMENT_TOKEN, else the "
                      "development token)")
    send.add_argument("--type", choices=EVENT_TYPES, dest="event_type",
                      help="event to simulate (default: state)")
    send.add_argument("--file", type=Path,
                      help="send this payload, signed byte for byte ('-': standard input)")
    send.add_argument("--unsigned", action="store_true", help="send without SC-Signature")
    send.add_argument("--event-id", help="the event's eventId (default: a new UUID); the same "
                      "id twice within the duplicate window is answered `duplicate`")
    send.add_argument("--vehicle-id", help="the vehicleId (default: the template's vehicle)")
    send.add_argument("--set", action="append", default=[], dest="signals",
                      metavar="Group.Name=value",
                      help="set a signal of --type state, e.g. TractionBattery.StateOfCharge=12 "
                           "(value read as JSON when it is JSON, else a string); repeatable")
    send.add_argument("--oem-updated-at", metavar="TIME",
                      help="every signal's oemUpdatedAt: epoch ms or ISO-8601 with offset "
                           "(default: 2 s before now); an older time than the vehicle's "
                           "last update tries an out-of-order delivery")

    commands.add_parser("stats", parents=[json_flag], help="message counts of the queue")

    dlq = commands.add_parser("dlq", parents=[json_flag], help="the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    listing = dlq_commands.add_parser("list", parents=[json_flag], help="list dead letters")
    listing.add_argument("--limit", type=limit_argument, default=1000,
                         help=f"at most this many (1000; up to {MAX_LIMIT})")
    show = dlq_commands.add_parser("show", parents=[json_flag], help="one dead letter in full")
    show.add_argument("id", metavar="ID",
                      help="a sequence number from `dlq list`, a messageId or an eventId; "
                           "seq:N is the sequence number N only")
    for name, text in (("replay", "re-enqueue dead letters for processing"),
                       ("purge", "delete dead letters")):
        sub = dlq_commands.add_parser(name, parents=[json_flag], help=text)
        sub.add_argument("ids", metavar="ID", nargs="*",
                         help="sequence numbers from `dlq list`, messageIds or eventIds; "
                              "seq:N is the sequence number N only")
        sub.add_argument("--all", action="store_true", help="every dead letter")
    doctor_cli.add_parsers(commands, json_flag, _Parser)
    vehicles_cli.add_parsers(commands, json_flag, _Parser)
    return parser


# -- commands ------------------------------------------------------------------------------------


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def cmd_send(args: argparse.Namespace, out: TextIO, err: TextIO) -> Any:
    problem = check_url(args.url)
    if problem:
        raise UsageError(problem)
    if args.file is not None and args.event_type is not None:
        raise UsageError("use --type or --file, not both")
    shape = _shape(args)
    if args.file is not None and not shape.empty:
        raise UsageError("--file sends its bytes as they are: --event-id, --vehicle-id, --set "
                         "and --oem-updated-at shape a built event (--type)")
    if args.file is not None:
        try:
            body = read_input(args.file, "--file")
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        try:
            body = build_event(args.event_type or "state", shape=shape)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    token = args.token
    # Unsigned, a token is needed only to check a VERIFY answer.
    needs_token = not args.unsigned or _is_verify(body)
    if token is None and needs_token:
        # The token the app verifies with, by the app's precedence (Key Vault first).
        try:
            found = resolve_tokens(None, _settings)
        except TokenError as exc:
            raise Failure(str(exc)) from None
        token = found.values[0]
        if found.source == "development token":
            use = "checking the VERIFY answer with" if args.unsigned else "signing with"
            print(f"note: {use} the development token "
                  "(SMARTCAR_MANAGEMENT_TOKEN is unset)", file=err)
    try:
        delivery = deliver(args.url, body, token=token, signed=not args.unsigned)
    except DeliveryError as exc:
        raise Failure(str(exc), status=exc.status, body=exc.body) from None
    return delivery


def _shape(args: argparse.Namespace) -> Shape:
    try:
        signals = tuple(parse_signal_setting(text) for text in args.signals)
        oem = None if args.oem_updated_at is None else parse_timestamp_ms(args.oem_updated_at)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for name, value in (("--event-id", args.event_id), ("--vehicle-id", args.vehicle_id)):
        if value is not None and not value.strip():
            raise UsageError(f"{name} must not be empty")
    return Shape(event_id=args.event_id, vehicle_id=args.vehicle_id, signals=signals,
                 oem_updated_at_ms=oem)


def _is_verify(body: bytes) -> bool:
    return peek_envelope(body).event_type == "VERIFY"


def _send_doc(d: Delivery) -> dict[str, Any]:
    try:
        response: Any = json.loads(d.body)
    except ValueError:
        response = d.body
    return {"url": d.url, "eventId": d.event_id, "eventType": d.event_type, "signed": d.signed,
            "status": d.status, "response": response, "challengeVerified": d.challenge_verified}


def _send_text(d: Delivery) -> str:
    what = printable(f"{d.event_type or 'payload'} {d.event_id or ''}".strip())
    lines = [f"sent {what} ({'signed' if d.signed else 'unsigned'}) to {printable(d.url)}",
             f"answer: {d.status} {printable(d.body)}"]
    if d.challenge_verified:
        lines.append("VERIFY challenge answered with the expected HMAC")
    return "\n".join(lines)


def private_state_directory(state_dir: Path) -> None:
    """`private_directory`, or Failure saying why not (a file in its place, a directory
    owned by another user, a read-only disk)."""
    try:
        private_directory(state_dir)
    except OSError as exc:
        raise Failure(f"cannot make the state directory {state_dir} private (created, "
                      f"0700): {exc.strerror or type(exc).__name__}") from None


def _with_ops(action: Callable[[QueueOps], Any], err: TextIO) -> Any:
    settings = _settings()
    if settings.queue_backend == "local":
        if not (settings.local_state_dir / QUEUE_FILE).exists():
            print(f"note: no local queue in {settings.local_state_dir}/ yet (is LOCAL_STATE_DIR "
                  "the one the host uses?)", file=err)
        # As the local host does: the queue holds payloads, its directory is the user's alone.
        private_state_directory(settings.local_state_dir)
    try:
        ops = open_ops(settings)
    except OpsError as exc:
        raise Failure(str(exc)) from None
    try:
        return action(ops)
    except OpsError as exc:
        raise Failure(str(exc)) from None
    finally:
        try:
            ops.close()
        except Exception:  # noqa: S110 - closing after a failure must not hide the failure
            pass


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [
        ["-" if c is None else printable(str(c)) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _clip(text: str | None, width: int) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 3] + "..."


def _listing(ops: QueueOps, limit: int) -> tuple[list[DeadLetter], int | None]:
    """Up to `limit` dead letters, and how many there are when that is more (None when the
    count cannot be read: the listing still works with a data role that cannot read it)."""
    entries = ops.dead_letters(limit=limit + 1)
    if len(entries) <= limit:
        return entries, len(entries)
    try:
        total: int | None = max(ops.stats()["deadLettered"], limit + 1)
    except OpsError:
        total = None
    return entries[:limit], total


def _list_text(where: str, entries: list[DeadLetter], total: int | None = None) -> str:
    if not entries:
        return f"The dead-letter queue of {where} is empty."
    rows = [
        (e.sequence_number, e.event_type, e.event_id, e.reason, e.delivery_count,
         e.enqueued_time.isoformat(timespec="seconds") if e.enqueued_time else None,
         _clip(e.description, 60))
        for e in entries
    ]
    table = _table(rows, ("ID", "EVENT TYPE", "EVENT ID", "REASON", "DELIVERIES", "ENQUEUED",
                          "DESCRIPTION"))
    if total == len(entries):
        count = f"{len(entries)} dead-lettered."
    else:
        of = f"{total}" if total is not None else f"more than {len(entries)}"
        count = f"{len(entries)} of {of} dead-lettered shown (raise --limit for more)."
    return f"Dead letters of {where}:\n{table}\n{count} Details: dlq show ID"


def _show_text(doc: dict[str, Any]) -> str:
    lines = [f"{name}: {'-' if doc.get(name) is None else printable(str(doc[name]))}"
             for name in ("sequenceNumber", "messageId", "eventId", "eventType", "reason",
                          "description", "deliveryCount", "enqueuedTime")]
    lines.append("applicationProperties: " + printable(
        json.dumps(doc["applicationProperties"], sort_keys=True, ensure_ascii=False)))
    if "body" in doc:
        lines.append("body:")
        lines.append(printable(doc["body"], keep="\n\t"))
    else:
        lines.append(f"body (base64, not UTF-8): {doc['bodyBase64']}")
    return "\n".join(lines)


def _check_targets(args: argparse.Namespace) -> None:
    if args.all and args.ids:
        raise UsageError(f"dlq {args.dlq_command}: give --all or IDs, not both")
    if not args.all and not args.ids:
        raise UsageError(f"dlq {args.dlq_command}: give --all or at least one ID "
                         "(a sequence number from `dlq list`, a messageId, an eventId, or "
                         "seq:N)")


def _resolve(ops: QueueOps, ids: Sequence[str]) -> Resolved:
    resolved = resolve_ids(ops, ids)
    if resolved.ambiguous:
        raise UsageError("; ".join(describe_ambiguous(value, found)
                                   for value, found in resolved.ambiguous.items()))
    return resolved


def _with_not_found[R: (ReplayResult, PurgeResult)](result: R, resolved: Resolved) -> R:
    """IDs that named no dead letter, then any that went away between snapshot and action."""
    result.not_found = [*resolved.not_found, *result.not_found]
    return result


def _on_targets[R: (ReplayResult, PurgeResult)](
    args: argparse.Namespace,
    err: TextIO,
    act: Callable[[QueueOps, list[int] | None], R],
    nothing: Callable[[], R],
) -> tuple[str, R]:
    """`act` on every dead letter (`--all`, None) or on those the IDs name; IDs that name none
    are reported, and `nothing()` stands for the action when none was named. Returns which
    queue it acted on, and the result."""
    def run(ops: QueueOps) -> tuple[str, R]:
        if args.all:
            return ops.where, act(ops, None)
        resolved = _resolve(ops, args.ids)
        done = act(ops, resolved.sequence_numbers) if resolved.sequence_numbers else None
        return ops.where, _with_not_found(done or nothing(), resolved)

    result: tuple[str, R] = _with_ops(run, err)
    return result


def json_document(doc: Any) -> str:
    """`doc` as the one JSON document `--json` prints: non-ASCII text as it is, unless some
    text is not Unicode (a lone surrogate, which a dead letter's eventId can hold and no
    UTF-8 stream can carry): then every such character escaped. Exact JSON either way."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return text if is_unicode(text) else json.dumps(doc, indent=2)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run one parsed command; raises UsageError / Failure for exit 2 / 1."""
    as_json = bool(getattr(args, "json", False))

    def emit(doc: Any, text: str) -> None:
        if as_json:
            out.write(json_document(doc) + "\n")
        else:
            out.write(printable(text, keep="\n\t") + "\n")

    if args.command == "send":
        delivery = cmd_send(args, out, err)
        emit(_send_doc(delivery), _send_text(delivery))
        return EXIT_OK

    if args.command in doctor_cli.COMMANDS:
        return doctor_cli.run(args, emit, err)
    if args.command in vehicles_cli.COMMANDS:
        return vehicles_cli.run(args, emit, err, _table)

    if args.command == "stats":
        counts = _with_ops(lambda ops: (ops.where, ops.stats()), err)
        where, stats = counts
        emit(stats, f"{where}: active {stats['active']}, "
                    f"dead-lettered {stats['deadLettered']}, scheduled {stats['scheduled']}")
        return EXIT_OK

    command = args.dlq_command
    if command == "list":
        limit = args.limit
        # One more than asked for tells whether --limit left some out.
        listed: tuple[str, list[DeadLetter], int | None] = _with_ops(
            lambda ops: (ops.where, *_listing(ops, limit)), err)
        where, entries, total = listed
        emit([e.summary() for e in entries], _list_text(where, entries, total))
        return EXIT_OK

    if command == "show":
        where, resolved = _with_ops(lambda ops: (ops.where, _resolve(ops, [args.id])), err)
        if args.id not in resolved.matches:
            raise Failure(f"no dead letter with ID {args.id} in {where} (a sequence number, "
                          "messageId or eventId; see `dlq list`)")
        doc = resolved.matches[args.id].dead_letter.detail()
        emit(doc, _show_text(doc))
        return EXIT_OK

    _check_targets(args)
    if command == "replay":
        where, result = _on_targets(args, err, lambda ops, targets: ops.replay(targets),
                                    ReplayResult)
        doc = {"replayed": result.replayed, "failed": result.failed,
               "notFound": result.not_found}
        lines = [f"replayed {len(result.replayed)} dead letter(s) of {where}"
                 + (": " + ", ".join(str(r["sequenceNumber"]) for r in result.replayed)
                    if result.replayed else "")]
        lines += [f"failed {f['sequenceNumber']}: {printable(f['error'])}"
                  for f in result.failed]
        if result.not_found:
            lines.append("not found: " + ", ".join(map(str, result.not_found)))
        emit(doc, "\n".join(lines))
        if result.failed:
            print(f"error: {len(result.failed)} dead letter(s) could not be replayed", file=err)
            return EXIT_FAILED
        if result.not_found:
            print("error: some IDs are not in the dead-letter queue", file=err)
            return EXIT_FAILED
        return EXIT_OK

    if command == "purge":
        where, purged = _on_targets(args, err, lambda ops, targets: ops.purge(targets),
                                    PurgeResult)
        doc = {"purged": purged.purged, "notFound": purged.not_found}
        text = f"purged {purged.purged} dead letter(s) of {where}"
        if purged.not_found:
            text += "\nnot found: " + ", ".join(map(str, purged.not_found))
        emit(doc, text)
        if purged.not_found:
            print("error: some IDs are not in the dead-letter queue", file=err)
            return EXIT_FAILED
        return EXIT_OK
    raise UsageError(f"unknown command {command!r}")  # argparse prevents this


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    try:
        args = build_parser().parse_args(args_list)
        return run(args, out, err)
    except UsageError as exc:
        print(f"error: {printable(str(exc), keep=chr(10))}", file=err)
        if as_json:
            out.write(json_document({"error": str(exc)}) + "\n")
        return EXIT_USAGE
    except Failure as exc:
        print(f"error: {printable(str(exc), keep=chr(10))}", file=err)
        if as_json:
            doc = {"error": str(exc), **{k: v for k, v in exc.extra.items() if v is not None}}
            out.write(json_document(doc) + "\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130

