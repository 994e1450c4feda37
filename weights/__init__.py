"""Checkpoint discovery, key conversion and loading: `load_model(path) -> Model`."""
from weights.files import CheckpointError
from weights.model import Model, load_model

__all__ = ["CheckpointError", "Model", "load_model"]
