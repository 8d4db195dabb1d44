"""Targets of a build and the DAG they span: what several artifacts built together (a flow, a set of
`--target`s) need, each artifact once, grouped in waves that can run side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfigBase
from pipeline.errors import ConfigError
from pipeline.executor import Node, resolve


@dataclass(frozen=True)
class Target:
    """An artifact a flow must produce: a stage with changes to its config section (e.g. a bm25 query
    mode), or with changes that depend on the run (a function of it: the supervision table)."""

    stage: str
    overrides: Mapping[str, Any] | Callable[[RunConfigBase], Mapping[str, Any]] = field(default_factory=dict)

    def overrides_for(self, run: RunConfigBase) -> Mapping[str, Any]:
        return self.overrides(run) if callable(self.overrides) else self.overrides

    def __str__(self) -> str:
        if callable(self.overrides):
            return f"{self.stage}[{getattr(self.overrides, '__name__', 'derived')}]"
        sets = ",".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.stage}[{sets}]" if sets else self.stage


def resolve_targets(run: RunConfigBase, targets: list[Target]) -> tuple[list[Node], list[Node]]:
    """(the targets' nodes, every node of their DAG in dependency order, each artifact once)."""
    memo: dict[str, Node] = {}
    roots, nodes = [], {}
    for t in targets:
        try:
            node = resolve(t.stage, run.with_section(t.stage, t.overrides_for(run)), memo)
        except ConfigError as e:
            raise ConfigError(f"cannot resolve {t}: {e}") from None
        roots.append(node)
        for n in node.walk():
            nodes.setdefault(n.ref, n)
    return roots, list(nodes.values())


def waves(nodes: list[Node]) -> list[list[Node]]:
    """Group nodes by depth in the DAG: every node's inputs lie in earlier waves; a wave's nodes run together."""
    depth: dict[str, int] = {}

    def d(n: Node) -> int:
        if n.ref not in depth:
            depth[n.ref] = 1 + max((d(c) for c in n.inputs.values()), default=-1)
        return depth[n.ref]

    out: list[list[Node]] = []
    for n in nodes:
        k = d(n)
        while len(out) <= k:
            out.append([])
        out[k].append(n)
    return out
