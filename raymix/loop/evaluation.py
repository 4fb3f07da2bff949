"""End-of-run evaluation on each task's own splits: validation and test loss
(mean token NLL over completion tokens) and exact match of greedy generation on a
bounded sample of the test split. Out-of-domain benchmarks go through lm-eval
(``raymix.eval``); this module only scores the pool's tasks, in-process, on
the model being trained: at evenly spaced points of the budget
(:class:`CurveEvaluator`) and once at the end.
"""

from __future__ import annotations

import re

import numpy as np

from raymix.loss import token_nll
from raymix.streams import collate, read_split


def validation_losses(model, pool, pad_id: int, batch_size: int, device="cpu") -> dict[str, float]:
    """Mean completion-token NLL per task on its whole validation split (the
    split ADAPT's meta-gradient reads)."""
    return split_losses(model, pool, "val", pad_id, batch_size, device)


def losses_on_test(model, pool, pad_id: int, batch_size: int, device="cpu") -> dict[str, float]:
    """The same on the test split (``data.max_test`` examples per task at
    most), which no policy reads: what runs are compared on."""
    return split_losses(model, pool, "test", pad_id, batch_size, device)


def split_losses(model, pool, split: str, pad_id: int, batch_size: int, device="cpu") -> dict[str, float]:
    import torch

    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for task in pool.tasks:
            rows = read_split(pool.shard_dir(split, task), ["input_ids", "prompt_len"])
            examples = [(np.asarray(i, dtype=np.int64), int(p)) for i, p in zip(rows["input_ids"], rows["prompt_len"])]
            total, count = 0.0, 0.0
            for s in range(0, len(examples), batch_size):
                nll, cnt = token_nll(model, collate(examples[s : s + batch_size], pad_id), device)
                total += float(nll.sum())
                count += float(cnt.sum())
            out[task] = total / count if count else float("nan")
    return out


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(
    model, tokenizer, pool, max_examples: int, max_new_tokens: int, batch_size: int, device="cpu"
) -> dict[str, float]:
    """Share of test prompts whose greedy continuation equals a reference."""
    import torch

    model.eval()
    pad_id = tokenizer.pad_token_id
    out: dict[str, float] = {}
    with torch.no_grad():
        for task in pool.tasks:
            rows = read_split(pool.shard_dir("test", task), ["input_ids", "prompt_len", "references"])
            n = min(max_examples, len(rows["input_ids"]))
            if n == 0:
                out[task] = float("nan")
                continue
            hits = 0
            for s in range(0, n, batch_size):
                prompts = [list(ids[:p]) for ids, p in zip(rows["input_ids"][s : min(n, s + batch_size)], rows["prompt_len"][s : min(n, s + batch_size)])]
                width = max(len(p) for p in prompts)
                # Left padding so every row's answer starts at the same column.
                ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, p in enumerate(prompts):
                    ids[r, width - len(p) :] = torch.tensor(p)
                    mask[r, width - len(p) :] = 1
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
                for text, refs in zip(texts, rows["references"][s : min(n, s + batch_size)]):
                    if normalise_answer(text) in {normalise_answer(r) for r in refs}:
                        hits += 1
            out[task] = hits / n
    return out


class CurveEvaluator:
    """Per-task loss on a fixed subset of a split (validation by default),
    sharded over ranks and all-reduced, at evenly spaced fractions of the budget."""

    def __init__(self, pool, per_task: int, rank: int, world: int, pad_id: int, batch_size: int, device,
                 lockstep: bool = False, split: str = "val"):
        self.tasks = pool.tasks
        self.examples, self.owner = [], []
        per_rank = [0] * world
        self.filler = None  # any example, for lockstep forwards on a rank with none of its own
        for i, task in enumerate(pool.tasks):
            rows = read_split(pool.shard_dir(split, task), ["input_ids", "prompt_len"])
            for j, (ids, plen) in enumerate(zip(rows["input_ids"][:per_task], rows["prompt_len"][:per_task])):
                per_rank[(i * per_task + j) % world] += 1
                if self.filler is None:
                    self.filler = [(np.asarray(ids, dtype=np.int64), int(plen))]
                if (i * per_task + j) % world == rank:
                    self.examples.append((np.asarray(ids, dtype=np.int64), int(plen)))
                    self.owner.append(i)
        self.pad_id, self.batch_size, self.device = pad_id, batch_size, device
        # Under FSDP every forward is a collective (it gathers each layer's
        # shards from all ranks): every rank must run as many as the busiest
        # one, so a rank with fewer examples repeats a batch and drops it.
        self.forwards = -(-max(per_rank) // batch_size) if lockstep else None

    def __call__(self, model, all_reduce) -> tuple[np.ndarray, np.ndarray]:
        """(val loss per task, tokens read per task), identical on all ranks."""
        import torch

        T = len(self.tasks)
        sums = torch.zeros(3, T, dtype=torch.float64)
        was_training = model.training
        model.eval()
        starts = list(range(0, len(self.examples), self.batch_size))
        with torch.no_grad():
            for s in starts:
                batch = collate(self.examples[s : s + self.batch_size], self.pad_id)
                nll, cnt = token_nll(model, batch, self.device)
                owner = torch.tensor(self.owner[s : s + self.batch_size])
                sums[0].index_add_(0, owner, nll.double().cpu())
                sums[1].index_add_(0, owner, cnt.double().cpu())
                sums[2].index_add_(0, owner, batch["attention_mask"].sum(1).double())
            if self.forwards is not None and self.forwards > len(starts):
                filler = collate(self.examples[: self.batch_size] or self.filler, self.pad_id)
                for _ in range(self.forwards - len(starts)):
                    token_nll(model, filler, self.device)  # result unused: only keeps the collectives paired
        model.train(was_training)
        all_reduce(sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = (sums[0] / sums[1]).numpy()
        return loss, sums[2].numpy()
