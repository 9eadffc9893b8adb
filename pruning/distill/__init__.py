"""Fine-tuning of a weight-pruned model from the unpruned one, masks fixed: the expert term (``loss``), the
training loop (``train``), its resumable states (``state``) and the same training over W processes with
fully sharded models (``distributed``: PyTorch FSDP2 through torchrun)."""

# Columns of a run's history.csv (one row per optimiser step).
HISTORY_FIELDS = ["step", "epoch", "lr", "loss", "ce_loss", "expert_loss", "weighted_expert_loss", "grad_norm"]
