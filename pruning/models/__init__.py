"""Models: one adapter per MoE family (everything that differs between families), reading and loading
checkpoints, and the embedded tiny model.

``get_adapter(config)`` picks the adapter for a config's ``model_type``. Adding a family means one small module
with a ``MoEAdapter`` subclass and one line in ``_FAMILIES``.
"""
from __future__ import annotations

from .adapter import MoEAdapter, UnsupportedModelError
from .deepseek import DeepseekV2Adapter, DeepseekV3Adapter, Glm4MoeAdapter
from .gpt_oss import GptOssAdapter
from .mixtral import MixtralAdapter
from .qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter, SoftmaxTopKAdapter

_FAMILIES: dict[str, type[MoEAdapter]] = {
    "mixtral": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
    "qwen3_moe": Qwen3MoeAdapter,
    "olmoe": SoftmaxTopKAdapter,
    "deepseek_v2": DeepseekV2Adapter,
    "deepseek_v3": DeepseekV3Adapter,
    "glm4_moe": Glm4MoeAdapter,
    "gpt_oss": GptOssAdapter,
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def get_adapter(config) -> MoEAdapter:
    if isinstance(config, dict):
        from types import SimpleNamespace

        config = SimpleNamespace(**config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        remote = getattr(config, "auto_map", None)
        if remote:  # the checkpoint brings its own modelling code: never run here unless params allow it
            raise UnsupportedModelError(
                f"model_type {model_type!r} needs the checkpoint's own (remote) code (config.json auto_map: "
                f"{', '.join(sorted(remote))}), which runs only with model.trust_remote_code: true, and no adapter "
                f"supports it; supported MoE families: {', '.join(SUPPORTED_MODEL_TYPES)}")
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported MoE families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _FAMILIES[model_type](config)


__all__ = ["MoEAdapter", "UnsupportedModelError", "get_adapter", "SUPPORTED_MODEL_TYPES"]
