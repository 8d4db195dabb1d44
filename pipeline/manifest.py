"""manifest.json: the record that makes a folder an artifact. Written last; without it the folder does not exist."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
FORMAT = 1

# Recorded in every manifest, so a result can be traced to the library versions that made it.
_PACKAGES = (
    "rpt-pipeline",
    "torch",
    "numpy",
    "scipy",
    "pyarrow",
    "polars",
    "tokenizers",
    "transformers",
    "sentence-transformers",
    "faiss-cpu",
    "faiss-gpu",
    "bm25s",
    "rank-bm25",
    "prefect",
)


class FileEntry(BaseModel):
    path: str
    bytes: int
    sha256: str
    rows: int | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    format: int = FORMAT
    stage: str
    version: str
    stage_version: int
    created_at: str
    config: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict, description="role -> stage@version")
    fingerprint: Any = None
    arrow_schema: dict[str, Any] | None = Field(None, alias="schema")
    files: list[FileEntry] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict, description="stage-specific facts: source, scope, ...")
    shards: list[dict[str, Any]] = Field(default_factory=list)
    packages: dict[str, str] = Field(default_factory=dict)
    host: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.stage}@{self.version}"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)

    @property
    def rows(self) -> int:
        return sum(
            f.rows or 0 for f in self.files if f.path.endswith(".parquet") and f.path.startswith("part-")
        )


def schema_to_dict(schema: pa.Schema) -> dict[str, Any]:
    return {
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        "text": schema.to_string(show_schema_metadata=False),
    }


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def host_info() -> dict[str, str]:
    return {"python": platform.python_version(), "platform": platform.platform(), "node": platform.node()}
