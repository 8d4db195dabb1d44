"""Stage `retrofit` (a package): the stage (`stage.py`), its training and evaluation loop (`loop.py`,
imported when a shard runs: it imports torch) and the model card (`card.py`)."""

from stages.retrofit.stage import STAGE, Config, RetrofitStage

__all__ = ["STAGE", "Config", "RetrofitStage"]
