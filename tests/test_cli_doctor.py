"""The endpoint doctor: `check-endpoint` and `explain-signature`, as an operator runs them.

`check-endpoint` runs against the real local host over loopback (right token, wrong token,
stopped host, https to its plain-HTTP port) and against a small HTTP server started here for
what the local host never does (answer slowly, redirect, a 401 from a Functions host, a body
that is not JSON). `explain-signature` reads real files; its Key Vault path runs the app's
token provider over the fake SecretClient (the boundary).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import pytest

from shared.cli import commands as cli
from shared.cli import doctor
from shared.events import peek_envelope

from .fakes import FakeSecretClient
from .support import TOKEN, WEBHOOK, RunningHost, local_env, wait_until

ROOT = Path(__file__).resolve().parent.parent
OTHER_TOKEN = "not-the-receivers-token-3f9a"


def sign(token: str, message: bytes | str) -> str:
    data = message.encode() if isinstance(message, str) else message
    return hmac.new(token.encode(), data, hashlib.sha256).hexdigest()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = local_env(tmp_path)
    for name in ("ServiceBusConnection__fullyQualifiedNamespace", "KEY_VAULT_URI",
                 "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class TestTokensThatAreNotUtf8:
    """A --token holding bytes that are not UTF-8 (the shell hands them over as lone
    surrogates) is a usage error, never echoed, instead of a traceback in the HMAC."""

    @pytest.mark.parametrize("argv", [
        ["send", "--url", "http://127.0.0.1:9/api/webhooks/smartcar"],
        ["check-endpoint", "http://127.0.0.1:9/api/webhooks/smartcar"],
        ["explain-signature", "--body", "body.json", "--signature", "abc"],
    ])
    def test_a_token_that_is_not_utf8_is_a_usage_error(
        self, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        argv: list[str]
    ) -> None:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "body.json").write_bytes(b'{"eventType":"VERIFY"}')
        code, out, err = run(*argv, "--token", "secret-amt-\udcff", "--json")
        assert code == 2, err
        error = json.loads(out)["error"]
        assert "argument --token: the token is not valid UTF-8 text" in error
        assert "secret-amt" not in out + err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# A small receiver that misbehaves on purpose.
# ---------------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Behaviour = Callable[[bytes], Reply]


class StartServer(Protocol):
    """The `server` fixture: starts a receiver that answers with `behave` (over TLS with
    `tls`, a certificate and its key) and returns its webhook URL."""

    def __call__(self, behave: Behaviour, tls: tuple[Path, Path] | None = None) -> str: ...


def hashing(token: str = TOKEN, *, older_format: bool = True, delay: float = 0.0) -> Behaviour:
    """Answers VERIFY as a correct receiver would (optionally not the older format)."""
    def behave(body: bytes) -> Reply:
        envelope = peek_envelope(body)
        if envelope.challenge_path == "payload.challenge" and not older_format:
            return Reply(400, b'{"error":"unknown format"}', {"Content-Type": "application/json"})
        answer = json.dumps({"challenge": sign(token, envelope.challenge or "")}).encode()
        return Reply(200, answer, {"Content-Type": "application/json"}, delay)
    return behave


@pytest.fixture
def server() -> Iterator[StartServer]:
    servers: list[ThreadingHTTPServer] = []

    def start(behave: Behaviour, tls: tuple[Path, Path] | None = None) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                reply = behave(body)
                time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up waiting: that is the test

            def log_message(self, *args: Any) -> None:
                return None

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        servers.append(httpd)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{httpd.server_address[1]}{WEBHOOK}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------------------------
# 1. check-endpoint against the local host.
# ---------------------------------------------------------------------------------------------
class TestCheckEndpointOnTheLocalHost:
    def test_a_healthy_receiver_passes_and_stores_the_test_event(
        self, env: dict[str, str]
    ) -> None:
        with RunningHost(env) as host:
            url = f"http://127.0.0.1:{host.port}{WEBHOOK}"
            code, out, err = run("check-endpoint", url, "--send-test-event", "--json")
            assert (code, err) == (0, "")
            doc = json.loads(out)
            assert doc["passed"] is True and doc["reason"] is None
            assert [c["check"] for c in doc["checks"]] == [
                "VERIFY (eventType VERIFY)", 'VERIFY (older eventName "verify")',
                "test event (VEHICLE_STATE, mode TEST)"]
            assert all(c["passed"] and c["status"] == 200 for c in doc["checks"])
            assert all(0 < c["latencyMs"] < 15000 for c in doc["checks"])
            accepted = json.loads(doc["checks"][2]["answer"])
            assert accepted["status"] == "accepted"
            handled = wait_until(lambda: [h for h in host.handled()
                                          if h["eventId"] == accepted["eventId"]])
            assert handled[0]["eventType"] == "VEHICLE_STATE"

    def test_text_output_says_pass_per_check(self, env: dict[str, str]) -> None:
        with RunningHost(env) as host:
            code, out, _ = run("check-endpoint", f"http://127.0.0.1:{host.port}{WEBHOOK}")
        lines = out.splitlines()
        assert code == 0 and len(lines) == 4
        assert lines[1].startswith("PASS  VERIFY (eventType VERIFY): 200 in ")
        assert lines[1].endswith(" ms; challenge HMAC matches")
        assert lines[2].startswith('PASS  VERIFY (older eventName "verify"): 200 in ')
        assert lines[3] == "passed: the endpoint answers as Smartcar expects"

    def test_a_wrong_token_fails_with_the_hmac_mismatch_in_one_line(
        self, env: dict[str, str]
    ) -> None:
        with RunningHost(env) as host:
            url = f"http://127.0.0.1:{host.port}{WEBHOOK}"
            code, out, err = run("check-endpoint", url, "--token", OTHER_TOKEN,
                                 "--send-test-event")
        assert code == 1
        assert err.count("\n") == 1 and err.startswith("error: VERIFY (eventType VERIFY): ")
        assert "the receiver uses a different management token" in err
        assert "FAIL  test event (VEHICLE_STATE, mode TEST): answered 401 'invalid signature': " \
               "the receiver's management token differs from the one used here" in out
        assert OTHER_TOKEN not in out + err

    def test_a_stopped_host_fails_once_and_says_nothing_listens(
        self, env: dict[str, str]
    ) -> None:
        with RunningHost(env) as host:
            port = host.port
        code, out, err = run("check-endpoint", f"http://127.0.0.1:{port}{WEBHOOK}", "--json",
                             "--send-test-event")
        assert code == 1
        doc = json.loads(out)
        (check,) = doc["checks"]  # the next checks would only wait and fail the same way
        assert check["status"] is None
        assert check["reason"].startswith(f"nothing listens on 127.0.0.1:{port} "
                                          "(connection refused)")
        assert err == f"error: VERIFY (eventType VERIFY): {check['reason']}\n"

    def test_https_to_the_plain_http_port_is_explained_as_tls(
        self, env: dict[str, str]
    ) -> None:
        with RunningHost(env) as host:
            code, _, err = run("check-endpoint", f"https://127.0.0.1:{host.port}{WEBHOOK}")
        assert code == 1
        assert f"TLS error talking to 127.0.0.1:{host.port}" in err
        assert "is it a plain-HTTP port" in err

    def test_a_wrong_route_is_a_404_naming_the_data_route(self, env: dict[str, str]) -> None:
        with RunningHost(env) as host:
            code, _, err = run("check-endpoint", f"http://127.0.0.1:{host.port}/api/webhook")
        assert code == 1
        assert "answered 404: nothing at /api/webhook; the data callback route is " \
               "/api/webhooks/smartcar" in err

    @pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(),
                        reason="make uses the .venv that make test (or make run) created")
    def test_the_make_target_checks_with_a_test_event_and_shows_no_token(
        self, env: dict[str, str]
    ) -> None:
        with RunningHost(env) as host:
            url = f"http://127.0.0.1:{host.port}{WEBHOOK}"
            done = subprocess.run(
                ["make", "-s", "check-endpoint", f"URL={url}", f"TOKEN={TOKEN}", "TEST_EVENT=1",
                 "JSON=1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
            wrong = subprocess.run(
                ["make", "-s", "check-endpoint", f"URL={url}", f"TOKEN={OTHER_TOKEN}"],
                cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert [c["passed"] for c in json.loads(done.stdout)["checks"]] == [True, True, True]
        assert wrong.returncode != 0 and "different management token" in wrong.stderr
        assert OTHER_TOKEN not in wrong.stdout + wrong.stderr

    def test_a_receiver_still_on_the_previous_token_passes_with_a_note(
        self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with RunningHost(env) as host:  # the host answers with its token, TOKEN
            monkeypatch.setenv("SMARTCAR_MANAGEMENT_TOKEN", OTHER_TOKEN)
            monkeypatch.setenv("SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN", TOKEN)
            code, out, _ = run("check-endpoint", f"http://127.0.0.1:{host.port}{WEBHOOK}")
        assert code == 0
        assert "challenge HMAC matches; with the previous token (environment)" in out

    def test_the_key_vault_token_is_read_through_the_apps_provider(
        self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        vault = FakeSecretClient()
        vault.set_secret(TOKEN)
        monkeypatch.delenv("SMARTCAR_MANAGEMENT_TOKEN")
        monkeypatch.setenv("KEY_VAULT_URI", "https://kv-test.vault.azure.net/")
        monkeypatch.setattr(doctor, "secret_client", lambda uri, settings: vault)
        with RunningHost(env) as host:  # the host itself signs with env's token, the same
            code, out, err = run("check-endpoint", f"http://127.0.0.1:{host.port}{WEBHOOK}")
        assert (code, err) == (0, ""), out
        assert vault.names and set(vault.names) == {"smartcar-management-token"}


# ---------------------------------------------------------------------------------------------
# 2. check-endpoint against receivers that misbehave.
# ---------------------------------------------------------------------------------------------
class TestCheckEndpointFailures:
    def test_no_answer_within_the_timeout(self, env: dict[str, str],
                                          server: StartServer) -> None:
        url = server(hashing(delay=3.0))
        started = time.monotonic()
        code, _, err = run("check-endpoint", url, "--timeout", "0.5")
        assert time.monotonic() - started < 2.5  # one wait, not one per check
        assert code == 1
        assert "timeout: no answer from 127.0.0.1:" in err and "within 0.5 s" in err

    def test_a_slow_but_correct_answer_fails_the_latency_budget(
        self, env: dict[str, str], server: StartServer
    ) -> None:
        url = server(hashing(delay=0.4))
        code, out, _ = run("check-endpoint", url, "--max-seconds", "0.1", "--json",
                           "--send-test-event")
        assert code == 1
        reasons = [c["reason"] for c in json.loads(out)["checks"]]
        assert len(reasons) == 3  # an answer came: the test event is still sent
        assert all(r.startswith("answered in ") and "slower than 0.1 s" in r for r in reasons)
        code, _, _ = run("check-endpoint", url, "--max-seconds", "5")
        assert code == 0

    def test_both_formats_are_sent_and_checked(self, env: dict[str, str],
                                               server: StartServer) -> None:
        code, out, err = run("check-endpoint", server(hashing(older_format=False)), "--json")
        assert code == 1
        current, older = json.loads(out)["checks"]
        assert current["passed"] and not older["passed"]
        assert older["reason"] == 'answered 400: {"error":"unknown format"}'
        assert err.startswith('error: VERIFY (older eventName "verify"): answered 400')

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
    def test_an_untrusted_certificate_is_explained_as_tls(
        self, env: dict[str, str], server: StartServer, tmp_path: Path
    ) -> None:
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        url = server(hashing(), tls=(cert, key)).replace("http://", "https://")
        code, _, err = run("check-endpoint", url)
        assert code == 1
        assert "TLS error: the certificate of 127.0.0.1:" in err
        assert "self-signed certificate" in err
        assert "Smartcar needs a publicly trusted certificate" in err

    def test_a_connection_closed_without_an_answer(self, env: dict[str, str]) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def close_each() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # the test closed the listener: done
                    return
                conn.recv(65536)
                conn.close()

        closer = threading.Thread(target=close_each, daemon=True)
        closer.start()
        try:
            code, _, err = run("check-endpoint", f"http://127.0.0.1:{port}{WEBHOOK}")
        finally:
            listener.close()
        assert code == 1
        assert f"127.0.0.1:{port} closed the connection without an answer" in err

    def test_a_redirect_names_its_target_without_the_function_key(
        self, env: dict[str, str], server: StartServer
    ) -> None:
        target = "https://app.example.net/api/webhooks/smartcar?code=s3cr3t-key"
        url = server(lambda body: Reply(307, b"", {"Location": target}))
        code, _, err = run("check-endpoint", url)
        assert code == 1
        assert "answered 307 redirect to https://app.example.net/api/webhooks/smartcar?" \
               "code=REDACTED: Smartcar does not follow redirects" in err
        assert "s3cr3t-key" not in err

    @pytest.mark.parametrize(
        ("query", "cause"),
        [("", "the Functions host wants the function key: add ?code=<key>"),
         ("?code=stale-key", "the function key in ?code= is not valid for this function")],
    )
    def test_a_401_from_the_functions_host_is_a_function_key_problem(
        self, env: dict[str, str], server: StartServer, query: str, cause: str
    ) -> None:
        url = server(lambda body: Reply(401)) + query
        code, out, err = run("check-endpoint", url)
        assert code == 1
        assert f"answered 401 before the function ran (no JSON error): {cause}" in err
        assert "stale-key" not in out + err

    @pytest.mark.parametrize(
        ("reply", "reason"),
        [
            (Reply(200, b"ok", {"Content-Type": "text/plain"}),
             "answered Content-Type 'text/plain'; Smartcar wants application/json"),
            (Reply(200, b"not json", {"Content-Type": "application/json"}),
             "answered 200 with a body that is not JSON: 'not json'"),
            (Reply(200, b'{"status":"ok"}', {"Content-Type": "application/json"}),
             'answered \'{"status":"ok"}\', not {"challenge": "<hex HMAC>"}'),
            (Reply(503, b'{"error":"signing token unavailable"}'),
             "answered 503: the receiver could not read its signing token or store the event"),
        ],
    )
    def test_wrong_answers_are_each_named(self, env: dict[str, str],
                                          server: StartServer,
                                          reply: Reply, reason: str) -> None:
        code, _, err = run("check-endpoint", server(lambda body: reply))
        assert code == 1
        assert err.startswith(f"error: VERIFY (eventType VERIFY): {reason}")

    def test_human_output_escapes_control_characters_json_keeps_them(
        self, env: dict[str, str], server: StartServer
    ) -> None:
        url = server(lambda body: Reply(500, b"boom \x1b[31mred\x07"))
        code, out, err = run("check-endpoint", url)
        assert code == 1
        assert "\x1b" not in out + err and "\x07" not in out + err
        assert "boom \\x1b[31mred\\x07" in out
        code, out, _ = run("check-endpoint", url, "--json")
        assert json.loads(out)["checks"][0]["answer"] == "boom \x1b[31mred\x07"

    def test_a_url_that_is_not_http_is_a_usage_error(self, env: dict[str, str]) -> None:
        code, _, err = run("check-endpoint", "ftp://example.net/x")
        assert code == 2 and "URL must be an http(s) URL" in err


# ---------------------------------------------------------------------------------------------
# 3. explain-signature.
# ---------------------------------------------------------------------------------------------
BODY = '{"eventId": "e-1", "data": {"value": 1.0, "name": "Zoë"}}'


def explain(tmp_path: Path, body: bytes, signature: str, *extra: str) -> tuple[int, Any, str]:
    path = tmp_path / "body.json"
    path.write_bytes(body)
    code, out, err = run("explain-signature", "--body", str(path), "--signature", signature,
                         "--json", *extra)
    return code, json.loads(out), err


def js(doc: Any, **kwargs: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, **kwargs).encode()


PARSED = {"eventId": "e-1", "data": {"value": 1, "name": "Zoë"}}  # as JavaScript reads it


class TestExplainSignature:
    def test_the_exact_body_and_current_token_are_accepted(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        code, doc, err = explain(tmp_path, BODY.encode(), sign(TOKEN, BODY))
        assert (code, err) == (0, "")
        assert doc["acceptedByReceiver"] is True
        assert doc["match"] == {"token": "current token (environment)",
                                "body": "the body as given", "signature": "as given"}
        assert doc["tried"] == 1

    def test_the_previous_token_is_tried_second_and_explained(
        self, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN", OTHER_TOKEN)
        code, doc, _ = explain(tmp_path, BODY.encode(), sign(OTHER_TOKEN, BODY))
        assert code == 0 and doc["tried"] == 2
        assert doc["match"]["token"] == "previous token (environment)"
        assert "keep that Key Vault version enabled" in doc["explanation"]

    @pytest.mark.parametrize(
        ("signed", "label"),
        [
            (js(PARSED, separators=(",", ":")),
             "re-serialised compact, as JavaScript's JSON.stringify(body) writes it"),
            (js(PARSED, indent=2),
             "re-serialised indented by 2, as JSON.stringify(body, null, 2) writes it"),
            (json.dumps(json.loads(BODY.replace(": ", ":"))).encode(),
             "re-serialised with Python's json.dumps(body)"),
            (json.dumps(json.loads(BODY), separators=(",", ":")).encode(),
             "re-serialised compact with non-ASCII escaped"),
            (js(json.loads(BODY), indent=4), "re-serialised indented by 4"),
            (js(PARSED, separators=(",", ":"), sort_keys=True),
             "re-serialised compact with keys sorted"),
            (json.dumps(json.loads(BODY), sort_keys=True).encode(),
             "re-serialised with keys sorted, as json.dumps(body, sort_keys=True) writes it"),
        ],
    )
    def test_a_reserialised_body_is_named(self, env: dict[str, str], tmp_path: Path,
                                          signed: bytes, label: str) -> None:
        given = BODY.encode() if "Python's json.dumps" not in label else \
            BODY.replace(": ", ":").encode()
        assert signed != given
        code, doc, _ = explain(tmp_path, given, sign(TOKEN, signed))
        assert code == 1 and doc["acceptedByReceiver"] is False
        assert doc["match"]["body"] == label
        assert "something parsed and re-wrote the body" in doc["explanation"]

    @pytest.mark.parametrize(
        ("given", "signed", "label"),
        [
            (BODY + "\n", BODY, "with its trailing newline removed"),
            (BODY, BODY + "\n", "with a trailing newline added"),
            ('{\r\n "a": 1\r\n}', '{\n "a": 1\n}', "with CRLF line ends turned into LF"),
            ('{\n "a": 1\n}', '{\r\n "a": 1\r\n}', "with LF line ends turned into CRLF"),
        ],
    )
    def test_a_newline_change_is_named(self, env: dict[str, str], tmp_path: Path,
                                       given: str, signed: str, label: str) -> None:
        code, doc, _ = explain(tmp_path, given.encode(), sign(TOKEN, signed))
        assert code == 1 and doc["match"]["body"] == label
        assert "gained or lost a newline" in doc["explanation"]

    @pytest.mark.parametrize(
        ("transform", "label"),
        [
            (str.upper, "once lowercased"),
            (lambda s: s + "\n", "once the surrounding whitespace is removed"),
            (lambda s: " " + s.upper() + "\r\n",
             "once lowercased and the surrounding whitespace removed"),
            (lambda s: "sha256=" + s, "once its 'sha256=' prefix is removed"),
        ],
    )
    def test_the_digests_case_and_whitespace_are_named(
        self, env: dict[str, str], tmp_path: Path, transform: Callable[[str], str], label: str
    ) -> None:
        code, doc, _ = explain(tmp_path, BODY.encode(), transform(sign(TOKEN, BODY)))
        assert code == 1 and doc["match"]["signature"] == label
        assert doc["match"]["body"] == "the body as given"
        assert "Smartcar sends lowercase hex" in doc["explanation"]

    def test_space_around_the_header_value_is_what_the_receiver_itself_ignores(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        code, doc, _ = explain(tmp_path, BODY.encode(), " " + sign(TOKEN, BODY) + "\t")
        assert code == 0 and doc["acceptedByReceiver"] is True

    def test_body_and_signature_changes_together(self, env: dict[str, str],
                                                 tmp_path: Path) -> None:
        code, doc, _ = explain(tmp_path, (BODY + "\n").encode(), sign(TOKEN, BODY).upper())
        assert code == 1
        assert doc["match"]["body"] == "with its trailing newline removed"
        assert doc["match"]["signature"] == "once lowercased"

    def test_no_match_says_what_was_tried_and_the_likely_cause(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        code, doc, err = explain(tmp_path, BODY.encode(), sign(OTHER_TOKEN, BODY))
        assert code == 1 and doc["match"] is None and doc["tried"] >= 8
        assert "sender signs with another Application Management Token" in doc["explanation"]
        assert "not 64 hex digits" not in doc["explanation"]
        assert err == "error: the receiver refuses this signature for this body\n"
        _, short, _ = explain(tmp_path, BODY.encode(), sign(TOKEN, BODY)[:40])
        assert "The signature is not 64 hex digits (40 characters)" in short["explanation"]

    def test_the_token_is_never_printed(self, env: dict[str, str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
        secret = "tok-" + "9" * 30
        monkeypatch.setenv("SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN", secret)
        path = tmp_path / "body.json"
        path.write_text(BODY)
        for signature in (sign(secret, BODY), sign(secret, BODY).upper(), "00"):
            for extra in ((), ("--json",), ("--token", secret)):
                _, out, err = run("explain-signature", "--body", str(path),
                                  "--signature", signature, *extra)
                assert secret not in out + err

    def test_key_vault_current_and_previous_through_the_apps_provider(
        self, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        vault = FakeSecretClient()
        vault.set_secret("old-token-in-vault")
        vault.set_secret("new-token-in-vault")
        monkeypatch.delenv("SMARTCAR_MANAGEMENT_TOKEN")
        monkeypatch.setenv("KEY_VAULT_URI", "https://kv-test.vault.azure.net/")
        monkeypatch.setenv("SMARTCAR_TOKEN_SECRET_NAME", "amt-secret")
        monkeypatch.setattr(doctor, "secret_client", lambda uri, settings: vault)
        code, doc, _ = explain(tmp_path, BODY.encode(), sign("old-token-in-vault", BODY))
        assert code == 0
        assert doc["match"]["token"] == "previous token (Key Vault secret amt-secret)"
        vault.disable("v1")  # the rotation is over: the old token no longer counts
        code, doc, _ = explain(tmp_path, BODY.encode(), sign("old-token-in-vault", BODY))
        assert code == 1 and doc["match"] is None

    def test_a_key_vault_that_cannot_be_read_is_a_failure_saying_what_to_do(
        self, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        vault = FakeSecretClient()
        vault.fail_with = PermissionError("Forbidden")
        monkeypatch.delenv("SMARTCAR_MANAGEMENT_TOKEN")
        monkeypatch.setenv("KEY_VAULT_URI", "https://kv-test.vault.azure.net/")
        monkeypatch.setattr(doctor, "secret_client", lambda uri, settings: vault)
        path = tmp_path / "body.json"
        path.write_text(BODY)
        code, out, err = run("explain-signature", "--body", str(path), "--signature", "00")
        assert code == 1 and out == ""
        assert "could not be read from Key Vault secret 'smartcar-management-token'" in err
        assert "pass --token" in err and "Traceback" not in err

    def test_a_missing_body_file_is_a_usage_error(self, env: dict[str, str],
                                                  tmp_path: Path) -> None:
        code, _, err = run("explain-signature", "--body", str(tmp_path / "nope.json"),
                           "--signature", "00")
        assert code == 2 and "cannot read --body" in err

    def test_the_body_can_come_from_standard_input(self, env: dict[str, str]) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "shared.cli", "explain-signature", "--body", "-",
             "--signature", sign(TOKEN, BODY), "--token", TOKEN],
            input=BODY.encode(), capture_output=True, cwd=ROOT, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert b"the receiver accepts it" in done.stdout


# ---------------------------------------------------------------------------------------------
# 4. Which token the tools use: the app's, by the app's precedence.
# ---------------------------------------------------------------------------------------------
class TestTheAppsTokenPrecedence:
    """With KEY_VAULT_URI and SMARTCAR_MANAGEMENT_TOKEN both set, the app verifies with the
    Key Vault secret (shared/runtime.py): so do send, check-endpoint and explain-signature,
    instead of checking a token the receiver does not use."""

    @pytest.fixture
    def vault(self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FakeSecretClient:
        vault = FakeSecretClient()
        vault.set_secret("token-in-vault")
        monkeypatch.setenv("SMARTCAR_MANAGEMENT_TOKEN", "stale-token-in-env")
        monkeypatch.setenv("KEY_VAULT_URI", "https://kv-test.vault.azure.net/")
        monkeypatch.setattr(doctor, "secret_client", lambda uri, settings: vault)
        return vault

    def test_explain_signature_uses_the_key_vault_secret(
        self, vault: FakeSecretClient, tmp_path: Path
    ) -> None:
        code, doc, _ = explain(tmp_path, BODY.encode(), sign("token-in-vault", BODY))
        assert code == 0
        assert doc["match"]["token"] == "current token (Key Vault secret smartcar-management-token)"

    def test_check_endpoint_and_send_use_the_key_vault_secret(
        self, vault: FakeSecretClient, server: StartServer
    ) -> None:
        url = server(hashing("token-in-vault"))
        code, out, err = run("check-endpoint", url)
        assert (code, err) == (0, ""), out
        code, out, err = run("send", "--url", url, "--type", "verify", "--json")
        assert code == 0, err
        assert json.loads(out)["challengeVerified"] is True


class TestUrlsThatDoNotParse:
    """A port outside 0-65535 or an IPv6 host left open made urlsplit (or .port) raise: a
    traceback, exit 1 and nothing on stdout under --json. Now a usage error like any other
    bad URL, with the function key still redacted."""

    @pytest.mark.parametrize("url", ["http://127.0.0.1:99999/api/webhooks/smartcar",
                                     "http://127.0.0.1:port/api/webhooks/smartcar",
                                     "http://[::1/api/webhooks/smartcar?code=k3y"])
    @pytest.mark.parametrize("command", [["send", "--url"], ["check-endpoint"]])
    def test_a_url_that_does_not_parse_is_a_usage_error(
        self, env: dict[str, str], url: str, command: list[str]
    ) -> None:
        code, out, err = run(*command, url, "--json")
        assert code == 2, err
        assert "must be an http(s) URL" in json.loads(out)["error"]
        assert "k3y" not in out + err and "Traceback" not in err


class TestDeeplyNestedBodies:
    """Valid JSON nested deeper than the recursion limit parsed, then crashed re-writing it
    (RecursionError from `_js_numbers`): a traceback instead of an explanation."""

    @pytest.mark.parametrize("depth", [1500, 5000])
    def test_a_deeply_nested_body_is_still_explained(self, env: dict[str, str],
                                                     tmp_path: Path, depth: int) -> None:
        body = b"[" * depth + b"]" * depth
        code, doc, err = explain(tmp_path, body, sign("t", body), "--token", "t")
        assert code == 0, err
        assert doc["acceptedByReceiver"] is True
        code, doc, err = explain(tmp_path, body, "abc", "--token", "t")
        assert code == 1 and doc["match"] is None
        assert "No match" in doc["explanation"] and "Traceback" not in err


class TestInputsTooLargeToBeABody:
    """--file and --body were read whole: /dev/zero (or a wrong file) ran the reader out of
    memory (MemoryError traceback). They are read up to 16 MiB, far over any webhook body."""

    def test_more_than_the_bound_is_a_usage_error(self, env: dict[str, str],
                                                  tmp_path: Path) -> None:
        from shared.cli.arguments import MAX_INPUT_BYTES

        big = tmp_path / "big.json"
        with big.open("wb") as file:
            file.truncate(MAX_INPUT_BYTES + 1)  # sparse: no disk, no memory
        for argv in (["explain-signature", "--body", str(big), "--signature", "00",
                      "--token", "t"],
                     ["send", "--url", "http://127.0.0.1:9/x", "--file", str(big)]):
            code, out, err = run(*argv, "--json")
            assert code == 2, err
            assert f"{big} holds more than 16 MiB" in json.loads(out)["error"]

    def test_up_to_the_bound_is_read(self, env: dict[str, str], tmp_path: Path) -> None:
        from shared.cli.arguments import MAX_INPUT_BYTES

        body = tmp_path / "body.json"
        with body.open("wb") as file:
            file.truncate(MAX_INPUT_BYTES)
        code, out, err = run("explain-signature", "--body", str(body), "--signature", "00",
                             "--token", "t", "--json")
        assert code == 1, err  # read, and explained: no match
        assert json.loads(out)["bytes"] == MAX_INPUT_BYTES
