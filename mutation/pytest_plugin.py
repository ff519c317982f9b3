"""Loaded by mutmut's pytest runs only (`pytest_add_cli_args` in pyproject.toml).

mutmut runs the tests many times in one process (statistics, the clean run, then a fork per
mutant), and a mutant must be killed or not the same way every time: Hypothesis draws the
same examples on every run and keeps no example database between them.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.differing_executors],
)
settings.load_profile("mutation")
