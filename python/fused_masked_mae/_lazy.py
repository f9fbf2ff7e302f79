"""Run code once a framework module is imported, without importing it ourselves.

`import fused_masked_mae` imports no framework; but once TensorFlow is
imported the op library must be loaded (a SavedModel calling the op needs it),
once Keras is imported the losses must be registered for `.keras` loading, and
once tf_keras is imported (directly, through `tf.keras` under
TF_USE_LEGACY_KERAS=1, or by `tf_keras.models.load_model` in a process that
only imported this package) TfKerasMaskedMAE must be registered with it.
`when_imported(name, callback)` calls `callback(module)` now if `name` is
already imported, else right after its import finishes. It never imports
`name`: a process that never uses the framework never imports it.

Callbacks wait for the outermost watched import: `import keras` on the
TensorFlow backend imports tensorflow inside it, and the TensorFlow callback
(which imports modules that use Keras) runs only after keras is complete.

How: a finder at the front of `sys.meta_path` that only answers for the
awaited module names; it asks the other finders for the module's spec and
wraps that spec's loader so that the callbacks run after the module's code.
A callback that raises is logged and warned about, never breaks the import
(the same failure is raised again where the package's API is used).
"""

import importlib.abc
import logging
import sys
import threading
import warnings

_log = logging.getLogger("fused_masked_mae")
_lock = threading.RLock()
_waiting = {}  # module name -> callbacks to run after its import
_queued = []  # (callback, module) whose module finished importing inside another watched import
_depth = 0  # watched imports in progress (nested)


def when_imported(name, callback):
    """Calls `callback(module)` once module `name` is imported: at once when it
    already is, else right after its (outermost watched) import. Never imports it."""
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
        _run(callback, module)


def _run(callback, module):
    # Inside someone else's import: a failure is reported, never raised into it.
    try:
        callback(module)
    except Exception as error:  # noqa: BLE001
        _log.warning("fused_masked_mae: setting up for %s failed: %r", module.__name__, error)
        warnings.warn(f"fused_masked_mae: setting up for {module.__name__} failed: {error}",
                      ImportWarning, stacklevel=2)


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
        # Only a loader object of this one module can be wrapped (a class used
        # as a loader, as for built-in modules, is shared).
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
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
                _queued.extend((callback, module) for callback in _waiting.pop(name, []))
                if _depth:
                    return
                ready, _queued[:] = list(_queued), []
            for callback, done in ready:
                _run(callback, done)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec
