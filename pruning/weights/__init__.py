"""Pruning of expert weights: the sparsity ``pattern``, importance ``scores``, mask selection and mask files
(``masks``), per-expert Hessians (``hessian``) for ``sparsegpt``, one layer's pruning (``prune``), writing masks
and updated weights into a model (``assemble``) and measuring what came out (``sparsity``)."""
