"""Adversarial training (paper Sec. 5): :func:`train` runs a job from a config and returns its run
directory; :func:`featdenoise.hub.checkpoints.load_model` rebuilds the trained network."""

from featdenoise.hub.checkpoints import load_model
from featdenoise.training.loop import NonFiniteLossError, evaluate, train

__all__ = ["NonFiniteLossError", "evaluate", "load_model", "train"]
