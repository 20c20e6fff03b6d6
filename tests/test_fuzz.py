"""Issue 12, generated inputs at scale: 360 seeded cases of tools/fuzz.py per run (random models and mutated
zoo models), each pruned and checked; 40 of them also through the command line.

Every case is held to what can fail on it: a valid model that prunes keeps its output shapes, holds the
zero-channel oracle within its dtype's tolerance and is left exactly as it was at ratio 0; a refusal is an
OnnxPruneError (never another exception) whose message is one line. A failing case names its seed in the test
id; `python tools/fuzz.py --seed N` runs it again with the traceback.
"""

from __future__ import annotations

import pytest

from onnxprune.errors import OnnxPruneError
from tools import fuzz

SEEDS = range(360)


@pytest.mark.parametrize("seed", SEEDS)
def test_case(seed):
    case = fuzz.check_case(seed)
    where = f"seed {seed} ({case.source})"
    assert not case.problems, f"{where}: " + "; ".join(case.problems)
    if case.error is not None:  # refused (a valid model) or rejected (an invalid one): onnxprune's own error
        assert isinstance(case.error, OnnxPruneError), f"{where}: {type(case.error).__name__}: {case.error}"
        message = str(case.error).strip()
        assert message and "\n" not in message and "Traceback" not in message, f"{where}: {message!r}"
        assert case.outcome in ("refused", "invalid"), where
        return
    if case.outcome == "mended":  # invalid as generated; what onnxprune wrote passed the full checker
        return
    # a valid model: pruned or left unchanged (nothing prunable)
    assert case.shapes is not None and case.shapes[0] == case.shapes[1], f"{where}: output shapes {case.shapes}"
    assert case.ratio0_err == 0.0, f"{where}: ratio 0 changed the outputs by {case.ratio0_err}"
    if case.outcome == "pruned":
        assert case.oracle is not None and case.oracle <= case.tol, f"{where}: oracle {case.oracle} > {case.tol}"
    else:
        assert case.outcome == "unchanged" and case.oracle is None, where


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
