"""Stage `reference` (a package): the stage (`stage.py`) and the torch side of its language model
(`lm.py`: the GPT-NeoX it builds and trains, its perplexity), imported when a shard trains."""

from stages.reference.stage import STAGE, Config, ReferenceStage

__all__ = ["STAGE", "Config", "ReferenceStage"]
