"""The command line of the endpoint doctor (shared/cli/doctor.py): parsers and output."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .arguments import read_input
from .doctor import TokenError, resolve_tokens, token_argument
from .endpoint_check import DEFAULT_MAX_SECONDS, SMARTCAR_TIMEOUT_SECONDS, check_endpoint
from .signature_explain import explain_signature
from .simulate import check_url

COMMANDS = frozenset({"check-endpoint", "explain-signature"})
_SIGNING_HELP = ("management token (default: the one the app verifies with: the Key Vault "
                 "secret when KEY_VAULT_URI is set, else SMARTCAR_MANAGEMENT_TOKEN and "
                 "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN, else the development token); never printed")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 60 s, got {text}")
    return value


def add_parsers(commands: Any, json_flag: argparse.ArgumentParser, parser_class: Any) -> None:
    check = commands.add_parser(
        "check-endpoint", parents=[json_flag],
        help="check a receiver as Smartcar does: VERIFY in both formats (exit 0 passes, 1 fails)")
    check.add_argument("url", metavar="URL",
                       help="the callback URI, e.g. http://127.0.0.1:7071/api/webhooks/smartcar "
                            "or https://<app>.azurewebsites.net/api/webhooks/smartcar?code=<key>")
    check.add_argument("--send-test-event", action="store_true",
                       help="then send one signed VEHICLE_STATE in mode TEST")
    check.add_argument("--token", type=token_argument, help=_SIGNING_HELP)
    check.add_argument("--timeout", type=_seconds, default=SMARTCAR_TIMEOUT_SECONDS,
                       help="give up on an answer after this many seconds (15, Smartcar's)")
    check.add_argument("--max-seconds", type=_seconds, default=DEFAULT_MAX_SECONDS,
                       help="an answer slower than this fails (5: Smartcar alerts above 5 s)")

    explain = commands.add_parser(
        "explain-signature", parents=[json_flag],
        help="why SC-Signature matches a body or not (exit 0: the receiver accepts it)")
    explain.add_argument("--body", required=True, type=Path, metavar="FILE",
                         help="the request body, byte for byte ('-': standard input)")
    explain.add_argument("--signature", required=True, metavar="HEX",
                         help="the SC-Signature header value")
    explain.add_argument("--token", type=token_argument, help=_SIGNING_HELP)


def run(args: argparse.Namespace, emit: Callable[[Any, str], None], err: TextIO) -> int:
    """Run one doctor command; UsageError / Failure as the other commands raise them."""
    from ..printable import printable
    from .commands import EXIT_FAILED, EXIT_OK, Failure, UsageError, _settings

    def tokens() -> Any:
        try:
            found = resolve_tokens(args.token, _settings)
        except TokenError as exc:
            raise Failure(str(exc)) from None
        if found.source == "development token":
            print("note: using the development token (SMARTCAR_MANAGEMENT_TOKEN is unset)",
                  file=err)
        return found

    if args.command == "check-endpoint":
        problem = check_url(args.url)
        if problem:
            raise UsageError(problem.replace("--url", "URL"))
        report = check_endpoint(args.url, tokens(), send_test_event=args.send_test_event,
                                timeout=args.timeout, max_seconds=args.max_seconds)
        emit(report.to_json(), report.text())
        if not report.passed:
            print(f"error: {printable(report.reason or 'failed')}", file=err)
            return EXIT_FAILED
        return EXIT_OK

    try:
        raw = read_input(args.body, "--body")
    except OSError as exc:
        raise UsageError(f"cannot read --body {args.body}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    found = tokens()
    explanation = explain_signature(raw, args.signature, found)
    doc = {"body": str(args.body), "bytes": len(raw), **explanation.to_json()}
    lines = [f"body: {args.body} ({len(raw)} bytes); signature: {len(args.signature)} "
             f"characters; tokens: {len(found.values)} ({found.source})"]
    if explanation.match is not None:
        m = explanation.match
        lines.append(f"first match ({explanation.tried} tried): {m.body_label}, signature "
                     f"{m.signature_label}, {explanation.token_label}")
    else:
        lines.append(f"no match ({explanation.tried} tried)")
    lines.append(explanation.sentence())
    emit(doc, "\n".join(lines))
    if not explanation.accepted:
        print("error: the receiver refuses this signature for this body", file=err)
        return EXIT_FAILED
    return EXIT_OK
