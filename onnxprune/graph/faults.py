"""A contained fault: an exception inside a handler, or a pruned group that broke validation.

A fault freezes the groups it touches instead of ending the run. Analysis-time faults belong to the Analysis
(they are a property of the graph); faults met while a plan is applied or measured are returned as values by
those stages (pipeline/apply.py, pipeline/sensitivity.py) and never written into the shared Analysis, so the
next sweep candidate or bisection step starts clean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx


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


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def is_fault(group, faults: list[Fault]) -> bool:
    """Whether `group` is frozen (also) because of a contained fault."""
    return any(group.id in f.groups for f in faults)


def strict_message(faults: list[Fault]) -> str:
    more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
    return f"--strict: a fault was contained: {faults[0].reason}{more}"
