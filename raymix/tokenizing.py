"""Tokenising a pool's examples for its shards: the Ray Data callable
(:class:`Tokenize`, one tokenizer per actor), what it is given
(:func:`tokenize_args`) and how many actors run (:func:`tokenizer_actors`).
``raymix.data.prepare_shards`` runs them; the ``data_plane`` benchmark runs
the same callable in one process as its yardstick.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

TOKENIZER_THREADS = 2
"""Calls of :class:`Tokenize` each tokenizer actor runs at once (Ray Data's
``max_concurrent_calls_per_actor``), each encoding its batch on its own
thread, and the free CPUs counted per actor (:func:`tokenizer_actors`).
A call's Python (rendering, truncation, the Arrow table) holds the GIL; its
Rust encoding does not, so two calls overlap one's Python with the other's
encoding. Before, one call at a time encoded on the Rust encoder's two
threads, which then idled through the Python. On 2 CPUs, in 4 alternated
runs of 2 each, the embedded default's 560,800 rows took 14.5 to 15.6 s
with two calls against 17.1 to 19.0 s with one; a 60,000-row pool of
1,000 tasks, whose time is mostly its many small Parquet writes, 3.5 to
5.7 s against 3.1 to 5.1 s (medians 4.4 and 3.4: the second call takes
CPU from the writes). Two actors with one thread each did as well on the
first (14.2 to 15.8 s) but took the second to 6.3 to 7.0 s (a second
actor's start, and its writes); two actors of two threads each
oversubscribed the cores (11 to 12 s there)."""


def tokenizer_actors(free_cpus: float, concurrency: int) -> tuple[int, float]:
    """How many tokenizer actors ``prepare_shards`` runs on ``free_cpus``
    free CPUs (at most ``concurrency``), and the CPUs each reserves: one
    actor (of :data:`TOKENIZER_THREADS` calls at once) per that many CPUs,
    at least one, each reserving 0.9 CPU. The reservation is Ray's accounting, not the threads' use: the
    rest goes to the Parquet writes, 0.1 each, which run best many at a
    time (on 2 CPUs, one actor reserving 0.9 left room for 11 writes and
    prepared the 1,000-task pool in 4 to 5 s; reserving 1.9, one write at a
    time, 11 to 12.5 s). Never a whole CPU: actors holding every CPU would
    starve the writes, and the pipeline would hang."""
    return max(1, min(concurrency, int(free_cpus // TOKENIZER_THREADS))), 0.9


def tokenize_args(tokenizer_name: str, template: str, max_seq_len: int) -> dict:
    """The keyword arguments of :class:`Tokenize` for a pool: with
    ``encoder`` (the Rust tokenizer serialised, with its bos and eos ids)
    where a fast tokenizer renders the examples without a chat template,
    which is then all that tokenising them needs. Loads the tokenizer here,
    once."""
    from raymix.models import load_tokenizer, uses_chat_template

    tok = load_tokenizer(tokenizer_name)
    args = {"tokenizer_name": tokenizer_name, "template": template, "max_seq_len": max_seq_len}
    if getattr(tok, "is_fast", False) and not uses_chat_template(tok, template):
        args["encoder"] = {"json": tok.backend_tokenizer.to_str(), "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    return args


class Tokenize:
    """Ray Data callable class: one tokenizer per actor, reused over batches.

    ``encoder`` (from :func:`tokenize_args`): the fast tokenizer's Rust
    encoder, rebuilt from its serialisation with the ``tokenizers`` library
    alone. Why not always transformers' tokenizer: loading it imports
    transformers and torch, 1.8 s of each actor's start on 2 cores for
    nothing that a pool without a chat template uses (the ids are the same
    encoder's; ``python -m raymix.bench data_plane``). A chat template is
    rendered by transformers' ``apply_chat_template``, so then (and for a
    slow tokenizer) each actor loads the tokenizer by ``tokenizer_name``."""

    def __init__(self, tokenizer_name: str, template: str, max_seq_len: int, encoder: Optional[dict] = None,
                 threads: Optional[int] = None):
        """``threads``: the Rust encoder's threads per call in this
        process, set before its first batch, unless the environment sets
        them: 1 encodes on the calling thread (``TOKENIZERS_PARALLELISM=false``),
        as ``prepare_shards``'s actors do, which run several calls at once
        (:data:`TOKENIZER_THREADS`); the encoder releases the GIL, so the
        calls' encodings overlap. ``None``: the encoder's default, all
        cores, which suits one call at a time (the ``data_plane``
        benchmark's one-process yardstick)."""
        if threads == 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        elif threads is not None:
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        self.max_len = max_seq_len
        if encoder is not None:
            from tokenizers import Tokenizer

            self.tok, self.chat = None, False
            self.backend = Tokenizer.from_str(encoder["json"])
            bos, self.eos = encoder["bos"], encoder["eos"]
        else:
            from raymix.models import load_tokenizer, uses_chat_template

            self.tok = load_tokenizer(tokenizer_name)
            self.chat = uses_chat_template(self.tok, template)
            fast = getattr(self.tok, "is_fast", False)
            self.backend = self.tok.backend_tokenizer if fast else None
            bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id
        self.bos = [bos] if (bos is not None and not self.chat) else []
        if self.backend is not None:
            # What transformers' call sets for add_special_tokens=False and
            # no padding or truncation asked for.
            self.backend.no_truncation()
            self.backend.no_padding()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added: a fast
        tokenizer's Rust batch encoder directly, which is what
        ``tok(texts)["input_ids"]`` calls, without the Python conversions
        around it (half of that call's time; a batch of the default pool
        tokenises in 0.78x the time, ``python -m raymix.bench data_plane``);
        a slow tokenizer through its own call."""
        if self.backend is None:
            return self.tok(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, batch: dict[str, np.ndarray]):
        from raymix.models import render_completion, render_prompt

        prompts = [render_prompt(self.tok, p, self.chat) for p in batch["prompt"]]
        comps = [render_completion(c, self.chat) for c in batch["completion"]]
        p_ids, c_ids = self._ids(prompts), self._ids(comps)
        bos, eos = self.bos, [self.eos]
        ids, plen, status = [], [], []
        for p, c in zip(p_ids, c_ids):
            p = bos + p
            c = c + eos
            st = "ok"
            if len(c) + 8 > self.max_len:
                # The answer alone does not fit: training on a cut answer
                # would teach the wrong output, so the example is dropped.
                p, c, st = [], [], "dropped"
            elif len(p) + len(c) > self.max_len:
                p = bos + p[len(p) + len(c) - self.max_len + len(bos) :]
                st = "truncated"
            ids.append(p + c)
            plen.append(len(p))
            status.append(st)
        import pyarrow as pa

        # An explicit Arrow table keeps input_ids a plain list<int32> column;
        # a column of ragged numpy arrays would become Ray's tensor extension
        # type, which readers without Ray cannot decode.
        return pa.table(
            {
                "task_idx": pa.array(np.asarray(batch["task_idx"], dtype=np.int32)),
                "shard": pa.array(np.asarray(batch["shard"], dtype=np.int32)),
                "split": pa.array([str(s) for s in batch["split"]]),
                "id": pa.array([str(s) for s in batch["id"]]),
                "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                "prompt_len": pa.array(plen, type=pa.int32()),
                "n_tokens": pa.array([len(x) for x in ids], type=pa.int32()),
                "status": pa.array(status),
                "prompt_text": pa.array(prompts),
                "references": pa.array([list(r) for r in batch["references"]], type=pa.list_(pa.string())),
            }
        )
