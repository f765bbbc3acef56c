"""clear_fast: CleaR (Clean Routing) for fine-tuning on noisy labels, fast.

Public names are imported lazily so that ``import clear_fast`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RoutedLoRALinear": "clear_fast.lora",
    "routed_lora_linear": "clear_fast.lora",
    "GaussianMixture1D": "clear_fast.mixture",
    "clean_probability": "clear_fast.mixture",
    "clear_loss": "clear_fast.losses",
    "TrainedClassifier": "clear_fast.predict",
    "inject_routed_lora": "clear_fast.model",
    "Router": "clear_fast.model",
    "save_adapter": "clear_fast.model",
    "merge_and_unload": "clear_fast.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clear_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
