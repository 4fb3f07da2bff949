"""Aioli: online estimation of a linear mixing law from probe segments.

``policy.py``: the mixer-side probe schedule, the least-squares fit of A and
the exponentiated update of the mixture (pure NumPy). ``signal.py``: the
worker-side schedule and the per-task losses on a fixed validation set."""

from raymix.policies.aioli.policy import AioliPolicy, fit_mixing_law, num_probes, probe_mixture

__all__ = ["AioliPolicy", "fit_mixing_law", "num_probes", "probe_mixture"]
