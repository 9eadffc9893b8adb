"""Models: one adapter per MoE family (everything that differs between families), reading and loading
checkpoints, and the embedded tiny model.

``get_adapter(config)`` picks the adapter for a config's ``model_type``. Adding a family (Qwen2/3-MoE, OLMoE,
DeepSeek) means one small module with a ``MoEAdapter`` subclass and one line in ``_FAMILIES``.
"""
from __future__ import annotations

from .adapter import MoEAdapter, UnsupportedModelError
from .mixtral import MixtralAdapter

_FAMILIES: dict[str, type[MoEAdapter]] = {"mixtral": MixtralAdapter}

SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def get_adapter(config) -> MoEAdapter:
    if isinstance(config, dict):
        from types import SimpleNamespace

        config = SimpleNamespace(**config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported MoE families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _FAMILIES[model_type](config)


__all__ = ["MoEAdapter", "UnsupportedModelError", "get_adapter", "SUPPORTED_MODEL_TYPES"]
