"""Where models live: names on the model search path -> folders. No torch here: the node's own
process (which never imports torch) resolves the model it ships to Ray actors, and `dicomnode
config check` reports the model without loading it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


class ModelError(RuntimeError):
    """A model directory that cannot be used; the message names the file."""


DEFAULT_MODEL = "t2fs2petfusion"  # the shipped model's folder name; "default" resolves to it
REPO_MODELS = Path(__file__).resolve().parents[1] / "models"  # a source checkout or editable install
PREFIX_MODELS = Path(sys.prefix) / "share" / "dicomnode" / "models"  # where `pip install .` puts models/
SYSTEM_MODELS = Path("/usr/share/dicomnode/models")


def model_search_path() -> list[Path]:
    """Where model names are looked up, in order: $DICOMNODE_MODELS, the source tree's models/, the
    installation's share/dicomnode/models (a wheel install), /usr/share/dicomnode/models."""
    dirs = [Path(p) for p in os.environ.get("DICOMNODE_MODELS", "").split(os.pathsep) if p]
    return list(dict.fromkeys(dirs + [REPO_MODELS, PREFIX_MODELS, SYSTEM_MODELS]))


def resolve_model(model: str) -> Path:
    """A model name (or "default") -> its folder on the search path; a path is used as it is."""
    if not model or model == "none":
        raise ModelError("no model configured ([inference] model is empty or 'none')")
    is_path = os.sep in model or model.startswith((".", "~")) or Path(model).is_absolute()
    if is_path:
        path = Path(model).expanduser()
        if not (path / "model.json").is_file():
            raise ModelError(f"model folder {path} does not exist or has no model.json")
        return path
    name = DEFAULT_MODEL if model == "default" else model
    tried = [d / name for d in model_search_path()]
    for path in tried:
        if (path / "model.json").is_file():
            return path
    what = f"the shipped model {name!r}" if model == "default" else f"model {name!r}"
    raise ModelError(f"{what} not found; looked for model.json in: {', '.join(map(str, tried))}. "
                     "Train/export one (docs/user-guide/research/training.md), set DICOMNODE_MODELS, or give a folder path")
