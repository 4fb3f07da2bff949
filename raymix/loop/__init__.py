"""The training loop, as parts (one module each):

- ``loop.py``: :func:`train_loop`, the table of contents;
- ``setup.py``: the worker's context (rank, device, model under its parallelism);
- ``step.py``: the optimizer step and the streams it samples from;
- ``exchange.py``: the mixture in force, and the reports to the mixer actor;
- ``hooks.py``: the loss curve, the training metrics, the progress file;
- ``checkpoint.py``: the checkpoint format and the checkpointer over the parts;
- ``final.py``: the final evaluation and checkpoint;
- ``evaluation.py``: per-task validation loss and exact match on the pool's splits;
- ``session.py``: a Ray Train worker, or the calling process;
- ``contract.py``: what the driver sends in (``LoopConfig``) and gets back (``LoopResult``).

A policy's work on the workers comes in through ``raymix.policies.signal``.
"""

from raymix.loop.contract import LoopConfig, LoopResult
from raymix.loop.loop import train_loop
from raymix.loop.session import InProcessSession, RayTrainSession

__all__ = ["InProcessSession", "LoopConfig", "LoopResult", "RayTrainSession", "train_loop"]
