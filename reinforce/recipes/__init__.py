"""Training recipes that consume a store: ``usi`` (paper 002), ``adaptive`` (paper 000) and ``plain``.

``reinforce train`` on the command line; from Python::

    from reinforce.recipes import TrainConfig, train
    result = train(TrainConfig(train_source="data/train", store="train.reinforce.zarr", val_source="data/val",
                               model="resnet18", recipe="usi", epochs=100, out="runs/r18"))
"""

from .config import RECIPES, TrainConfig, TrainError
from .train import RunResult, Trainer, TrainingDiverged, train

__all__ = ["RECIPES", "TrainConfig", "TrainError", "RunResult", "Trainer", "TrainingDiverged", "train"]
