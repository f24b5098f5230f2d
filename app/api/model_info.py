"""What the API process can tell about the configured base model without loading it (it loads
weights only to serve generation): its name, and its layer count when its `config.json` can be
read (a local folder, or the demo model once converted). Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from app.ml.demo import DEMO_NAME
from app.settings import Settings

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def model_folder(settings: Settings) -> Path | None:
    """The folder the workers load the model from, when it is one on this machine."""
    if settings.model == "demo":
        return Path(settings.cache_dir).expanduser() / "models" / DEMO_NAME
    path = Path(settings.model).expanduser()
    return path if path.is_dir() else None


def model_name(settings: Settings) -> str:
    """How the model is named to users: the demo's name, a folder's or file's last part, or the
    hub id (never a path of this machine)."""
    if settings.model == "demo":
        return DEMO_NAME
    path = Path(settings.model).expanduser()
    if path.exists() or settings.model.startswith(("/", ".", "~")):
        return path.name
    return settings.model


def layer_count(settings: Settings) -> int | None:
    """The model's decoder layers from its config.json; None when it cannot be read here."""
    return _first_size(_config(settings), _LAYER_KEYS)


def _config(settings: Settings) -> dict:
    folder = model_folder(settings)
    if folder is None:
        return {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("text_config", config) if isinstance(config, dict) else {}


def _first_size(config: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
