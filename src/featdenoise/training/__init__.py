"""Adversarial training (paper Sec. 5): :func:`train` runs a job from a config and returns its run
directory; :func:`featdenoise.hub.checkpoints.load_model` rebuilds the trained network.

The package, bottom up: ``config`` (with ``checks`` and ``yamlio``), ``recipe`` (the pieces every
mode shares), ``step`` (position, step context, non-finite guard), ``recipes`` (one per
``attack.mode``), ``resume``, ``rundir``, ``setup`` (the job) and ``loop`` (epochs and steps).
"""

from featdenoise.hub.checkpoints import load_model
from featdenoise.training.loop import evaluate, train
from featdenoise.training.step import NonFiniteLossError

__all__ = ["NonFiniteLossError", "evaluate", "load_model", "train"]
