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

from dataclasses import asdict, dataclass, field
from typing import Callable

import onnx

from onnxprune.errors import OnnxPruneError, ValidationError


@dataclass
class Fault:
    stage: str        # "analyze", "rewrite" or "validate"
    node: str         # node name ("" for a validation failure)
    op_type: str
    error: str        # "ValueError: min() arg is an empty sequence", or the validation message
    groups: list[int] = field(default_factory=list)  # ids of the groups frozen for it

    @property
    def reason(self) -> str:
        if self.stage == "validate":
            return f"pruning it fails validation: {self.error}"
        return f"handler fault in {self.op_type} {self.node} ({self.stage}): {self.error}"

    def as_dict(self) -> dict:
        return {**asdict(self), "reason": self.reason}


class RewriteFault(Exception):
    """A handler's rewrite raised; carries the node so that its groups can be frozen."""

    def __init__(self, node: onnx.NodeProto, error: BaseException):
        super().__init__(f"{node.op_type} {node.name}: {describe(error)}")
        self.node_name = node.name
        self.op_type = node.op_type
        self.error = describe(error)


class ContainedFaultError(OnnxPruneError):
    """--strict: a handler fault or a failed validation was contained (the result would have been written)."""


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


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


def prune_validated(prep, plan, original: onnx.ModelProto, feed: dict | None, check: bool = True):
    """Apply `plan` to the prepared model, containing rewrite faults and narrowing a plan that fails validation.

    Returns (pruned model, the plan actually applied). Groups frozen on the way get the fault as a reason and
    the fault is added to `prep.analysis.faults`.
    """
    from onnxprune.pipeline.plan import Plan
    from onnxprune.pipeline.rewrite import apply_plan
    from onnxprune.pipeline.validate import validate

    analysis = prep.analysis
    by_root = {g.spaces[0]: g for g in analysis.groups}
    nodes = {n.name: n for n in prep.view.nodes}
    kept = dict(plan.kept)
    skip: set[str] = set()

    def freeze(roots, fault: Fault) -> None:
        for root in roots:
            group = by_root[root]
            if fault.reason not in group.reasons:
                group.reasons.append(fault.reason)
            fault.groups.append(group.id)
            kept.pop(root, None)
        record(fault)

    def record(fault: Fault) -> None:
        if not any((f.stage, f.node, f.error) == (fault.stage, fault.node, fault.error) for f in analysis.faults):
            analysis.faults.append(fault)

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
        return apply(list(kept)), Plan(dict(kept), plan.sizes)

    def valid(model: onnx.ModelProto) -> str | None:
        if isinstance(model, _Failed):
            return model.error
        return checked(lambda m: validate(m, original, feed))(model)

    try:
        model, rejected = bisect_plan(apply, valid, list(kept))
    except ValidationError:
        # even the unpruned model fails: when the original cannot run on the feed (its dynamic dims were
        # guessed), that is the user's to fix with --input-shapes, and says so
        from onnxprune.runtime.feeds import check_guess

        if feed is not None:
            check_guess(original, feed)
        raise
    for root, error in rejected.items():
        if root in kept:
            freeze([root], Fault("validate", "", "", error))
    if rejected and not kept:
        raise ValidationError(f"{next(iter(rejected.values()))} (and no group can be pruned without such a "
                              "failure)")
    return model, Plan(dict(kept), plan.sizes)


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


def is_fault(group, faults: list[Fault]) -> bool:
    """Whether `group` is frozen (also) because of a contained fault."""
    return any(group.id in f.groups for f in faults)


def strict_message(faults: list[Fault]) -> str:
    more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
    return f"--strict: a fault was contained: {faults[0].reason}{more}"


def contain(analysis, group, error: BaseException) -> Fault:
    """Freeze `group` for an exception raised while its pruning was applied or run (sensitivity's loop)."""
    if isinstance(error, RewriteFault):
        fault = Fault("rewrite", error.node_name, error.op_type, error.error, [group.id])
    else:
        fault = Fault("validate", "", "", f"the pruned model cannot be run: {describe(error)}", [group.id])
    if fault.reason not in group.reasons:
        group.reasons.append(fault.reason)
    analysis.faults.append(fault)
    return fault
