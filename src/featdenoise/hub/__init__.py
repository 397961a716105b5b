"""Models named by users: specs for any library or code (:mod:`~featdenoise.hub.specs`) and their
weights files (:mod:`~featdenoise.hub.weights`)."""

from featdenoise.hub.specs import build_spec, is_code_spec
from featdenoise.hub.weights import load_weights, read_state_dict

__all__ = ["build_spec", "is_code_spec", "load_weights", "read_state_dict"]
