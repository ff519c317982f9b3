"""Raw HTTP requests for the differential test (test_http_differential.py): hand-written
smuggling and framing vectors, and mutations of well-formed requests generated from a seed.

Every item is the bytes one client sends on one connection before closing its side: one
request, or several pipelined. Bodies stay far below MAX_BODY_BYTES, so a body the host hands
over is whole.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

SEED = 21
GENERATED = 3000

WEBHOOK = b"/api/webhooks/smartcar"
HEALTH = b"/api/health"
BODY = b'{"eventId":"e-1","eventType":"VEHICLE_STATE","data":{"vehicle":{"id":"v"}}}'

_CRLF = b"\r\n"


def post(fields: list[bytes], body: bytes = BODY, *, target: bytes = WEBHOOK,
         version: bytes = b"HTTP/1.1") -> bytes:
    head = b"POST " + target + b" " + version + _CRLF + b"Host: 127.0.0.1" + _CRLF
    return head + b"".join(f + _CRLF for f in fields) + _CRLF + body


def chunked(body: bytes = BODY, pieces: int = 2, *, trailer: bytes = b"") -> bytes:
    step = max(1, len(body) // pieces)
    out = b""
    for start in range(0, len(body), step):
        piece = body[start:start + step]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n" + trailer + _CRLF


GET_HEALTH = b"GET " + HEALTH + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CL = post([b"Content-Length: %d" % len(BODY), b"Content-Type: application/json"])
TE = post([b"Transfer-Encoding: chunked"], chunked())


def hand_written() -> list[bytes]:
    length = b"%d" % len(BODY)
    vectors = [
        CL, TE, GET_HEALTH, CL + GET_HEALTH, TE + CL, GET_HEALTH * 3,
        post([b"Content-Length: " + length, b"Connection: close"]) + GET_HEALTH,
        post([b"Content-Length: " + length], version=b"HTTP/1.0") + GET_HEALTH,
        post([b"Content-Length: " + length, b"Connection: keep-alive"],
             version=b"HTTP/1.0") + GET_HEALTH,
        post([b"Content-Length: " + length, b"Expect: 100-continue"]),
        post([b"Transfer-Encoding: chunked"], chunked(pieces=5, trailer=b"X-T: 1\r\n")),
        post([b"Transfer-Encoding: chunked"], b"3;name=value\r\n{\"a\r\n0\r\n\r\n"),
    ]
    # CL.TE and TE.CL, differing and listed lengths.
    smuggled = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    vectors += [
        post([b"Content-Length: 6", b"Transfer-Encoding: chunked"], b"0\r\n\r\n" + smuggled),
        post([b"Transfer-Encoding: chunked", b"Content-Length: 6"], b"0\r\n\r\n" + smuggled),
        post([b"Content-Length: 3", b"Content-Length: 4"], b"abcd"),
        post([b"Content-Length: 3, 4"], b"abcd"),
        post([b"Content-Length: 3, 3"], b"abc"),
        post([b"Content-Length: 3", b"Content-Length: 3"], b"abc"),
    ]
    # TE.TE: obfuscated codings, and the bytes str.strip() removes around a value.
    for value in (b"chunked\xa0", b"\xa0chunked", b"chunked\x85", b"chunked\x0b", b"chunked\x0c",
                  b"chunked\x1c", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked",
                  b"xchunked", b"chunked, identity", b"identity, chunked", b"gzip, chunked",
                  b"chunked, chunked", b"chunked;q=1", b'"chunked"', b"chunk", b"chunked\x00"):
        vectors.append(post([b"Transfer-Encoding: " + value], chunked() + smuggled))
        vectors.append(post([b"Transfer-Encoding: " + value, b"Content-Length: 4"],
                            b"0\r\n\r\n" + smuggled))
    vectors.append(post([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                        chunked()))
    vectors.append(post([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], chunked()))
    vectors.append(post([b"Transfer-Encoding : chunked"], chunked() + smuggled))
    vectors.append(post([b"Transfer-Encoding:\x0bchunked"], chunked() + smuggled))
    vectors.append(post([b"Transfer-Encoding: chunked"], chunked() + smuggled,
                        version=b"HTTP/1.0"))
    for value in (b"+3", b"-3", b"3.0", b"0x3", b" 3", b"3 ", b"3\xa0", b"\xa03", b"3\x85",
                  b"03", b"99999999999999999999999", b"", b"3\x00", b"\xef\xbc\x93"):
        vectors.append(post([b"Content-Length: " + value], b"abc" + smuggled))
    for value in (b"close\xa0", b"close\x85", b"\xa0close", b"keep-alive\xa0", b"close, x",
                  b"Close", b"upgrade"):
        vectors.append(post([b"Content-Length: 3", b"Connection: " + value], b"abc")
                       + GET_HEALTH)
    # Line folding, NUL, bare CR and bare LF in every place.
    vectors += [
        post([b"Content-Length: 3", b" folded"], b"abc"),
        post([b"X: 1", b"\tTransfer-Encoding: chunked", b"Content-Length: 3"], b"abc"),
        post([b"Content-Length: 3", b"X: a\x00b"], b"abc"),
        post([b"Content-Length: 3", b"X: a\rb"], b"abc"),
        post([b"Content-Length: 3\r"], b"abc"),
        post([b"Content-Length: 3", b"X: 1\r"], b"abc"),
        CL.replace(b"\r\n\r\n", b"\r\n\r\r\n", 1),
        CL.replace(b"\r\n\r\n", b"\r\r\n\r\n", 1),
        CL.replace(b"\r\n", b"\n"),
        CL.replace(b"\r\n", b"\r"),
        CL.replace(b"\r\n\r\n", b"\n\n", 1),
        CL.replace(b"\r\n\r\n", b"\r\n\n", 1),
        GET_HEALTH.replace(b"\r\n", b"\n", 1),
    ]
    # Chunk framing: sizes, extensions, line ends, trailers.
    for size_line in (b"3 ", b" 3", b"3\t", b"+3", b"0x3", b"3;", b"3;a", b"3;a=b", b"3;a=\"b\"",
                      b"3;a b", b"3;\x00", b"3;a=\xa0", b"3 ;a", b"03", b"3\xa0",
                      b"ffffffffffffffffff", b"3\r", b"g"):
        vectors.append(post([b"Transfer-Encoding: chunked"],
                            size_line + b"\r\nabc\r\n0\r\n\r\n") + GET_HEALTH)
    for ending in (b"\n", b"\r", b"\r\r\n", b"", b"XX"):
        vectors.append(post([b"Transfer-Encoding: chunked"],
                            b"3\r\nabc" + ending + b"0\r\n\r\n") + GET_HEALTH)
        vectors.append(post([b"Transfer-Encoding: chunked"],
                            b"3" + ending + b"abc\r\n0\r\n\r\n") + GET_HEALTH)
    for trailer in (b"0\r\n\r\r\n", b"0\r\nX: 1\r\n\r\n", b"0\r\nX 1\r\n\r\n", b"0\r\nX: a\x00\r\n\r\n",
                    b"0\r\n X: 1\r\n\r\n", b"0\r\nX: 1\n\r\n", b"0\r\n\n", b"0\n\n",
                    b"0\r\nContent-Length: 5\r\n\r\n", b"0\r\nTransfer-Encoding: chunked\r\n\r\n"):
        vectors.append(post([b"Transfer-Encoding: chunked"], b"3\r\nabc\r\n" + trailer)
                       + GET_HEALTH)
    # Request lines.
    for line in (b"GET /api/health HTTP/1.1", b"get /api/health HTTP/1.1",
                 b"GET  /api/health HTTP/1.1", b"GET /api/health  HTTP/1.1",
                 b"GET /api/health HTTP/1.1 ", b"GET /api/health", b"GET /api/health HTTP/2.0",
                 b"GET /api/health HTTP/0.9", b"GET /api/health HTTP/1.10", b"GET /api/health http/1.1",
                 b"GET http://127.0.0.1/api/health HTTP/1.1", b"GET * HTTP/1.1",
                 b"GET /api/he alth HTTP/1.1", b"GET /api/health\x00 HTTP/1.1",
                 b"GET\t/api/health HTTP/1.1", b"CONNECT 127.0.0.1:1 HTTP/1.1",
                 b"G\x00T /api/health HTTP/1.1", b"GET /api/health?x=\xa0 HTTP/1.1"):
        vectors.append(line + b"\r\nHost: x\r\n\r\n" + GET_HEALTH)
    vectors.append(b"GET /api/health HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade"
                   b"\r\n\r\n" + GET_HEALTH)
    vectors.append(b"\r\n" + GET_HEALTH)
    vectors.append(b"\r\n\r\n" + GET_HEALTH)
    # Field names.
    for field in (b"Bad Name: 1", b": 1", b"X\x00: 1", b"X\xa0: 1", b"X:1", b"X;: 1",
                  b"Content-Length\x00: 3", b"X: " + b"a" * 5000):
        vectors.append(post([field, b"Content-Length: 3"], b"abc") + GET_HEALTH)
    return vectors


#: Bytes that tell parsers apart: whitespace, line ends, separators, controls, Latin-1 spaces.
_INTERESTING = [b"\x00", b"\t", b" ", b"\r", b"\n", b"\r\n", b"\x0b", b"\x0c", b"\x7f", b"\x85",
                b"\xa0", b"\xff", b",", b";", b":", b"=", b'"', b"0", b"f", b"-", b"+"]


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.randrange(6)
    data = bytearray(raw)
    if kind == 0:  # insert an interesting byte anywhere
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.choice(_INTERESTING)
    elif kind == 1:  # an interesting byte inside or around a framing field's value
        starts = [i for i in range(len(data)) if data[i:i + 1] == b":"]
        if starts:
            at = rng.choice(starts) + rng.randrange(0, 12)
            data[at:at] = rng.choice(_INTERESTING)
    elif kind == 2:  # a line ending changed
        ends = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\r\n"]
        if ends:
            at = rng.choice(ends)
            data[at:at + 2] = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r\n", b""])
    elif kind == 3:  # bytes flipped
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    elif kind == 4:  # a byte deleted or duplicated
        at = rng.randrange(len(data))
        if rng.random() < 0.5:
            del data[at]
        else:
            data[at:at] = data[at:at + 1]
    else:  # a chunk-size line rewritten
        sizes = [i for i in range(len(data) - 2) if data[i:i + 2] == b"\r\n"
                 and chr(data[i + 2]) in "0123456789abcdef"]
        if sizes:
            at = sizes[rng.randrange(len(sizes))] + 2
            end = data.find(b"\r\n", at)
            size = bytes(data[at:end]) if end > 0 else b""
            if size and all(chr(c) in "0123456789abcdefABCDEF" for c in size):
                data[at:end] = rng.choice([
                    size.upper(), b"0" + size, size + b" ", b" " + size, size + b";x",
                    size + b";x=\xa0", size + b"\t", size + b";" + b"e" * rng.randrange(1, 40),
                    size + b"\n", b"%x" % (int(size, 16) + 1)])
    return bytes(data)


_BASES = [CL, TE, GET_HEALTH, CL + GET_HEALTH, TE + GET_HEALTH, TE + CL,
          post([b"Transfer-Encoding: chunked"], chunked(pieces=4, trailer=b"X-T: 1\r\n")),
          post([b"Content-Length: 3", b"Connection: close"], b"abc") + GET_HEALTH,
          post([b"Content-Length: 3"], b"abc", version=b"HTTP/1.0")]


def generated(count: int = GENERATED, seed: int = SEED) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        raw = rng.choice(_BASES)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            raw = _mutate(rng, raw)
        yield raw


def corpus() -> list[bytes]:
    return hand_written() + list(generated())
