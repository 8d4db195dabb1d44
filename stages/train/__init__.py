"""Stage `train` (a package): the stage and its torchrun launch (`stage.py`), the training loop
(`loop.py`: Trainer.train_step / train) and its metric sums and rows (`metrics.py`). Only `stage.py` is
imported to load a config; the loop and metrics import torch and are imported when a shard trains."""

from stages.train.stage import STAGE, Config, TrainStage

__all__ = ["STAGE", "Config", "TrainStage"]
