"""Issue 12, generated inputs at scale: 360 seeded cases of tools/fuzz.py per run (random models and mutated
zoo models), each pruned and checked; 40 of them also through the command line.

A failing case names its seed in the test id; `python tools/fuzz.py --seed N` runs it again with the traceback.
"""

from __future__ import annotations

import pytest

from tools import fuzz

SEEDS = range(360)


@pytest.mark.parametrize("seed", SEEDS)
def test_case(seed):
    case = fuzz.check_case(seed)
    assert not case.problems, f"seed {seed} ({case.source}): " + "; ".join(case.problems)
    assert case.outcome in ("pruned", "unchanged", "refused", "invalid", "mended")


@pytest.mark.parametrize("seed", range(1000, 1040))
def test_cli_case(seed, tmp_path):
    problems = fuzz.check_cli(seed, tmp_path)
    assert not problems, f"seed {seed}: " + "; ".join(problems)


def test_most_cases_prune_and_the_oracle_is_informative():
    """The generator is worth its time: most cases are valid, most of those prune, and on most pruned ones the
    oracle is informative (zeroing moved the outputs well beyond the tolerance)."""
    cases = fuzz.run_cases(range(2000, 2100))
    pruned = [c for c in cases if c.outcome == "pruned"]
    assert len(pruned) >= 60, fuzz.summary(cases)
    assert sum(not c.vacuous for c in pruned) >= 0.8 * len(pruned), fuzz.summary(cases)
    kinds = {c.source.split("+")[1].split(":")[0] for c in cases if "+" in c.source}
    assert {"unknown_op", "dynamic_dim", "constant_node", "opset"} <= kinds, kinds
