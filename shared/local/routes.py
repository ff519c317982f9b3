"""Route templates such as `vehicles/{vehicleId}`, matched as the Functions host matches them.

A parameter is one whole path segment (`{name}`: ASP.NET Core routing's simplest form, the
only one function_app.py uses); constraints, optional and catch-all parameters are refused
when the routes are built, so a route the local host cannot serve fails at start-up instead of
answering 404. A segment must not be empty. The value handed to the function (as
`req.route_params[name]`) is the segment percent-decoded on its own, so an encoded `/` (`%2F`)
stays inside its segment and reaches the function, which refuses it, instead of routing the
request elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class RouteTemplate:
    #: The path as declared, e.g. `/api/vehicles/{vehicleId}`.
    path: str
    #: One entry per segment: the literal text, or None where a parameter goes.
    literals: tuple[str | None, ...]
    #: The parameter names, in the order of the None entries of `literals`.
    names: tuple[str, ...]

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The parameters when `raw_path` (percent-encoded, no query) matches, else None."""
        segments = raw_path.split("/")
        if len(segments) != len(self.literals):
            return None
        params: dict[str, str] = {}
        names = iter(self.names)
        for literal, raw in zip(self.literals, segments, strict=True):
            value = unquote(raw)
            if literal is None:
                if not value:
                    return None
                params[next(names)] = value
            elif value != literal:
                return None
        return params


def route_template(path: str) -> RouteTemplate | None:
    """The template of `path`, or None for a path without parameters. ValueError for a
    parameter the local host cannot serve (what came, and what it serves)."""
    if "{" not in path and "}" not in path:
        return None
    literals: list[str | None] = []
    names: list[str] = []
    for segment in path.split("/"):
        if "{" not in segment and "}" not in segment:
            literals.append(segment)
            continue
        match = _PARAMETER.fullmatch(segment)
        if match is None:
            raise ValueError(
                f"route {path!r}: the local host serves parameters that are a whole segment "
                f"named with letters, digits and '_' ({{name}}), got segment {segment!r}"
            )
        if match.group(1) in names:
            raise ValueError(f"route {path!r} names the parameter {match.group(1)!r} twice")
        literals.append(None)
        names.append(match.group(1))
    return RouteTemplate(path, tuple(literals), tuple(names))
