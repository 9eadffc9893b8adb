"""DeepSeek-V2, DeepSeek-V3 and GLM-4.5 (glm4_moe) (transformers 5.24): ``model.layers[i].mlp`` = *MoE(gate:
TopkRouter, experts, shared_experts); the first ``first_k_dense_replace`` layers are dense MLPs.

The router computes logits in fp32 and multiplies the combine weights by ``routed_scaling_factor``.
- DeepSeek-V2: softmax scores; ``topk_method`` 'greedy' (top-k) or 'group_limited_greedy' (each of ``n_group``
  groups scored by its largest score, top-k among the ``topk_group`` best groups); no renormalisation.
- DeepSeek-V3 / GLM-4.5: sigmoid scores; the buffer ``e_score_correction_bias`` is added for choosing only;
  groups scored by the sum of their two best choice scores; the chosen (unbiased) scores renormalised if
  ``norm_topk_prob``.
Removing experts index-selects the router's bias too; with a group-limited router every group must keep the
same number of experts (``check_keep``). The hub's checkpoints hold per-expert gate_proj / up_proj / down_proj.
"""
from __future__ import annotations

import torch

from .. import moe
from .adapter import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    expert_count_keys = ("n_routed_experts", "num_local_experts", "num_experts")
    shared_name = "shared_experts"
    logits_dtype = torch.float32

    def is_moe_layer(self, idx):
        return idx >= int(self._config("first_k_dense_replace", 0) or 0)

    def rule(self):
        return moe.TopK(self.top_k, "sigmoid", normalize=bool(self._config("norm_topk_prob", True)),
                        scale=float(self._config("routed_scaling_factor", 1.0)), n_group=int(self._config("n_group") or 1),
                        topk_group=int(self._config("topk_group") or 1), group_score="top2_sum")


class Glm4MoeAdapter(DeepseekV3Adapter):
    family = "glm4_moe"


class DeepseekV2Adapter(DeepseekV3Adapter):
    family = "deepseek_v2"

    def problems(self):
        method = self._config("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            return super().problems() + [f"model.name_or_path: topk_method {method!r} is not a DeepSeek-V2 routing; "
                                         f"allowed: greedy, group_limited_greedy"]
        return super().problems()

    def rule(self):
        grouped = self._config("topk_method", "greedy") == "group_limited_greedy"
        return moe.TopK(self.top_k, "softmax", normalize=False, scale=float(self._config("routed_scaling_factor", 1.0)),
                        n_group=int(self._config("n_group") or 1) if grouped else 1,
                        topk_group=int(self._config("topk_group") or 1) if grouped else 1, group_score="max")
