"""GPU-side multi-crop pipeline on NVIDIA DALI (issue 4), with the native fused colour operator.

Light on purpose: the external-source worker processes import this package, so the torch-using
parts load lazily. Public API:

* ``build_dali_loader(cfg, rank=0, world_size=1, epoch=0, start_batch=0, device_id=None)``
* ``DaliMultiCropLoader`` (the iterable), ``build_pipeline`` (the DALI graph),
  ``MultiCropSource`` (the external source), ``ViewSpec`` / ``sample_fast`` (parameters),
  ``load_plugin`` (the native operator).
"""
_LAZY = {
    "build_dali_loader": ".loader",
    "DaliMultiCropLoader": ".loader",
    "DaliPipelineError": ".loader",
    "find_undecodable": ".loader",
    "build_pipeline": ".graph",
    "MultiCropSource": ".source",
    "ViewSpec": ".params",
    "PackedParams": ".params",
    "sample_fast": ".params",
    "load_plugin": ".plugin",
    "inspect_encoded": ".validate",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
