"""Module paths that moved in 0.2 keep importing, for one release, with a ``DeprecationWarning``.

A meta-path finder maps each old dotted path to its new module and registers the *same* module
object under the old name, so ``import hbmplan.schedules.offload`` and monkeypatching through it
reach the code that runs. Nothing else is imported until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED = {
    "hbmplan.planner.capture": "hbmplan.runtime.capture",
    "hbmplan.planner.replay": "hbmplan.runtime.replay",
    "hbmplan.planner.activations": "hbmplan.capacity.step_bytes",
    "hbmplan.planner.frontier": "hbmplan.capacity.frontier",
    "hbmplan.planner.presets": "hbmplan.capacity.presets",
    "hbmplan.schedules.offload": "hbmplan.runtime.offload",
    "hbmplan.schedules.stats": "hbmplan.runtime.stats",
    "hbmplan.schedules.logprobs": "hbmplan.kernels.logprobs",
    "hbmplan.flops": "hbmplan.capacity.flops",
}
"""Old module path -> new module path."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the new module ran when it was imported; the import system has just set its __spec__
        # to the old path's: give it back its own
        module.__spec__ = self._specs[module.__name__]


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before any finder that could find a stale file
