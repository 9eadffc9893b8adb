"""Evaluation of a model: token ``perplexity`` (the Wanda protocol), zero-shot accuracy and word perplexity
through lm-evaluation-harness (``lm_harness``), expert ``usage`` per token, and the MoE-block output error
the layer-wise methods minimise (``block_error``)."""
