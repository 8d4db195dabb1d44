"""One config system: pydantic models per stage section, loaded from one YAML file per run.

The top-level model is assembled from a stage registry (pipeline.registry.Registry) handed to the
loader, so each stage owns its section's model (its module's or package's `Config`) and the framework names no
stage. Unknown keys and bad values are errors naming the key.
"""

from __future__ import annotations

import os
from collections import abc
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.registry import Registry

_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.Set)
_MAPPINGS = (dict, abc.Mapping)


def _number_slot(annotation: Any) -> bool:
    """Whether a value typed `annotation` is a number and never a boolean (int, float, int | None, ...)."""
    origin = get_origin(annotation)
    if origin is Literal or origin in _SEQUENCES or origin in _MAPPINGS:
        return False
    args = get_args(annotation)
    if args:  # a union
        return bool not in args and any(_number_slot(a) for a in args)
    return annotation in (int, float)


def _inner(annotation: Any, origins: tuple[Any, ...], pick: int) -> list[Any]:
    """The element (pick=0) or value (pick=1) types of the container types in `annotation` (a union too)."""
    candidates = (
        [annotation, *get_args(annotation)] if get_origin(annotation) not in origins else [annotation]
    )
    out = []
    for a in candidates:
        if get_origin(a) in origins and get_args(a):
            args = [x for x in get_args(a) if x is not Ellipsis]
            out.append(args[min(pick, len(args) - 1)])
    return out


def bool_where_number(annotation: Any, value: Any) -> bool:
    """Whether `value` holds a boolean where `annotation` wants a number, at any depth of lists and dicts
    (`--set evaluate.neighbors=[true,2]` was read as [1, 2])."""
    if isinstance(value, bool):
        return _number_slot(annotation)
    if isinstance(value, list | tuple | set | frozenset):
        return any(bool_where_number(a, x) for a in _inner(annotation, _SEQUENCES, 0) for x in value)
    if isinstance(value, dict):
        return any(bool_where_number(a, x) for a in _inner(annotation, _MAPPINGS, 1) for x in value.values())
    return False


class NoBoolNumbers(BaseModel):
    """pydantic's lax mode reads `true` as 1 for an int field (`--set chunks.chunk_len=true` gave one-token
    chunks); a boolean where a number belongs is an error here."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name and bool_where_number(cls.model_fields[info.field_name].annotation, v):
            raise ValueError(f"expected a number, got a boolean in {v!r}")
        return v


class StageConfig(NoBoolNumbers):
    """Base of every stage's config section."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # Fields that change how a stage runs but not what it produces (workers, batch sizes,
    # devices). They are recorded in the manifest but left out of the artifact version.
    UNHASHED: ClassVar[frozenset[str]] = frozenset()

    def hashed_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.UNHASHED))


class RunnerConfig(NoBoolNumbers):
    """How shards of a stage are executed (not part of any artifact version)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "serial", "threads", "processes", "dask", "ray"] = Field(
        "auto", description="auto: the stage's preferred runner (threads for I/O, processes for CPU work)"
    )
    workers: int | None = Field(None, ge=1, description="parallel shards; default: CPU count")
    verify_inputs: Literal["checksum", "size"] = Field(
        "checksum",
        description="before a stage builds, each input artifact's files are checked against its manifest: "
        "checksum (sha256 of every file, once per process) or size (existence and size only: huge stores)",
    )
    address: str | None = Field(
        None, description="dask scheduler or ray address; None starts a local cluster"
    )
    gpus: int | None = Field(
        None, ge=0, description="GPUs for GPU stages (one worker each); default: all visible"
    )
    cpu_lanes: int = Field(
        1,
        ge=1,
        description="without a GPU: 1 runs the shards of GPU stages (embeddings, reference, scores, train, "
        "evaluate) one at a time across the flow; > 1 lets them run side by side, as many as the task "
        "runner's workers (use kind: processes, and OMP_NUM_THREADS = cores / workers)",
    )
    # The settings below apply to the Prefect flows (app/flows.py); `rpt run` neither retries nor times out.
    retries: int = Field(
        2,
        ge=0,
        description="flows: retries of a plan or shard task (publish is not retried) after a transient "
        "failure (an I/O or network error, a lost Dask worker); never after a user error (bad config or input) or a timeout",
    )
    retry_delay_s: float = Field(
        10.0,
        ge=0,
        description="flows: seconds before the first retry; each further retry waits twice as long",
    )
    timeouts: dict[str, float] = Field(
        default_factory=dict,
        description="flows: {stage: seconds} that any one task of the stage (its plan, one shard, its "
        "publish) may run before the flow fails naming the stage",
    )
    progress_s: float = Field(
        10.0,
        ge=0,
        description="flows: seconds between progress updates of a running stage to Prefect's UI (a bar "
        "that ends sooner shows none)",
    )


class RunConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    artifacts_root: str = Field(
        "./artifacts", description="local path or fsspec URI; RPT_ARTIFACTS overrides"
    )
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    # filled in by load_config, never part of a version
    source_file: str | None = Field(None, exclude=True)
    # the stages this config has sections for (set on the model class by build_run_config)
    registry: ClassVar[Registry]

    @model_validator(mode="after")
    def _timeouts_name_stages(self) -> RunConfigBase:
        names = self.registry.names()
        for stage, seconds in self.runner.timeouts.items():
            if stage not in names:
                raise ValueError(f"runner.timeouts: unknown stage {stage!r} (stages: {', '.join(names)})")
            if not seconds > 0:
                raise ValueError(f"runner.timeouts: {stage}: a timeout must be > 0 seconds, got {seconds}")
        return self

    def root(self) -> str:
        return os.environ.get("RPT_ARTIFACTS") or self.artifacts_root

    def section(self, stage: str) -> StageConfig:
        try:
            return getattr(self, stage)
        except AttributeError as e:
            raise ConfigError(
                f"no config section '{stage}' (known stages: {', '.join(self.registry.names())})"
            ) from e

    def with_section(self, stage: str, overrides: Mapping[str, Any]) -> RunConfigBase:
        """A copy with `overrides` applied to one stage section (validated)."""
        if not overrides:
            return self
        data = self.model_dump(mode="json", exclude_unset=False)
        sec = dict(data.get(stage, {}))
        sec.update(overrides)
        data[stage] = sec
        return _validate(self.registry, data, source=self.source_file)


def build_run_config(registry: Registry) -> type[RunConfigBase]:
    """The run config model of `registry`'s stages (use `registry.run_config()`, which builds it once).
    Its module is the registry's home, whose `RunConfig` attribute must return it (pickle looks there)."""
    fields: dict[str, Any] = {}
    for name in registry.names():
        cls = registry.get(name).Config
        fields[name] = (cls, Field(default_factory=cls))
    model = create_model("RunConfig", __base__=RunConfigBase, __module__=registry.home, **fields)
    model.registry = registry
    return model


def _format_errors(model: type[RunConfigBase], err: ValidationError, source: str | None) -> str:
    where = f" in {source}" if source else ""
    lines = [f"invalid config{where}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if not loc:  # a check across sections (it names its keys itself)
            lines.append(f"  {e['msg']}")
        elif e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1])
            allowed = ", ".join(sorted(set(parent.model_fields) - {"source_file"})) if parent else "?"
            lines.append(f"  {loc}: unknown key (valid keys here: {allowed})")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: Iterable[Any]) -> type[BaseModel] | None:
    cur: Any = model
    for part in loc:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return None
        cur = field.annotation
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _validate(registry: Registry, data: Mapping[str, Any], source: str | None = None) -> RunConfigBase:
    if "source_file" in data:  # set by the loader, not a setting
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}source_file: unknown key (it is set from the path given with -c)")
    model = registry.run_config()
    try:
        cfg = model.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_format_errors(model, e, source)) from None
    cfg.source_file = source
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error: plain YAML loading keeps
    the last one, so a section written twice would silently lose the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"'{key}' appears twice in one mapping (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                    "merge the two",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'bm25.k=20' -> (['bm25', 'k'], 20); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        cur = data
        for part in path[:-1]:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            cur = nxt
        cur[path[-1]] = value
    return data


def load_config(
    registry: Registry, path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> RunConfigBase:
    """Load a run config of `registry`'s stages from YAML (None: all defaults), apply `--set` overrides,
    validate."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides)
    return _validate(registry, data, source=source)


def config_from_dict(registry: Registry, data: Mapping[str, Any]) -> RunConfigBase:
    return _validate(registry, dict(data))
