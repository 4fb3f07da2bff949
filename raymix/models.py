"""Models and tokenizers: built-in Llama presets with a tokenizer trained
locally on the pool's text (cached), or any Hugging Face causal LM by hub id or
local directory; and the prompt templates.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from raymix.config import ModelConfig
from raymix.errors import RaymixError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int


# Sizes with the default 2048-token vocabulary and tied embeddings:
# micro ~0.26M, tiny ~1.3M, small ~6.8M, base ~27M parameters.
PRESETS: dict[str, Preset] = {
    "llama-micro": Preset(hidden=64, layers=2, heads=4, intermediate=256),
    "llama-tiny": Preset(hidden=128, layers=4, heads=4, intermediate=512),
    "llama-small": Preset(hidden=256, layers=6, heads=8, intermediate=1024),
    "llama-base": Preset(hidden=512, layers=8, heads=8, intermediate=1536),
}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").split("/", 1)[-1]


def _check_local(name: str, what: str, field: str) -> None:
    """A name that looks like a path must exist; a hub id is left to the hub."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise RaymixError(f"{field}: {what} path {name} does not exist")


def local_or_hub(name: str) -> str:
    """``name`` as the training workers must read it: a local directory made
    absolute (Ray Train workers run in directories of their own, where a
    relative path names nothing and transformers then takes it for a hub
    id), a hub id as it is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def train_tokenizer(
    texts: Callable[[], Iterable[str]], vocab_size: int, cache_root: Path, fingerprint: str
):
    """A byte-level BPE tokenizer trained on ``texts()``, cached by fingerprint
    (``texts`` is only called on a cache miss)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(f"{fingerprint}:{vocab_size}".encode()).hexdigest()[:16]
    out = cache_root / "tokenizers" / key
    if (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists():
        return load_tokenizer(str(out)), str(out)
    if out.exists():  # incomplete (files deleted since): trained again below
        aside = out.parent / f".{out.name}.bad.{os.getpid()}"
        try:
            out.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    # Write to a temporary directory and rename, so a crash never leaves a
    # half-written tokenizer in the cache.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    fast.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(str(out)), str(out)


# A tokenizer directory holds its vocabulary in one of these forms (fast,
# SentencePiece, byte-level BPE, WordPiece), the first the most common.
_VOCAB_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def _check_tokenizer_dir(name: str, field: str) -> None:
    """A local tokenizer directory must hold a vocabulary, and its special
    tokens (tokenizer_config.json, or a config.json naming the model type
    whose defaults apply): refused naming the missing file and the field,
    rather than failing inside transformers or losing the pad/eos tokens."""
    d = Path(name).expanduser()
    if not d.is_dir():
        return
    have = {p.name for p in d.iterdir()}
    if not any(all(f in have for f in group) for group in _VOCAB_FILES):
        partial = next((group for group in _VOCAB_FILES if any(f in have for f in group)), None)
        missing = ([f for f in partial if f not in have] if partial else ["tokenizer.json"])
        raise RaymixError(
            f"{field}: tokenizer directory {name} is missing {' and '.join(missing)} (a tokenizer needs one of "
            f"{', '.join(' + '.join(g) for g in _VOCAB_FILES)}); copy the complete tokenizer there"
        )
    if "tokenizer_config.json" not in have and "config.json" not in have:
        raise RaymixError(
            f"{field}: tokenizer directory {name} is missing tokenizer_config.json (its special tokens "
            "and chat template); copy the complete tokenizer there"
        )


def load_tokenizer(name: str, field: str = "model.tokenizer"):
    from transformers import AutoTokenizer

    _check_local(name, "tokenizer", field)
    _check_tokenizer_dir(name, field)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise RaymixError(
            f"{field}: cannot load tokenizer {name!r} ({e.__class__.__name__}: {str(e)[:200]}); "
            "give a local directory, or a hub id on a machine that reaches the hub"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise RaymixError(
                f"{field}: tokenizer {name!r} has neither a pad nor an eos token; "
                "add a pad token to it"
            )
        # Standard practice for causal LMs: pad positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: ModelConfig, tokenizer, seed: int, device: str = "cpu"):
    """The model in ``cfg``: a preset initialised from ``seed`` or ``pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
    if dtype is None:  # auto
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if cfg.pretrained:
        _check_local(cfg.pretrained, "model", "model.pretrained")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.pretrained, dtype=dtype, attn_implementation="sdpa"
            )
        except (OSError, ValueError) as e:
            raise RaymixError(
                f"model.pretrained: cannot load {cfg.pretrained!r} "
                f"({e.__class__.__name__}: {str(e)[:200]})"
            ) from None
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    if cfg.preset not in PRESETS:
        from raymix.config import _suggest

        raise RaymixError(
            f"model.preset: unknown preset {cfg.preset!r}; choose one of "
            f"{', '.join(PRESETS)}{_suggest(cfg.preset, PRESETS)}"
        )
    p = PRESETS[cfg.preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        intermediate_size=p.intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    return model


# ----------------------------------------------------------------------------
# Templates


def uses_chat_template(tokenizer, template: str) -> bool:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise RaymixError("data.template: 'chat' asked for, but the tokenizer has no chat template")
    return template == "chat" or (template == "auto" and has_chat)


def render_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """The text the model sees before its answer."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"{prompt}\nAnswer:"


def render_completion(completion: str, chat: bool) -> str:
    return completion if chat else f" {completion}"
