"""One optimizer step over the same global batch does not depend on how it
is split across workers.

``train.global_batch_tokens`` fixes the global batch: 1 worker x 2
micro-batches and 2 workers x 1 micro-batch draw the same 16 examples (the
MixtureSampler's global order). The step's gradient should be that of the
mean completion-token NLL over all ranks (what ``StepOutcome.loss`` reports,
and how ADAPT's signal normalises), i.e. the same either way. It was not
while each rank divided by its own completion count before DDP averaged
the ranks (48% apart here, ranks holding 34 and 76 completion tokens)."""

from __future__ import annotations

import socket

import pytest
import torch

from raymix.config import load_config

SMALL = [
    "data.sources=[{kind: synthetic, scale: 0.02}]",
    "data.max_test=4",
    "model.vocab_size=512",
    "train.micro_batch_size=8",
    "train.packing=false",
    "train.grad_clip=0",
    "runtime.num_workers=0",
    "budget.tokens=3000",
    "eval.suite=null",
]


def _cfg(world: int):
    cfg = load_config(None, SMALL)
    gbt = 2 * cfg.train.micro_batch_size * cfg.data.max_seq_len  # 2 micro-batches of 8 on 1 worker
    return load_config(None, SMALL + [f"train.global_batch_tokens={gbt}"])


class _DDPSession:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def context(self):
        return self.rank, self.world

    def device(self):
        return torch.device("cpu")

    def prepare_model(self, model, parallelism="ddp"):
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)


def _one_step(loop, session):
    """Build the worker and its TrainStep, take one step, return the
    gradient the optimizer was given and the step's reported loss."""
    import numpy as np

    from raymix.loop.setup import Worker
    from raymix.loop.step import TrainStep

    w = Worker.build(loop, session)
    step = TrainStep(w)
    seen = {}

    def record():
        seen.update({n: p.grad.detach().clone() for n, p in w.raw_model.named_parameters()})
    w.optimizer.step = record
    T = len(loop.pool.tasks)
    out = step(np.full(T, 1.0 / T), 0.5)
    return seen, out.loss, float(out.stats[0].sum()), step.accum


def _worker(rank, world, port, loop, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        grads, loss, tokens, accum = _one_step(loop, _DDPSession(rank, world))
        if rank == 0:
            torch.save({"grads": grads, "loss": loss, "tokens": tokens, "accum": accum}, out)
    finally:
        dist.destroy_process_group()


def _loop(prepared, cfg):
    from raymix.loop import LoopConfig

    pool, tok_dir, init_dir = prepared
    return LoopConfig(run=cfg, pool=pool, budget_tokens=cfg.budget.tokens, tokenizer_dir=tok_dir,
                      init_model_dir=init_dir)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_step_does_not_depend_on_the_worker_count(prepared, tmp_path) -> None:
    import torch.multiprocessing as mp

    from raymix.loop import InProcessSession

    one, loss1, tokens1, accum1 = _one_step(_loop(prepared, _cfg(1)), InProcessSession(False, str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, _loop(prepared, _cfg(2)), out), nprocs=2)
    two = torch.load(out, weights_only=False)
    assert (accum1, two["accum"]) == (2, 1)
    # The same 16 examples, the same reported mean loss...
    assert two["tokens"] == tokens1
    assert two["loss"] == pytest.approx(loss1, rel=1e-9)
    # ...and the same gradient, to float32 summation order (the two ranks'
    # sums are averaged where one rank accumulates both micro-batches).
    worst = max(float((two["grads"][n] - g).norm() / g.norm()) for n, g in one.items())
    assert worst < 1e-4, f"gradient differs by {worst:.2%} (relative norm) between 1 and 2 workers"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tests.conftest import prepare_pool
    return prepare_pool(tmp_path_factory, SMALL)
