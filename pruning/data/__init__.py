"""Data: the built-in offline ``corpus``, text ``sources`` and the token windows cut from them, and the local
lm-eval tasks built from the held-out split (``lm_tasks``)."""
