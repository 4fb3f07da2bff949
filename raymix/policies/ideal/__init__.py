"""IDEAL: influence-guided data volumes, over several training rounds.

``policy.py``: the volumes and their update (pure NumPy). ``influence.py``:
the influence scores with identity, Fisher, K-FAC or EK-FAC curvature
(torch). ``scoring.py``: scoring a round's checkpoint. The rounds themselves
are driven by ``raymix.driver.ideal`` (named in the registry entry).
"""

from raymix.policies.ideal.policy import (
    capped_volumes,
    initial_volumes,
    next_volumes,
    round_to_total,
    round_weights,
)

__all__ = ["capped_volumes", "initial_volumes", "next_volumes", "round_to_total", "round_weights"]
