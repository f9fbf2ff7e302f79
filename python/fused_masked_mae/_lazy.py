"""Run a callback once a framework module is imported, without importing it.

`import fused_masked_mae` imports no framework; but once TensorFlow is
imported the op library must be loaded (a SavedModel calling the op needs it)
and once Keras is imported the losses must be registered for `.keras`
loading. `when_imported(name, callback)` runs callback() now if `name` is
already imported, else right after its import finishes.

Callbacks wait for the outermost watched import: `import keras` on the
TensorFlow backend imports tensorflow inside it, and the TensorFlow callback
(which imports modules that use Keras) runs only after keras is complete.
"""

import importlib.abc
import sys
import threading
import warnings

_lock = threading.RLock()
_waiting = {}  # module name -> callbacks to run after its import
_queued = []  # callbacks whose module finished importing inside another watched import
_depth = 0  # watched imports in progress (nested)


def when_imported(name, callback):
    """callback() now if module `name` is imported, else after its import."""
    with _lock:
        module = sys.modules.get(name)
        if module is not None and not _initializing(module):
            run_now = True
        else:
            run_now = False
            _waiting.setdefault(name, []).append(callback)
            if not any(isinstance(f, _Finder) for f in sys.meta_path):
                sys.meta_path.insert(0, _Finder())
    if run_now:
        callback()


def _run(callback, name):
    # Inside someone else's import: a failure is reported, never raised into it
    # (the same failure is raised again where the package's API is used).
    try:
        callback()
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"fused_masked_mae: setting up for {name} failed: {error}", ImportWarning,
                      stacklevel=2)


def _initializing(module):
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of a watched module so that its import, once done,
    runs the module's callbacks."""

    def find_spec(self, name, path, target=None):
        if name not in _waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            global _depth
            with _lock:
                _depth += 1
            try:
                original(module)
            except BaseException:
                with _lock:
                    _depth -= 1
                raise
            with _lock:
                _depth -= 1
                _queued.extend(_waiting.pop(name, []))
                if _depth:
                    return
                ready, _queued[:] = list(_queued), []
            for callback in ready:
                _run(callback, name)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec
