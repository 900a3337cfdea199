"""Training recipes that consume a store: ``usi`` (paper 002), ``adaptive`` (paper 000) and ``plain``.

``reinforce train`` on the command line; from Python::

    from reinforce.recipes import TrainConfig, train
    result = train(TrainConfig(train_source="data/train", store="train.reinforce.zarr", val_source="data/val",
                               model="resnet18", recipe="usi", epochs=100, out="runs/r18"))

How a run flows: :func:`~.settings.resolve` (config + :data:`RECIPES` -> frozen :class:`~.settings.Settings`),
:mod:`.data` (samples), :mod:`.models` (student), :mod:`.preflight` (teacher check, LR), :mod:`.loop` (the
:class:`Trainer`, its parts from :mod:`.factories`, validation from :mod:`.validation`, checkpoints from
:mod:`.checkpoint` beside the :mod:`.run` directory).
"""

from .config import RECIPES, TrainConfig
from .errors import TrainError, TrainingDiverged
from .loop import Trainer
from .settings import Settings, resolve
from .train import RunResult, train

__all__ = ["RECIPES", "RunResult", "Settings", "TrainConfig", "TrainError", "Trainer", "TrainingDiverged", "resolve",
           "train"]
