"""Saving and loading result dataclasses as JSON: exact float64 numbers, readable, and no pickle."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np

ResultType = TypeVar("ResultType", bound="JsonResult")


class JsonResult:
    """Mixin for dataclasses whose ``values`` is a numpy array: ``.save(path)`` and ``Class.load(path)``."""

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (its class name, its fields; arrays as nested lists); returns the path."""
        path = Path(path)
        record = {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in asdict(self).items()}
        path.write_text(json.dumps({"type": type(self).__name__, **record}, indent=1))
        return path

    @classmethod
    def load(cls: type[ResultType], path: str | Path) -> ResultType:
        """Read a result that :meth:`save` wrote; a file of another type is refused."""
        record = json.loads(Path(path).read_text())
        if record.pop("type", None) != cls.__name__:
            raise ValueError(f"{path} does not hold a {cls.__name__}")
        return cls(**record)
