"""Models named by users: specs for any library or code (:mod:`~featdenoise.hub.specs`), their
weights files (:mod:`~featdenoise.hub.weights`) and the one builder of both
(:mod:`~featdenoise.hub.build`)."""

from featdenoise.hub.build import build_model, build_spec
from featdenoise.hub.specs import is_code_spec
from featdenoise.hub.weights import load_weights, read_state_dict

__all__ = ["build_model", "build_spec", "is_code_spec", "load_weights", "read_state_dict"]
