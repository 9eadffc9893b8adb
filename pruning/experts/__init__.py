"""Pruning of whole experts: NAEE's reconstruction ``search``, the score and random ``baselines``, ``removal``
of the dropped experts into a real smaller checkpoint, and dynamic ``skipping`` of second experts."""
