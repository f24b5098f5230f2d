"""`app.api.schemas` re-exports every model of its entity modules, and nothing else."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from pydantic import BaseModel

import app.api.schemas as schemas


def test_the_package_exports_every_model_of_its_modules():
    models = set()
    for info in pkgutil.iter_modules(schemas.__path__):
        module = importlib.import_module(f"{schemas.__name__}.{info.name}")
        models |= {
            name
            for name, value in vars(module).items()
            if inspect.isclass(value) and issubclass(value, BaseModel)
            and value.__module__ == module.__name__
        }  # fmt: skip
    assert models <= set(schemas.__all__)
    assert schemas.__all__ == sorted(schemas.__all__)
    assert all(hasattr(schemas, name) for name in schemas.__all__)
