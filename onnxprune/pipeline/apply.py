"""A fault stays in its group: handler exceptions and failed validations freeze groups instead of ending the run.

Three places can go wrong on a valid model, and each is narrowed to the groups responsible:

- a handler's `analyze` raises: the node's input and output channels freeze with a reason naming the node, the
  op and the error (graph/analysis.py calls `AnalysisContext.fault`);
- a handler's `rewrite` raises (`RewriteFault`, from rewrite.py): the groups whose channels reach the node
  freeze and the plan is applied again without them;
- the rewritten model fails validation (checker, onnxruntime, output shapes): `bisect_plan` re-applies halves
  of the plan to find the groups whose pruning breaks it, freezes them with the validation error as reason, and
  keeps the rest.

Every such freeze is a `Fault` (a bug to report, and `--strict` turns any into exit 2); ordinary reasons (an
unknown op, a graph output) are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx

from onnxprune.errors import InputError, OnnxPruneError, ValidationError
from onnxprune.graph.faults import Fault, RewriteFault, describe
from onnxprune.pipeline.plan import Plan
from onnxprune.pipeline.rewrite import apply_plan
from onnxprune.pipeline.validate import validate
from onnxprune.runtime.feeds import check_guess
from onnxprune.runtime.session import load_error


def bisect_plan(apply: Callable[[list[int]], onnx.ModelProto], validate: Callable[[onnx.ModelProto], str | None],
                roots: list[int]) -> tuple[onnx.ModelProto, dict[int, str]]:
    """The model of the largest subset of `roots` found to pass `validate`, and the roots left out with why.

    `apply(roots)` builds the model pruned in those groups only; `validate(model)` returns None or the error.
    The whole plan is tried first (one validation when all is well). Otherwise one culprit at a time is found
    by bisection against a base known to pass (O(log n) validations each): a culprit that breaks the model
    only together with another group is found too, as the base grows with every half that passes.
    Raises ValidationError when even the empty plan fails.
    """
    rejected: dict[int, str] = {}
    remaining = list(roots)
    model = apply(remaining)
    error = validate(model)
    if error is None:
        return model, rejected
    base: list[int] = []
    base_model = apply(base)
    base_error = validate(base_model)
    if base_error is not None:
        raise ValidationError(base_error)
    while remaining:
        candidates = remaining
        suspect_error = error
        while len(candidates) > 1:
            half = candidates[:len(candidates) // 2]
            err = validate(apply(base + half))
            if err is None:
                base = base + half
                candidates = candidates[len(half):]
            else:
                candidates, suspect_error = half, err
        culprit = candidates[0]
        rejected[culprit] = suspect_error
        remaining = [r for r in remaining if r != culprit and r not in base]
        if not remaining:
            break
        model = apply(base + remaining)
        error = validate(model)
        if error is None:
            return model, rejected
    return apply(base), rejected


def checked(validate: Callable[[onnx.ModelProto], None]) -> Callable[[onnx.ModelProto], str | None]:
    """`validate` (raising ValidationError) as a function returning the error text or None."""

    def run(model: onnx.ModelProto) -> str | None:
        try:
            validate(model)
        except ValidationError as exc:
            return str(exc)
        except OnnxPruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime and the checker raise several types
            return describe(exc)
        return None

    return run


@dataclass
class Applied:
    """What applying a plan gave: the model, the plan actually applied (groups frozen on the way left out) and
    the faults met, each naming the groups it froze."""

    model: onnx.ModelProto
    plan: Plan
    faults: list[Fault] = field(default_factory=list)


def apply_validated(prep, plan: Plan, original: onnx.ModelProto, feed: dict | None, check: bool = True) -> Applied:
    """Apply `plan` to the prepared model, containing rewrite faults and narrowing a plan that fails validation.

    A model onnxruntime cannot load or run is a failed validation like any other. `prep` and its analysis are
    left as they were: the groups frozen here are left out of the returned plan and named by the returned faults.
    """
    analysis = prep.analysis
    nodes = {n.name: n for n in prep.view.nodes}
    by_root = {g.spaces[0]: g for g in analysis.groups}
    kept = dict(plan.kept)
    skip: set[str] = set()
    faults: list[Fault] = []

    def freeze(roots, fault: Fault) -> None:
        for root in roots:
            fault.groups.append(by_root[root].id)
            kept.pop(root, None)
        record(fault)

    def record(fault: Fault) -> None:
        if not any((f.stage, f.node, f.error) == (fault.stage, fault.node, fault.error) for f in faults):
            faults.append(fault)

    def apply(roots: list[int]) -> onnx.ModelProto:
        while True:
            sub = Plan({r: kept[r] for r in roots if r in kept}, plan.sizes)
            try:
                return apply_plan(prep.model, prep.view, analysis, sub, prep.writer(), skip=frozenset(skip))
            except (MemoryError, KeyboardInterrupt, OnnxPruneError):
                raise
            except RewriteFault as exc:
                touched = _roots_at(analysis, nodes.get(exc.node_name)) & set(sub.kept)
                fault = Fault("rewrite", exc.node_name, exc.op_type, exc.error)
                if touched:
                    freeze(sorted(touched), fault)
                else:
                    # the node's channels are not pruned, so its rewrite has nothing to do: leave it out
                    skip.add(exc.node_name)
                    record(fault)
                roots = [r for r in roots if r in kept]
            except Exception as exc:  # noqa: BLE001 - slicing went wrong: narrowed like a failed validation
                if not check:
                    raise
                return _Failed(f"the rewrite raised {describe(exc)}")

    if not check:
        model = apply(list(kept))
        return Applied(model, Plan(dict(kept), plan.sizes), faults)

    def valid(model: onnx.ModelProto) -> str | None:
        if isinstance(model, _Failed):
            return model.error
        return checked(lambda m: validate(m, original, feed))(model)

    try:
        model, rejected = bisect_plan(apply, valid, list(kept))
    except ValidationError:
        # even the unpruned model fails: when the original cannot run on the feed (its dynamic dims were
        # guessed), that is the user's to fix with --input-shapes, and says so
        error = load_error(original)
        if error is not None:  # the input itself does not load: no rewrite of it can be checked
            raise InputError(f"onnxruntime cannot load the input model either, so its rewrites cannot be checked: "
                             f"{error}; hint: check the model with `onnxprune eval MODEL` (converters such as "
                             "onnxconverter-common's float16 can write graphs onnxruntime refuses)") from None
        if feed is not None:
            check_guess(original, feed)
        raise
    for root, error in rejected.items():
        if root in kept:
            freeze([root], Fault("validate", "", "", error))
    if rejected and not kept:
        raise ValidationError(f"{next(iter(rejected.values()))} (and no group can be pruned without such a "
                              "failure)")
    return Applied(model, Plan(dict(kept), plan.sizes), faults)


def fault_for(group, error: BaseException) -> Fault:
    """The fault that freezes `group` for an exception raised while its pruning was applied or run (sensitivity's
    loop)."""
    if isinstance(error, RewriteFault):
        return Fault("rewrite", error.node_name, error.op_type, error.error, [group.id])
    return Fault("validate", "", "", f"the pruned model cannot be run: {describe(error)}", [group.id])


def _roots_at(analysis, node) -> set[int]:
    """Root spaces of the channels on the node's inputs and outputs and of its sliced constants."""
    if node is None:
        return set()
    axes = analysis.context.axes
    roots = {analysis.find(seg.space) for name in list(node.input) + list(node.output) if name in axes
             for seg in axes[name].segments}
    roots |= {analysis.find(seg.space) for m in analysis.context.members if m.node == node.name
              for seg in m.layout.segments}
    return roots


@dataclass
class _Failed:
    """What `apply` returns when the rewrite itself raised outside a handler."""

    error: str
