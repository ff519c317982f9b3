"""`make mutate`'s summariser: mutmut's result files in, one honest score per module out.

The mutants/ tree here is laid out as mutmut 3 writes it (a `.meta` JSON of exit codes per
mutant, the mutated source with each mutant a copy of its function); mutmut itself runs only in
`make mutate`.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest

from mutation.__main__ import EQUIVALENTS, ROOT, SCOPE, globs, paths
from mutation.summary import (
    Equivalent,
    function_name,
    load_equivalents,
    module_globs,
    module_name,
    module_path,
    mutant_glob,
    source_functions,
    stale_equivalents,
    summarise,
)

MUTATED_SOURCE = '''
def x_limit__mutmut_orig(n):
    if n > 10:
        return "big"
    return "small"

def x_limit__mutmut_1(n):
    if n >= 10:
        return "big"
    return "small"

def x_limit__mutmut_2(n):
    if n > 11:
        return "big"
    return "small"

def x_limit__mutmut_3(n):
    if n > 10:
        return "XXbigXX"
    return "small"

class Box:
    def xǁBoxǁopen__mutmut_orig(self, force=False):
        return force

    def xǁBoxǁopen__mutmut_1(self, force=True):
        return force
'''


def lay_out(root: Path, exit_codes: dict[str, int | None]) -> None:
    mutants = root / "mutants" / "pkg"
    mutants.mkdir(parents=True)
    (mutants / "demo.py").write_text(MUTATED_SOURCE, encoding="utf-8")
    meta = {"exit_code_by_key": exit_codes, "hash_by_function_name": {},
            "type_check_error_by_key": {}, "durations_by_key": {},
            "estimated_durations_by_key": {}}
    (mutants / "demo.py.meta").write_text(json.dumps(meta), encoding="utf-8")


ALL_KILLED_BUT_ONE: dict[str, int | None] = {
    "pkg.demo.x_limit__mutmut_1": 1,      # killed
    "pkg.demo.x_limit__mutmut_2": 0,      # survived
    "pkg.demo.x_limit__mutmut_3": 36,     # timeout: killed
    "pkg.demo.xǁBoxǁopen__mutmut_1": 33,  # no test reached it: a survivor
}


class TestScores:
    def test_counts_and_score_per_module(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [])
        assert score.line() == {"module": "pkg.demo", "mutants": 4, "killed": 2, "survived": 2,
                                "equivalent": 0, "score": 0.5}
        assert json.loads(json.dumps(score.line())) == score.line()

    def test_survivors_are_named_by_function_and_changed_line(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [])
        assert [(m.function, m.before, m.after) for m in score.survivors] == [
            ("limit", "if n > 10:", "if n > 11:"),
            ("Box.open", "def _(self, force=False):", "def _(self, force=True):"),
        ]

    def test_a_listed_equivalent_leaves_the_denominator(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        equivalent = Equivalent("pkg.demo", "limit", "if n > 10:", "if n > 11:", "n is even")
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [equivalent])
        assert (score.equivalent, score.survived, score.score) == (1, 1, round(2 / 3, 4))

    def test_an_equivalent_that_was_killed_is_not_subtracted_and_is_reported(
        self, tmp_path: Path
    ) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        wrong = Equivalent("pkg.demo", "limit", "if n > 10:", "if n >= 10:", "mistaken")
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [wrong])
        assert (score.equivalent, score.killed) == (0, 2)
        assert [m.after for m in score.killed_equivalents] == ["if n >= 10:"]

    def test_an_equivalent_elsewhere_does_not_match(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        other = Equivalent("pkg.other", "limit", "if n > 10:", "if n > 11:", "another module")
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [other])
        assert score.equivalent == 0

    def test_an_equivalent_that_matches_no_mutant_is_reported(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        listed = Equivalent("pkg.demo", "limit", "if n > 10:", "if n > 11:", "n is even")
        rewritten = Equivalent("pkg.demo", "limit", "if n > 9:", "if n > 10:", "old code")
        renamed = Equivalent("pkg.demo", "Box.close", "return force", "return None", "gone")
        other = Equivalent("pkg.other", "limit", "if n > 9:", "if n > 10:", "not this run")
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [listed, rewritten, renamed, other])
        assert score.unmatched_equivalents == [rewritten, renamed]
        assert score.equivalent == 1

    def test_an_equivalent_outside_the_scope_is_not_reported(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        outside = Equivalent("pkg.demo", "limit", "if n > 9:", "if n > 10:", "not run")
        inside = Equivalent("pkg.demo", "Box.open", "return force", "return None", "stale")
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [outside, inside],
                             scope=[mutant_glob("pkg.demo", "Box.open")])
        assert score.unmatched_equivalents == [inside]

    def test_a_mutant_not_checked_counts_as_survived(self, tmp_path: Path) -> None:
        lay_out(tmp_path, {"pkg.demo.x_limit__mutmut_1": None})
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [])
        assert (score.survived, score.not_checked, score.score) == (1, 1, 0.0)

    def test_only_mutants_in_scope_are_counted(self, tmp_path: Path) -> None:
        lay_out(tmp_path, ALL_KILLED_BUT_ONE)
        (score,) = summarise(tmp_path, ["pkg/demo.py"], [],
                             scope=[mutant_glob("pkg.demo", "Box.open")])
        assert (score.mutants, score.survived) == (1, 1)

    def test_missing_results_say_to_run_make_mutate(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="make mutate"):
            summarise(tmp_path, ["pkg/demo.py"], [])


class TestNames:
    @pytest.mark.parametrize(("key", "expected"), [
        ("shared.receiver.x__decide__mutmut_12", "_decide"),
        ("shared.tokens.xǁKeyVaultTokenProviderǁ_load__mutmut_7", "KeyVaultTokenProvider._load"),
        ("shared.tokens.xǁStaticTokenProviderǁ__init____mutmut_1", "StaticTokenProvider.__init__"),
    ])
    def test_function_names_from_mutant_keys(self, key: str, expected: str) -> None:
        module = key.rsplit(".", 1)[0]
        assert function_name(key, module) == expected

    def test_a_package_is_named_as_mutmut_names_its_mutants(self, tmp_path: Path) -> None:
        assert module_name("shared/vehicle_state/__init__.py") == "shared.vehicle_state"
        assert module_name("shared/vehicle_state/codec.py") == "shared.vehicle_state.codec"
        (tmp_path / "pkg" / "sub").mkdir(parents=True)
        for name in ("pkg/sub/__init__.py", "pkg/sub/mod.py"):
            (tmp_path / name).write_text("", encoding="utf-8")
        assert module_path(tmp_path, "pkg.sub") == tmp_path / "pkg/sub/__init__.py"
        assert module_path(tmp_path, "pkg.sub.mod") == tmp_path / "pkg/sub/mod.py"

    def test_a_modules_globs_leave_out_its_submodules(self) -> None:
        patterns = module_globs("shared.vehicle_state")
        keys = {"shared.vehicle_state.x_valid_vehicle_id__mutmut_1": True,
                "shared.vehicle_state.xǁChangesǁ__len____mutmut_2": True,
                "shared.vehicle_state.codec.x_dumps__mutmut_1": False,
                "shared.vehicle_state.codec.xǁThingǁrun__mutmut_1": False}
        for key, mine in keys.items():
            assert any(fnmatch.fnmatchcase(key, p) for p in patterns) is mine, key

    def test_glob_matches_only_that_functions_mutants(self) -> None:
        assert mutant_glob("shared.local.queue", "LocalQueue.complete") == (
            "shared.local.queue.xǁLocalQueueǁcomplete__mutmut_*"
        )


class TestEquivalentsFile:
    def test_the_reviewed_file_loads_and_every_entry_says_why(self) -> None:
        path = Path(__file__).resolve().parents[1] / "mutation" / "equivalent.toml"
        for entry in load_equivalents(path):
            assert entry.why.strip() and entry.module.startswith("shared.")

    def test_an_entry_without_a_reason_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "equivalent.toml"
        path.write_text('[[equivalent]]\nmodule = "m"\nfunction = "f"\nbefore = "a"\n'
                        'after = "b"\nwhy = " "\n', encoding="utf-8")
        with pytest.raises(ValueError, match="why"):
            load_equivalents(path)


class TestStaleEntries:
    """An entry must name a line of today's code: otherwise it excuses no mutant, and the one
    the code now has under another name or line goes unreviewed."""

    SOURCE = (
        "def limit(n, cap=10):\n"
        "    if n > cap:\n"
        "        return 'big'\n"
        "    return 'small'\n"
        "\n"
        "class Box:\n"
        "    async def open(self, force=False):\n"
        "        return force\n"
    )

    def entries(self, tmp_path: Path, *entries: Equivalent) -> list[str]:
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "demo.py").write_text(self.SOURCE, encoding="utf-8")
        return stale_equivalents(tmp_path, entries)

    def test_entries_on_lines_the_code_has_are_fine(self, tmp_path: Path) -> None:
        assert self.entries(
            tmp_path,
            Equivalent("pkg.demo", "limit", "if n > cap:", "if n >= cap:", "r"),
            Equivalent("pkg.demo", "limit", "def _(n, cap=10):", "def _(n, cap=11):", "r"),
            Equivalent("pkg.demo", "Box.open", "async def _(self, force=False):\nreturn force",
                       "async def _(self, force=True):\nreturn not force", "r"),
        ) == []

    def test_a_changed_line_a_gone_function_and_a_gone_module_are_named(
        self, tmp_path: Path
    ) -> None:
        problems = self.entries(
            tmp_path,
            Equivalent("pkg.demo", "limit", "if n > 10:", "if n >= 10:", "r"),
            Equivalent("pkg.demo", "Box.open", "return force\nreturn None", "", "r"),
            Equivalent("pkg.demo", "Box.close", "return force", "return None", "r"),
            Equivalent("pkg.demo", "open", "return force", "return None", "r"),
            Equivalent("pkg.gone", "limit", "if n > cap:", "if n >= cap:", "r"),
        )
        assert [p.split(":")[0] for p in problems] == [
            "the function has no such line (it changed)",
            "the function has no such line (it changed)",
            "no function Box.close in pkg.demo",
            "no function open in pkg.demo",
            "no module pkg.gone",
        ]

    def test_every_entry_of_the_reviewed_file_names_a_line_of_todays_code(self) -> None:
        assert stale_equivalents(ROOT, load_equivalents(EQUIVALENTS)) == []

    def test_every_function_a_scope_names_exists(self) -> None:
        for module, functions in SCOPE.items():
            path = module_path(ROOT, module)
            assert module in {module_name(p) for p in paths()}
            missing = set(functions) - set(source_functions(path.read_text(encoding="utf-8")))
            assert not missing, f"{module}: SCOPE names functions it lacks: {sorted(missing)}"


class TestModuleSelection:
    def test_every_module_by_default_and_only_the_named_ones_with_module(self) -> None:
        every = paths()
        assert "shared/receiver.py" in every and "shared/retry.py" in every
        assert paths(["shared.retry", "shared.local.queue"]) == [
            p for p in every if p in ("shared/retry.py", "shared/local/queue.py")]
        assert globs(["shared.retry"]) == ["shared.retry.x_*", "shared.retry.xǁ*"]
        # A narrowed module keeps its function scope.
        assert globs(["shared.local.queue"]) == [
            g for g in globs() if g.startswith("shared.local.queue.")] != []

    def test_a_module_that_is_not_mutated_is_refused_with_the_choices(self) -> None:
        with pytest.raises(SystemExit, match=r"shared\.nope: not in .*only_mutate.*"
                                              r"expected one of .*shared\.receiver"):
            paths(["shared.nope"])
