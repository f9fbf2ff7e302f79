"""Run code when a framework is imported, without importing it ourselves.

`when_imported("tf_keras", register)` calls `register(module)` now when
tf_keras is already imported, or right after `import tf_keras` (however it is
reached: directly, through `tf.keras` under TF_USE_LEGACY_KERAS=1, or by
`tf_keras.models.load_model` in a process that only imported this package) has
executed the module. The losses use it to register their serializable classes
with frameworks that are optional dependencies (tf_keras here; Keras 3's
backends-specific front doors can use it for `keras` itself), so that
`import fused_masked_mae` is all a saved model needs, and a process that never
uses the framework never imports it.

How: a finder at the front of `sys.meta_path` that only answers for the
awaited module names; it asks the other finders for the module's spec and
wraps that spec's loader so that the callbacks run after the module's code.
A callback that raises is logged, never breaks the import.
"""

import importlib.abc
import importlib.util
import logging
import sys
import threading

_log = logging.getLogger("fused_masked_mae")
_lock = threading.RLock()
_pending = {}  # module name -> [callback, ...]
_searching = set()  # names whose spec the finder is looking up (no recursion)


def _run(callbacks, module):
    for callback in callbacks:
        try:
            callback(module)
        except Exception as error:  # noqa: BLE001 (a registration must not break an import)
            _log.warning("fused_masked_mae: registering with %s failed: %r", module.__name__,
                         error)


def _ready(module):
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        with _lock:
            if fullname not in _pending or fullname in _searching:
                return None
            _searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            with _lock:
                _searching.discard(fullname)
        loader = getattr(spec, "loader", None)
        # Only a loader object of this one module can be wrapped (a class used
        # as a loader, as for built-in modules, is shared).
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return None
        exec_module = loader.exec_module

        def exec_then_notify(module):
            exec_module(module)
            with _lock:
                callbacks = _pending.pop(fullname, [])
            _run(callbacks, module)

        loader.exec_module = exec_then_notify
        return spec


_finder = _PostImportFinder()


def when_imported(module_name, callback):
    """Calls `callback(module)` once `module_name` is imported: at once when it
    already is, else right after its import. Never imports it."""
    module = sys.modules.get(module_name)
    if module is not None and _ready(module):
        _run([callback], module)
        return
    with _lock:
        _pending.setdefault(module_name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
