"""raymix: learned task mixtures for budgeted multi-task fine-tuning, on Ray."""

__version__ = "0.1.0"
