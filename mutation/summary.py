"""Reads mutmut's results (mutants/) into one score per module, minus the reviewed equivalents.

mutmut 3 writes, per mutated file, `mutants/<path>.meta` (JSON: `exit_code_by_key` maps each
mutant, e.g. `shared.tokens.xǁKeyVaultTokenProviderǁ_load__mutmut_7`, to the exit code of its
test run) and the mutated source `mutants/<path>`, where every mutant is a copy of its function
named after the key next to the original (`..._load__mutmut_orig`). The mutation itself is the
difference between the two, which is how `equivalent.toml` names a mutant: numbers change
whenever the code does, the changed line does not.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MUTATED_SUFFIX = "__mutmut_"
ORIGINAL = "__mutmut_orig"

# mutmut's exit codes (mutmut/stats.py): 1 and 3 are failing test runs, the timeouts count as
# killed too (mutmut's own score does the same); 0 survived; 5/33 no test reached the code.
KILLED_CODES = frozenset({1, 3, 36, 24, -24, 152, 255, 37})
SURVIVED_CODES = frozenset({0})
NO_TESTS_CODES = frozenset({5, 33})


@dataclass(frozen=True, slots=True)
class Mutation:
    """One mutant: where it is and what it changes (stripped source lines)."""

    key: str
    module: str
    function: str
    before: str
    after: str


@dataclass(frozen=True, slots=True)
class Equivalent:
    module: str
    function: str
    before: str
    after: str
    why: str

    def matches(self, m: Mutation) -> bool:
        return (self.module, self.function, self.before, self.after) == (
            m.module, m.function, m.before, m.after
        )


@dataclass
class ModuleScore:
    module: str
    mutants: int = 0
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    not_checked: int = 0
    survivors: list[Mutation] = field(default_factory=list)
    killed_equivalents: list[Mutation] = field(default_factory=list)
    #: Entries of this module, for functions in scope, that name no mutant of the run: the
    #: code changed under them (a rewritten line, a renamed function), so they excuse nothing.
    unmatched_equivalents: list[Equivalent] = field(default_factory=list)

    @property
    def score(self) -> float:
        meaningful = self.mutants - self.equivalent
        return round(self.killed / meaningful, 4) if meaningful else 1.0

    def line(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "mutants": self.mutants,
            "killed": self.killed,
            "survived": self.survived,
            "equivalent": self.equivalent,
            "score": self.score,
        }


def module_name(path: str) -> str:
    """`shared/local/queue.py` -> `shared.local.queue`; a package's `__init__.py` is the
    package (`shared/vehicle_state/__init__.py` -> `shared.vehicle_state`), as mutmut names
    its mutants."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def module_path(root: Path, module: str) -> Path:
    """The source file of a dotted module name: `module_name`'s inverse under `root`."""
    plain = root / (module.replace(".", "/") + ".py")
    return plain if plain.is_file() else root / module.replace(".", "/") / "__init__.py"


def module_globs(module: str) -> list[str]:
    """The mutmut name patterns of every mutant of `module`, not of its submodules (a
    package's `shared.vehicle_state.*` would take in `shared.vehicle_state.codec`'s too)."""
    return [f"{module}.x_*", f"{module}.xǁ*"]


def function_name(key: str, module: str) -> str:
    """`shared.tokens.xǁKeyVaultTokenProviderǁ_load__mutmut_7` -> `KeyVaultTokenProvider._load`."""
    local = key.removeprefix(module + ".").rsplit(MUTATED_SUFFIX, 1)[0]
    if local.startswith("xǁ"):
        return ".".join(part for part in local[2:].split("ǁ") if part)
    return local.removeprefix("x_")


def mutant_glob(module: str, function: str) -> str:
    """The mutmut name pattern of one function's mutants (the inverse of `function_name`)."""
    if "." in function:
        cls, name = function.split(".", 1)
        return f"{module}.xǁ{cls}ǁ{name}{MUTATED_SUFFIX}*"
    return f"{module}.x_{function}{MUTATED_SUFFIX}*"


def _def_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """A function's source lines, the name in its `def` line written `_`: mutmut's copies
    differ in their names, and defaults in the signature may be mutated too."""
    found = lines[node.lineno - 1:node.end_lineno]
    found[0] = found[0].replace(node.name, "_", 1)
    return found


def _functions(source: str) -> dict[str, str]:
    """Source text of every function in the mutated file, by its (mangled) name."""
    lines = source.splitlines()
    return {node.name: "\n".join(_def_lines(lines, node))
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def describe(original: str, mutated: str) -> tuple[str, str]:
    """The lines a mutant removed and added, stripped, each group joined by newlines."""
    before: list[str] = []
    after: list[str] = []
    for line in difflib.ndiff(original.splitlines(), mutated.splitlines()):
        if line.startswith("- "):
            before.append(line[2:].strip())
        elif line.startswith("+ "):
            after.append(line[2:].strip())
    return "\n".join(before), "\n".join(after)


def mutations(mutated_source: str, keys: Iterable[str], module: str) -> dict[str, Mutation]:
    functions = _functions(mutated_source)
    result: dict[str, Mutation] = {}
    for key in keys:
        local = key.removeprefix(module + ".")
        original = functions.get(local.rsplit(MUTATED_SUFFIX, 1)[0] + ORIGINAL)
        mutated = functions.get(local)
        if original is None or mutated is None:
            raise ValueError(f"mutant {key} is not in the mutated source of {module}; "
                             "delete mutants/ and run `make mutate` again")
        before, after = describe(original, mutated)
        result[key] = Mutation(key, module, function_name(key, module), before, after)
    return result


def load_equivalents(path: Path) -> list[Equivalent]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    entries = []
    for i, raw in enumerate(data.get("equivalent", [])):
        missing = {"module", "function", "before", "after", "why"} - set(raw)
        if missing or not str(raw.get("why", "")).strip():
            raise ValueError(f"{path}: entry {i + 1} needs module, function, before, after "
                             f"and a non-empty why; missing {sorted(missing) or ['why']}")
        entries.append(Equivalent(raw["module"], raw["function"], raw["before"].strip(),
                                  raw["after"].strip(), raw["why"]))
    return entries


def in_scope(module: str, function: str, scope: Sequence[str]) -> bool:
    """Whether the mutants of `function` are among those `scope` (mutmut's globs) selects."""
    sample = mutant_glob(module, function).replace("*", "1")
    return any(fnmatch.fnmatchcase(sample, pattern) for pattern in scope)


def score_module(
    module: str,
    exit_codes: Mapping[str, int | None],
    found: Mapping[str, Mutation],
    equivalents: Sequence[Equivalent],
    scope: Sequence[str] = ("*",),
) -> ModuleScore:
    result = ModuleScore(module)
    result.unmatched_equivalents = [
        e for e in equivalents
        if e.module == module and in_scope(module, e.function, scope)
        and not any(e.matches(m) for m in found.values())
    ]
    for key, code in exit_codes.items():
        mutation = found[key]
        result.mutants += 1
        equivalent = any(e.matches(mutation) for e in equivalents)
        if code is None:
            result.not_checked += 1
            result.survived += 1
            result.survivors.append(mutation)
        elif code in KILLED_CODES:
            result.killed += 1
            if equivalent:
                result.killed_equivalents.append(mutation)
        elif equivalent:
            result.equivalent += 1
        else:
            # Survived, no test reached it, or anything mutmut could not classify.
            result.survived += 1
            result.survivors.append(mutation)
    return result


def summarise(root: Path, paths: Sequence[str], equivalents: Sequence[Equivalent],
              scope: Sequence[str] = ("*",)) -> list[ModuleScore]:
    """Scores for each mutated file (repository-relative path), from `root/mutants/`, over the
    mutants whose names match `scope` (the globs `mutmut run` was given)."""
    scores = []
    for path in paths:
        module = module_name(path)
        meta_path = root / "mutants" / (path + ".meta")
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: run `make mutate` (mutmut run) "
                                    "first")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        exit_codes: dict[str, int | None] = {
            key: code for key, code in meta["exit_code_by_key"].items()
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in scope)
        }
        source = (root / "mutants" / path).read_text(encoding="utf-8")
        found = mutations(source, exit_codes, module)
        scores.append(score_module(module, exit_codes, found, equivalents, scope))
    return scores


def mutated_paths(pyproject: Path) -> list[str]:
    """The files `[tool.mutmut] only_mutate` names: the one list of what is mutated."""
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return list(config["tool"]["mutmut"]["only_mutate"])


def source_functions(source: str) -> dict[str, list[str]]:
    """The stripped lines of each module-level function and method of `source` (`_def_lines`),
    by the name `function_name` gives its mutants (`Class.method`)."""
    found: dict[str, list[str]] = {}
    lines = source.splitlines()

    def add(node: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> None:
        found[name] = [line.strip() for line in _def_lines(lines, node)]

    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            add(node, node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    add(item, f"{node.name}.{item.name}")
    return found


def stale_equivalents(root: Path, equivalents: Sequence[Equivalent]) -> list[str]:
    """What is wrong with entries that can no longer name a mutant of today's code: a module
    or function that is gone, or a `before` whose lines the function no longer has. Checked
    on the source, so without a mutation run."""
    problems: list[str] = []
    sources: dict[str, dict[str, list[str]] | None] = {}
    for entry in equivalents:
        if entry.module not in sources:
            path = module_path(root, entry.module)
            sources[entry.module] = (source_functions(path.read_text(encoding="utf-8"))
                                     if path.is_file() else None)
        functions = sources[entry.module]
        where = f"{entry.module} {entry.function}: {entry.before!r} -> {entry.after!r}"
        if functions is None:
            problems.append(f"no module {entry.module}: {where}")
        elif entry.function not in functions:
            problems.append(f"no function {entry.function} in {entry.module}: {where}")
        elif not set(entry.before.splitlines()) <= set(functions[entry.function]):
            problems.append(f"the function has no such line (it changed): {where}")
    return problems
