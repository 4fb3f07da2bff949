"""raymix: learned task mixtures for budgeted multi-task fine-tuning, on Ray."""

__version__ = "0.1.0"

# Registers the built-in policies (raymix.registry), which the config checks
# ``policy.name`` against: every entry point sees them. Pure NumPy: no torch.
from raymix import policies as _policies  # noqa: E402,F401
