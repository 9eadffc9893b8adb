"""Fine-tuning of a weight-pruned model from the unpruned one, masks fixed: the expert term (``loss``), the
training loop (``train``) and its resumable states (``state``)."""
