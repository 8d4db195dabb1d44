"""A stage registry: stage name -> the module that defines it. The framework knows no stage by itself:
whoever loads a config hands it a Registry (the one of this project is `stages.REGISTRY`), and every run
config carries the registry it was built from (`run.registry`), so the executor, the flows and a Dask
worker that unpickles a config all find the same stages.

Modules are imported by name on first use; each defines `STAGE` (a pipeline.stage.Stage) and
`Config` (its config section). Stage modules load torch, numba and faiss inside the functions that run
shards, so loading every stage for its Config stays cheap (tests/test_imports.py checks `rpt config`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfigBase
    from pipeline.stage import Stage


class Registry:
    """Stage name -> module path. `home` is the importable module whose `RunConfig` attribute is this
    registry's config model: pickle (process, Dask and Ray workers) finds the class there."""

    def __init__(self, modules: Mapping[str, str], home: str):
        self.modules = dict(modules)  # the order is not the DAG's: each stage's inputs decide that
        self.home = home
        self._run_config: type[RunConfigBase] | None = None

    def names(self) -> list[str]:
        return list(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    def get(self, name: str) -> Stage:
        mod = self.modules.get(name)
        if mod is None:
            raise ConfigError(f"unknown stage '{name}' (known: {', '.join(self.modules)})")
        return importlib.import_module(mod).STAGE

    def run_config(self) -> type[RunConfigBase]:
        """The run config model: one section per stage, each the stage's own Config (built once)."""
        if self._run_config is None:
            from pipeline.config import build_run_config

            self._run_config = build_run_config(self)
        return self._run_config

    def __reduce__(self) -> tuple[object, ...]:  # one registry per process, whatever pickled it
        return (_home_registry, (self.home,))


def _home_registry(home: str) -> Registry:
    return importlib.import_module(home).REGISTRY
