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
from raymix.streams import collate


def validation_losses(model, pool, pad_id: int, batch_size: int, device="cpu") -> dict[str, float]:
    """Mean completion-token NLL per task on its whole validation split (the
    split ADAPT's meta-gradient reads)."""
    return split_losses(model, pool, "val", pad_id, batch_size, device)


def losses_on_test(model, pool, pad_id: int, batch_size: int, device="cpu") -> dict[str, float]:
    """The same on the test split (``data.max_test`` examples per task at
    most), which no policy reads: what runs are compared on."""
    return split_losses(model, pool, "test", pad_id, batch_size, device)


def split_examples(pool, split: str, limit: int | None = None, columns=("input_ids", "prompt_len")):
    """Every task's examples of a split (the first ``limit`` of each, by id),
    in the pool's task order, read in one scan: (owner task index, (tokens,
    prompt length), the rows' other ``columns``)."""
    owner, rows = pool.read_split_rows(split, list(columns))
    keep = np.arange(len(owner))
    if limit is not None and len(owner):
        # Position of each row within its task (rows are grouped by task).
        first = np.searchsorted(owner, owner, side="left")
        keep = keep[(keep - first) < limit]
    examples = [(np.asarray(rows["input_ids"][j], dtype=np.int64), int(rows["prompt_len"][j])) for j in keep]
    extra = {c: [rows[c][j] for j in keep] for c in columns if c not in ("input_ids", "prompt_len")}
    return owner[keep].tolist(), examples, extra


def length_batches(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """Indices in order of length (stable), cut into batches of ``batch_size``:
    examples of every task share batches and padding stays small, so
    evaluation costs what its examples cost, whatever the task count."""
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def split_losses(model, pool, split: str, pad_id: int, batch_size: int, device="cpu") -> dict[str, float]:
    """Mean completion-token NLL per task on a split: all tasks' examples
    batched together by length, each example's sums added to its task's."""
    import torch

    model.eval()
    owner, examples, _ = split_examples(pool, split)
    owner_t = torch.tensor(owner, dtype=torch.long)
    sums = torch.zeros(2, len(pool.tasks), dtype=torch.float64)
    with torch.no_grad():
        for idx in length_batches([len(e[0]) for e in examples], batch_size):
            nll, cnt = token_nll(model, collate([examples[i] for i in idx], pad_id), device)
            who = owner_t[torch.from_numpy(idx)]
            sums[0].index_add_(0, who, nll.double().cpu())
            sums[1].index_add_(0, who, cnt.double().cpu())
    return {t: float(sums[0, i] / sums[1, i]) if sums[1, i] > 0 else float("nan") for i, t in enumerate(pool.tasks)}


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(
    model, tokenizer, pool, max_examples: int, max_new_tokens: int, batch_size: int, device="cpu"
) -> dict[str, float]:
    """Share of test prompts (the first ``max_examples`` of each task) whose
    greedy continuation equals a reference; prompts of all tasks are
    generated together (:func:`greedy_answers`)."""
    owner, examples, extra = split_examples(pool, "test", max_examples,
                                            ("input_ids", "prompt_len", "references"))
    # Each prompt's expected answer length: its task's mean completion tokens
    # per training example (the pool's statistics; no test answer is read).
    per_task = pool.completion_per_example(default=0.0)
    texts = greedy_answers(model, tokenizer, [ids[:p] for ids, p in examples], max_new_tokens, batch_size, device,
                           expected=per_task[np.asarray(owner, dtype=np.int64)] if owner else None)
    T = len(pool.tasks)
    hits, count = np.zeros(T), np.zeros(T)
    for i, text in enumerate(texts):
        count[owner[i]] += 1
        if normalise_answer(text) in {normalise_answer(r) for r in extra["references"][i]}:
            hits[owner[i]] += 1
    return {t: float(hits[i] / count[i]) if count[i] else float("nan") for i, t in enumerate(pool.tasks)}


def greedy_answers(model, tokenizer, prompts: list[np.ndarray], max_new_tokens: int, batch_size: int,
                   device="cpu", expected: np.ndarray | None = None) -> list[str]:
    """Each prompt's greedy continuation (decoded), in the prompts' order;
    generated in batches of prompts of similar length, left-padded. With
    ``expected`` (each prompt's expected answer length in tokens), prompts
    are grouped by it (rounded) first: a batch decodes until its longest
    answer ends, so short answers batched with long ones cost the long ones'
    steps (one prompt per task from a thousand tasks mixes them: 0.74 ms
    per prompt at 1,000 tasks against 0.31 ms at 20 ungrouped, 0.30 ms
    against 0.25 ms grouped, in ``python -m raymix.bench task_runs``)."""
    import torch

    model.eval()
    pad_id = tokenizer.pad_token_id
    texts: list[str] = [""] * len(prompts)
    lengths = [len(p) for p in prompts]
    if expected is None:
        batches = length_batches(lengths, batch_size)
    else:
        order = np.lexsort((np.asarray(lengths, dtype=np.int64), np.round(np.asarray(expected, dtype=np.float64))))
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.no_grad():
        for idx in batches:
            width = max(len(prompts[i]) for i in idx)
            # Left padding so every row's answer starts at the same column.
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                p = np.asarray(prompts[i], dtype=np.int64)
                ids[r, width - len(p) :] = torch.from_numpy(p)
                mask[r, width - len(p) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for i, text in zip(idx, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
                texts[i] = text
    return texts


class CurveEvaluator:
    """Per-task loss on a fixed subset of a split (validation by default),
    sharded over ranks and all-reduced, at evenly spaced fractions of the budget."""

    def __init__(self, pool, per_task: int, rank: int, world: int, pad_id: int, batch_size: int, device,
                 lockstep: bool = False, split: str = "val"):
        self.tasks = pool.tasks
        self.examples, self.owner = [], []
        per_rank = [0] * world
        self.filler = None  # any example, for lockstep forwards on a rank with none of its own
        owner, examples, _ = split_examples(pool, split, per_task)
        j = 0
        for k, (i, example) in enumerate(zip(owner, examples)):
            j = j + 1 if k and owner[k - 1] == i else 0  # the example's place within its task
            per_rank[(i * per_task + j) % world] += 1
            if self.filler is None:
                self.filler = [example]
            if (i * per_task + j) % world == rank:
                self.examples.append(example)
                self.owner.append(i)
        # Examples of all tasks batched by length: padding stays small at any task count.
        order = np.argsort([len(e[0]) for e in self.examples], kind="stable")
        self.examples = [self.examples[i] for i in order]
        self.owner = [self.owner[i] for i in order]
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
