"""Optional dependencies: imported when a feature needs them, with an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from taskvec.errors import TaskVecError

# The extra of pyproject.toml that installs each optional top-level module.
EXTRAS = {
    "transformers": "hf",
    "matplotlib": "plot",
    "sklearn": "bases",
    "psutil": "bench",
}


class MissingDependencyError(TaskVecError, ImportError):
    """A feature needs an optional package that is not installed; the message names the extra."""


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import `module` (e.g. 'matplotlib.pyplot'), or raise MissingDependencyError saying which
    `pip install 'taskvec[extra]'` provides it. `extra` defaults to the one listed for its top-level package."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = extra or EXTRAS.get(top, "bench")
        raise MissingDependencyError(
            f"{module} is not installed; this feature needs it: pip install 'taskvec[{extra}]'"
        ) from e
