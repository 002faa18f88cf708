"""Fuzzing the loaders: mutated checkpoints of every format end in a one-line LoadError naming the
file, or load into a sane model; never another exception, never a hang, never a large allocation.

Valid tiny checkpoints are written here once: a GGUF with a byte-level BPE in its metadata and
F32 / F16 / Q8_0 tensors (gguf.GGUFWriter), a Hugging Face LLaMA directory (model.safetensors,
tokenizer.json, tokenizer_config.json), a sharded Hugging Face OPT directory (pytorch_model-*.bin
and their index json), and a Meta directory (params.json, consolidated.00.pth, a sentencepiece
tokenizer.model). Each example mutates one file of one of them: truncation, flipped bytes, a wrong
magic, a run of 0x00 / 0xFF, inserted bytes, or a mutation that knows the format: an absurd value
in any integer field of the GGUF header (counts, lengths, dims, types, offsets), an absurd
safetensors header length or entry (offsets past the end, shapes of 2^40, other dtypes), a JSON
node swapped for another JSON value (valid JSON, wrong shape), a member of a torch.save zip
damaged (re-zipped with a good CRC), or a state dict with a strange entry (an expand() view,
another dtype, a non-string key, ...).

What each example must do:
- raise LoadError whose message is one line naming a path of the checkpoint, or
- load: every parameter finite, the tokenizer encodes and decodes, and the logits are finite
  unless the mutation made some weight huge (|w| > 1e3: a flipped exponent bit, faithfully read).
- finish within DEADLINE_S (SIGALRM; a Python-level loop is interrupted and reported as a hang).
- raise the process's peak resident memory by at most 10 x the checkpoint's bytes + 64 MB
  (VmHWM after resetting it through /proc/self/clear_refs; the checkpoints are 0.3 to 0.6 MB and
  a warm load of a valid one costs about 1 MB, so the bound is ~70 MB against the gigabytes an
  absurd header asks for; 10x covers F16 / Q8_0 data dequantized to fp32 plus the file's pages).

The number of cases run is printed at the end of the module (default run and `-m slow`).
"""

import collections
import io
import json
import shutil
import signal
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
from helpers import byte_bpe as train_bpe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import load_weights
import model as model_mod
from load_weights import LoadError, load

DEADLINE_S = 10
MEMORY_FACTOR, MEMORY_FIXED = 10, 64 << 20
ABSURD = [0, 1, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**62, 2**63, 2**64 - 1]
COUNTS = collections.Counter()  # outcome -> cases, printed at the end of the module
PEAK = {"grown": 0, "of_bound": 0.0}  # the largest growth of peak memory seen, and as a share of its bound


# ---------------------------------------------------------------------------------------------
# Valid tiny checkpoints


WORDS = "the quick brown fox jumps over a lazy dog while five big wizards vex my old queen".split()
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) + "." for i in range(200)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"


def byte_bpe() -> tokenizers.Tokenizer:
    return train_bpe(CORPUS, SPECIALS)


def tiny(arch: str, vocab: int, seed: int = 0) -> model_mod.Transformer:
    torch.manual_seed(seed)
    m = model_mod.Transformer(model_mod.preset(f"tiny-{arch}", vocab_size=vocab, max_seq_len=64)).eval()
    for p in m.parameters():
        p.data.normal_(0.0, 0.3)
    return m


def interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows of Wq / Wk -> the interleaved (Meta, GGUF) layout that the loader undoes."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(w.shape)


def their_state(m: model_mod.Transformer, column: int) -> dict:
    """Our parameters under their names, through the loader's own tables (HF, META or GGUF column)."""
    cfg, out = m.cfg, {}
    for ours, param in m.named_parameters():
        module, leaf = ours.rsplit(".", 1)
        i = module.split(".")[1] if module.startswith("layers.") else None
        key = module.replace(f"layers.{i}.", "layers.{i}.") if i is not None else module
        name = load_weights.LLAMA_NAMES[key][column] if cfg.arch == "llama" else load_weights.OPT_NAMES[key]
        w = param.detach().clone()
        if column != load_weights.HF and key in load_weights.INTERLEAVED:
            w = interleave(w, cfg.n_heads if key.endswith("wq") else cfg.n_kv_heads)
        out[f"{name.format(i=i)}.{leaf}"] = w
    return out


def write_gguf(path: Path) -> Path:
    spec = json.loads(byte_bpe().to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    c = tiny("llama", len(tokens)).cfg
    w = gguf.GGUFWriter(path, "llama")
    for add, value in [(w.add_block_count, c.n_layers), (w.add_context_length, c.max_seq_len),
                       (w.add_embedding_length, c.dim), (w.add_feed_forward_length, c.hidden_dim),
                       (w.add_head_count, c.n_heads), (w.add_head_count_kv, c.n_kv_heads),
                       (w.add_rope_freq_base, c.rope_theta), (w.add_layer_norm_rms_eps, c.norm_eps),
                       (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "gpt2"), (w.add_token_list, tokens),
                       (w.add_token_types, [3 if t in SPECIALS else 1 for t in tokens]),
                       (w.add_token_merges, [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]),
                       (w.add_bos_token_id, spec["vocab"]["<|im_start|>"]),
                       (w.add_eos_token_id, spec["vocab"]["<|im_end|>"]), (w.add_chat_template, CHATML)]:
        add(value)
    for i, (name, t) in enumerate(their_state(tiny("llama", len(tokens)), load_weights.GGUF).items()):
        a = t.numpy()
        if i % 3 == 1 and a.ndim == 2:  # every dim of the tiny model is a multiple of 32
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a.astype(np.float16) if i % 3 == 2 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_llama(d: Path) -> Path:
    bpe = byte_bpe()
    c = tiny("llama", bpe.get_vocab_size()).cfg
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 0]}))
    save_file(their_state(tiny("llama", c.vocab_size), load_weights.HF), d / "model.safetensors")
    bpe.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return d


def write_hf_opt(d: Path) -> Path:
    c = tiny("opt", 128).cfg
    (d / "config.json").write_text(json.dumps({
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": c.vocab_size, "hidden_size": c.dim,
        "ffn_dim": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "max_position_embeddings": c.max_seq_len, "word_embed_proj_dim": c.dim, "enable_bias": True}))
    state = their_state(tiny("opt", 128, seed=1), load_weights.HF)
    names = sorted(state)
    shards = {f"pytorch_model-0000{s + 1}-of-00002.bin": names[s::2] for s in range(2)}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, d / file)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    return d


def write_meta(d: Path) -> Path:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(d / "tokenizer"), vocab_size=60, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        minloglevel=2)
    (d / "tokenizer.vocab").unlink()
    c = tiny("llama", 60).cfg
    (d / "params.json").write_text(json.dumps({
        "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "norm_eps": c.norm_eps, "vocab_size": -1, "rope_theta": c.rope_theta, "multiple_of": 32}))
    torch.save(their_state(tiny("llama", 60, seed=2), load_weights.META), d / "consolidated.00.pth")
    return d


# target file -> (the checkpoint it belongs to: what load() is given, its format)
TARGETS = {
    "tiny.gguf": ("tiny.gguf", "gguf"),
    "hf/config.json": ("hf", "json"),
    "hf/model.safetensors": ("hf", "safetensors"),
    "hf/tokenizer.json": ("hf", "json"),
    "hf/tokenizer_config.json": ("hf", "json"),
    "opt/config.json": ("opt", "json"),
    "opt/pytorch_model.bin.index.json": ("opt", "json"),
    "opt/pytorch_model-00001-of-00002.bin": ("opt", "torch"),
    "meta/params.json": ("meta", "json"),
    "meta/consolidated.00.pth": ("meta", "torch"),
    "meta/tokenizer.model": ("meta", "sentencepiece"),
}


def gguf_int_fields(path: Path) -> dict:
    """Every integer of the GGUF header (counts, lengths, dims, types, offsets): field name -> [(offset, size)]."""
    reader = gguf.GGUFReader(path)
    base, out = reader.data.ctypes.data, collections.defaultdict(list)
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype.kind in "ui" and part.itemsize in (4, 8):  # (uint8 parts are the bytes of texts)
                at = part.ctypes.data - base
                out[field.name] += [(at + i * part.itemsize, part.itemsize) for i in range(part.size)]
    return dict(out)


class Checkpoints(dict):
    """root: the directory; gguf_fields: gguf_int_fields of tiny.gguf; bytes: target -> its valid bytes."""

    def __repr__(self):  # hypothesis prints the arguments of a failing example
        return f"Checkpoints({self['root']})"


@pytest.fixture(scope="module")
def valid(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("valid")
    write_gguf(root / "tiny.gguf")
    for name, write in [("hf", write_hf_llama), ("opt", write_hf_opt), ("meta", write_meta)]:
        (root / name).mkdir()
        write(root / name)
    for name in ("tiny.gguf", "hf", "opt", "meta"):  # the valid ones load (and warm the lazy imports up)
        m, tok = load(root / name)
        with torch.no_grad():
            assert m(torch.tensor([[1, 2, 3]])).isfinite().all()
    yield Checkpoints(root=root, gguf_fields=gguf_int_fields(root / "tiny.gguf"),
                      bytes={rel: (root / rel).read_bytes() for rel in TARGETS})
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    line = (f"test_fuzz: {sum(COUNTS.values())} mutated checkpoints loaded ({COUNTS['LoadError']} LoadError, "
            f"{COUNTS['loaded']} loaded sanely); peak memory grew {PEAK['grown'] / 2**20:.1f} MB at most, "
            f"{100 * PEAK['of_bound']:.0f}% of its bound")
    if reporter and capture:
        with capture.global_and_fixture_disabled():  # shown even without -s
            reporter.write_line(line)


# ---------------------------------------------------------------------------------------------
# Mutations: (bytes, draw) -> bytes


def truncate(data, draw):
    return data[:draw(st.integers(0, len(data) - 1))]


def flip(data, draw):
    b = bytearray(data)
    for at, mask in draw(st.lists(st.tuples(st.integers(0, len(b) - 1), st.integers(1, 255)), min_size=1, max_size=8)):
        b[at] ^= mask
    return bytes(b)


def wrong_magic(data, draw):
    return draw(st.binary(min_size=4, max_size=4)) + data[4:]


def splat(data, draw):
    at, n = draw(st.integers(0, len(data) - 1)), draw(st.integers(1, 256))
    return data[:at] + draw(st.sampled_from([b"\0", b"\xff"])) * n + data[at + n:]


def insert(data, draw):
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(min_size=1, max_size=32)) + data[at:]


GENERIC = [truncate, flip, wrong_magic, splat, insert]


def absurd_number(size_bytes):
    return st.one_of(st.sampled_from(ABSURD), st.integers(0, 2 ** (8 * size_bytes) - 1)).map(lambda v: v % 2 ** (8 * size_bytes))


def gguf_field(data, draw, fields):
    """An absurd value in one integer of the GGUF header."""
    at, size = draw(st.sampled_from(fields[draw(st.sampled_from(sorted(fields)))]))
    return data[:at] + draw(absurd_number(size)).to_bytes(size, "little") + data[at + size:]


def safetensors_length(data, draw):
    return struct.pack("<Q", draw(st.one_of(absurd_number(8), st.integers(0, 2 * len(data))))) + data[8:]


def safetensors_entry(data, draw):
    """One entry of the JSON header changed, the header length kept right."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    entry = header[draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))]
    a, b = entry["data_offsets"]
    entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(st.one_of(
        st.sampled_from(["F64", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "XX", 5, None]),
        st.lists(st.one_of(st.sampled_from(ABSURD), st.integers(-2, 100)), max_size=3),
        st.sampled_from([[a, 2**60], [2**60, 2**60 + 4], [b, a], [0, 0], [a, len(data)], [a, b + 4], [-1, b]])))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(ABSURD + [-1, -(2**63)]) | st.integers(-5, 300)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def json_node(data, draw):
    """Valid JSON of the wrong shape: one node (maybe the whole document) replaced or deleted."""
    doc = json.loads(data)
    parent, key, node = None, None, doc
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        parent, key = node, draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        node = node[key]
    if parent is None:
        doc = draw(json_values)
    elif isinstance(parent, dict) and draw(st.booleans()):
        del parent[key]
    else:
        parent[key] = draw(json_values)
    return json.dumps(doc).encode()


def zip_member(data, draw):
    """One member of a torch.save zip damaged, the zip rebuilt (its CRCs right)."""
    zin = zipfile.ZipFile(io.BytesIO(data))
    target = draw(st.sampled_from(zin.namelist()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in zin.namelist():
            content = zin.read(name)
            if name == target and content:
                content = draw(st.sampled_from([truncate, flip, splat, insert]))(content, draw)
            z.writestr(name, content)
    return out.getvalue()


def strange_entry(shape, draw):
    return draw(st.sampled_from([
        lambda: torch.zeros(1).expand(*shape),  # a view larger than its storage
        lambda: torch.ones(shape, dtype=torch.int64), lambda: torch.ones(shape, dtype=torch.bool),
        lambda: torch.full(shape, 1e300, dtype=torch.float64),  # inf in float32
        lambda: torch.full(shape, float("nan")), lambda: torch.ones(shape, dtype=torch.float16),
        lambda: torch.ones(shape, dtype=torch.complex64), lambda: torch.zeros(()), lambda: torch.zeros(0),
        lambda: torch.zeros(shape).to_sparse(), lambda: torch.zeros(shape)[..., :1], lambda: "a string",
        lambda: {"nested": torch.zeros(shape)}, lambda: [torch.zeros(shape)], lambda: None]))()


def state_entry(data, draw):
    """A torch.save state dict with one strange entry, or not a dict at all."""
    state = torch.load(io.BytesIO(data), weights_only=True)
    key = draw(st.sampled_from(sorted(state)))
    how = draw(st.sampled_from(["replace", "delete", "int key", "not a dict"]))
    if how == "replace":
        state[key] = strange_entry(tuple(state[key].shape), draw)
    elif how == "delete":
        del state[key]
    elif how == "int key":
        state[7] = state.pop(key)
    else:
        state = draw(st.sampled_from([list(state.values()), torch.zeros(3), 5, None]))
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


def mutations(fmt: str, valid) -> list:
    special = {"gguf": [lambda data, draw: gguf_field(data, draw, valid["gguf_fields"])] * 3,
               "safetensors": [safetensors_length, safetensors_entry, safetensors_entry],
               "json": [json_node] * 4, "torch": [zip_member, state_entry, state_entry], "sentencepiece": []}[fmt]
    return GENERIC + special


# ---------------------------------------------------------------------------------------------
# Running one case


class Hang(BaseException):  # not an Exception: the loader's `except Exception` must not swallow it
    pass


def _alarm(signum, frame):
    raise Hang()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def checkpoint_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())


def load_case(path: Path, mutated: Path) -> str:
    """load(path) with one of its files mutated: check the outcome; -> 'LoadError' or 'loaded'."""
    measured = _reset_peak()
    before = _status("VmRSS") if measured else 0
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        try:
            m, tok = load(path)
        except LoadError as e:
            message = str(e)
            assert "\n" not in message and str(path) in message, f"not one line naming the checkpoint: {message}"
            outcome = "LoadError"
        else:
            outcome = "loaded"
            sane_model(m, tok)
    except Hang:
        pytest.fail(f"loading {mutated} ran past {DEADLINE_S} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if measured:
        grown, bound = _status("VmHWM") - before, MEMORY_FACTOR * checkpoint_bytes(path) + MEMORY_FIXED
        PEAK["grown"], PEAK["of_bound"] = max(PEAK["grown"], grown), max(PEAK["of_bound"], grown / bound)
        assert grown <= bound, f"peak memory grew {grown >> 20} MB, above {bound >> 20} MB"
    COUNTS[outcome] += 1
    return outcome


def sane_model(m, tok) -> None:
    assert all(p.isfinite().all() for p in m.parameters()), "the loader let NaN or inf weights through"
    ids = [1, 2, 3]
    if tok is not None:
        ids = tok.encode("the quick fox <|im_end|> jumps")
        assert all(isinstance(i, int) for i in ids) and isinstance(tok.decode(ids), str)
        assert all(i is None or isinstance(i, int) for i in (tok.bos_id, tok.eos_id))
    with torch.no_grad():
        logits = m(torch.tensor([[i % m.cfg.vocab_size for i in ids]]))
    huge = max(p.abs().max().item() for p in m.parameters()) > 1e3
    assert logits.isfinite().all() or huge, "finite, ordinary weights gave non-finite logits"


def run_mutation(valid, target: str, data) -> str:
    root_name, fmt = TARGETS[target]
    mutate = data.draw(st.sampled_from(mutations(fmt, valid)), label="mutation")
    mutated_bytes = mutate(valid["bytes"][target], data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        src = valid["root"] / root_name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / root_name)
        mutated = Path(tmp) / target
        mutated.write_bytes(mutated_bytes)
        return load_case(Path(tmp) / root_name, mutated)


FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=1000, **FUZZ)
@given(target=st.sampled_from(sorted(TARGETS)), data=st.data())
def test_mutated_checkpoints_fail_in_one_line_or_load_sanely(valid, target, data):
    run_mutation(valid, target, data)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=2000, **FUZZ)
@given(data=st.data())
def test_mutated_checkpoints_many(valid, target, data):
    run_mutation(valid, target, data)


# ---------------------------------------------------------------------------------------------
# The named cases: each was a hang, a huge allocation or a stray exception before the fix


def patch(data: bytes, at: int, value: int, size: int = 8) -> bytes:
    return data[:at] + value.to_bytes(size, "little") + data[at + size:]


def write_case(tmp: Path, valid, target: str, content: bytes) -> tuple[Path, Path]:
    """A copy of target's checkpoint in tmp with target's bytes replaced: -> (checkpoint, target)."""
    root_name = TARGETS[target][0]
    src = valid["root"] / root_name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / root_name)
    (tmp / target).write_bytes(content)
    return tmp / root_name, tmp / target


FILE = -1  # stands for the file's length
GGUF_CASES = {  # name -> (field, which integer of it, value). Metadata: key length, value type, then the value
    # (arrays: item type, length, items); tensors: name length, n_dims, dims, type, offset.
    "tensor count 2^62": ("GGUF.tensor_count", 0, 2**62),
    "metadata count 2^62": ("GGUF.kv_count", 0, 2**62),
    "token_type array of 2^62 items (the reader looped for ever)": ("tokenizer.ggml.token_type", 3, 2**62),
    "token_type array as long as the file (the reader took 800 x the file, 14 s)": ("tokenizer.ggml.token_type", 3, FILE),
    "a token of 2^60 bytes": ("tokenizer.ggml.tokens", 4, 2**60),
    "a metadata key of 2^40 bytes": ("llama.context_length", 0, 2**40),
    "block_count 2^31 (263 k empty layers were built for minutes)": ("llama.block_count", -1, 2**31),
    "embedding_length 2^31 (tried to allocate 2.5 TB)": ("llama.embedding_length", -1, 2**31),
    "feed_forward_length 2^32 - 1 (tried to allocate 1 TB)": ("llama.feed_forward_length", -1, 2**32 - 1),
    "head_count 0 (ZeroDivisionError)": ("llama.attention.head_count", -1, 0),
    "head_count_kv 0 (ZeroDivisionError)": ("llama.attention.head_count_kv", -1, 0),
    "block_count 0 (KeyError)": ("llama.block_count", -1, 0),
    "a value type of 99": ("llama.context_length", 1, 99),
    "a tensor offset past the end": ("blk.0.attn_q.weight", -1, 2**40),
    "two tensors on the same bytes": ("blk.0.attn_k.weight", -1, 0),
    "a tensor dim of 2^62": ("token_embd.weight", 2, 2**62),
    "a tensor with 2^31 dims": ("token_embd.weight", 1, 2**31),
    "a tensor of unknown type": ("output_norm.weight", -2, 99),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_absurd_header(tmp_path, valid, case):
    name, part, value = GGUF_CASES[case]
    at, size = valid["gguf_fields"][name][part]
    data = valid["bytes"]["tiny.gguf"]
    path, _ = write_case(tmp_path, valid, "tiny.gguf", patch(data, at, len(data) if value == FILE else value, size))
    assert load_case(path, path) == "LoadError"


def test_gguf_bad_utf8_token(tmp_path, valid):
    data = valid["bytes"]["tiny.gguf"]
    at = data.index(b"<|im_end|>")
    path, _ = write_case(tmp_path, valid, "tiny.gguf", data[:at] + b"\xc5" + data[at + 1:])  # was a UnicodeDecodeError
    with pytest.raises(LoadError, match="tokenizer.ggml.tokens"):
        load(path)


def safetensors_with_header(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def _offsets_past_end(header):
    header["model.norm.weight"]["data_offsets"][1] = 2**40


@pytest.mark.parametrize("content", [
    lambda data: struct.pack("<Q", 2**60) + data[8:],
    lambda data: safetensors_with_header(data, _offsets_past_end),
    lambda data: safetensors_with_header(data, lambda h: h["model.norm.weight"].update(shape=[2**40, 2**40])),
], ids=["header length 2^60", "offsets past the end", "shape 2^40 x 2^40"])
def test_safetensors_absurd_header(tmp_path, valid, content):
    path, mutated = write_case(tmp_path, valid, "hf/model.safetensors", content(valid["bytes"]["hf/model.safetensors"]))
    with pytest.raises(LoadError) as err:
        load(path)
    assert "\n" not in str(err.value) and str(mutated) in str(err.value)


@pytest.mark.parametrize("target,doc,words", [
    ("hf/tokenizer.json", {"model": {"type": "BPE", "vocab": [1, 2]}}, "tokenizer.json"),
    ("hf/tokenizer.json", [], "tokenizer.json"),
    ("hf/config.json", [1, 2], "not an object"),
    ("hf/tokenizer_config.json", {"chat_template": 5}, "chat_template"),
    ("hf/tokenizer_config.json", {"chat_template": [5]}, None),  # a list with no default: no template
    ("meta/params.json", "dim", "not an object"),
    ("opt/pytorch_model.bin.index.json", {"weight_map": {"a": "../../etc/passwd"}}, "weight_map"),
    ("opt/pytorch_model.bin.index.json", {"weight_map": {"a": {"b": 1}}}, "weight_map"),
    ("opt/pytorch_model.bin.index.json", {"weight_map": {"": False}}, "weight_map"),  # found by the slow run
], ids=["tokenizer-vocab-list", "tokenizer-list", "config-list", "template-number", "template-list",
        "params-string", "index-escapes", "index-dict", "index-false"])
def test_valid_json_of_the_wrong_shape(tmp_path, valid, target, doc, words):
    path, mutated = write_case(tmp_path, valid, target, json.dumps(doc).encode())
    if words is None:
        assert load_case(path, mutated) == "loaded"
        return
    with pytest.raises(LoadError, match=words) as err:
        load(path)
    assert "\n" not in str(err.value) and str(mutated) in str(err.value)


@pytest.mark.parametrize("key,value,words", [
    ("num_key_value_heads", -1, "n_kv_heads is -1"),
    ("hidden_size", "64", "dim is '64'"),
    ("hidden_size", 2**26, "shape"),  # the embedding alone was an 80 GB allocation attempt
    ("hidden_size", 2**31, "sizes cannot make a model"),  # 2^31 x 2^31 overflows even on the meta device
    ("vocab_size", 2**63, "sizes cannot make a model"),  # beyond int64: a TypeError from torch (found by the slow run)
    ("num_hidden_layers", 10**6, "1000000 layers"),  # a million layers were built
    ("rms_norm_eps", float("nan"), "norm_eps"),
    ("tie_word_embeddings", "yes", "tie_embeddings"),
    ("rope_parameters", [1], "rope_parameters"),
    ("eos_token_id", [], None),  # no EOS
    ("eos_token_id", "2", "eos_token_id"),
    ("bos_token_id", 2**32, "past the tokenizer's"),  # tokenizers' id_to_token overflowed (found by the default run)
    ("bos_token_id", 10**6, "past the tokenizer's"),  # in range for tokenizers: a token id that does not exist
    ("architectures", 5, "architectures"),
])
def test_config_values(tmp_path, valid, key, value, words):
    doc = json.loads(valid["bytes"]["hf/config.json"])
    doc[key] = value
    path, mutated = write_case(tmp_path, valid, "hf/config.json", json.dumps(doc).encode())
    if words is None:
        assert load_case(path, mutated) == "loaded"
        return
    with pytest.raises(LoadError, match=words) as err:
        load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_expanded_view_in_a_bin_is_refused(tmp_path, valid):
    """A config asking for a 2^30-token vocabulary, and a shard whose embedding is one expand()ed
    element: the shapes agree, so before the check the loader allocated the model (256 GB)."""
    doc = json.loads(valid["bytes"]["opt/config.json"])
    doc["vocab_size"] = 2**30
    path, _ = write_case(tmp_path, valid, "opt/config.json", json.dumps(doc).encode())
    key = "model.decoder.embed_tokens.weight"
    shard = next(f for f in sorted(path.glob("*.bin")) if key in torch.load(f, weights_only=True))
    state = torch.load(shard, weights_only=True)
    state[key] = torch.zeros(1).expand(2**30, 64)
    torch.save(state, shard)
    assert shard.stat().st_size < 1 << 20  # a file under 1 MB
    with pytest.raises(LoadError, match="view larger than its storage") as err:
        load(path)
    assert str(shard) in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_weights_that_are_not_floating_point_are_refused(tmp_path, valid, dtype):
    state = torch.load(io.BytesIO(valid["bytes"]["meta/consolidated.00.pth"]), weights_only=True)
    state["norm.weight"] = state["norm.weight"].to(dtype)  # was copied in silently (complex: imaginary part dropped)
    out = io.BytesIO()
    torch.save(state, out)
    path, _ = write_case(tmp_path, valid, "meta/consolidated.00.pth", out.getvalue())
    with pytest.raises(LoadError, match="norm.weight holds torch.(int64|bool|complex64), not floating point"):
        load(path)


def test_nan_weights_are_refused(tmp_path, valid):
    state = torch.load(io.BytesIO(valid["bytes"]["meta/consolidated.00.pth"]), weights_only=True)
    state["layers.1.attention.wv.weight"][3, 5] = float("nan")
    out = io.BytesIO()
    torch.save(state, out)
    path, mutated = write_case(tmp_path, valid, "meta/consolidated.00.pth", out.getvalue())
    with pytest.raises(LoadError, match="layers.1.attention.wv.weight holds NaN") as err:
        load(path)
    assert str(mutated) in str(err.value)


def test_float16_overflow_is_refused(tmp_path, valid):
    state = torch.load(io.BytesIO(valid["bytes"]["meta/consolidated.00.pth"]), weights_only=True)
    state["norm.weight"][0] = 1e6  # finite in fp32 and bf16, inf in fp16
    out = io.BytesIO()
    torch.save(state, out)
    path, _ = write_case(tmp_path, valid, "meta/consolidated.00.pth", out.getvalue())
    assert load(path, dtype=torch.bfloat16)[0].norm.weight.isfinite().all()
    with pytest.raises(LoadError, match="norm.weight has values beyond the range of torch.float16"):
        load(path, dtype=torch.float16)


def test_layer_count_above_the_tensors(tmp_path, valid):
    doc = json.loads(valid["bytes"]["meta/params.json"])
    doc["n_layers"] = 2**40
    path, _ = write_case(tmp_path, valid, "meta/params.json", json.dumps(doc).encode())
    with pytest.raises(LoadError, match="1099511627776 layers"):
        load(path)


def test_sizes_whose_product_overflows(tmp_path, valid):
    doc = json.loads(valid["bytes"]["hf/config.json"])
    doc["hidden_size"] = doc["intermediate_size"] = 2**40
    path, _ = write_case(tmp_path, valid, "hf/config.json", json.dumps(doc).encode())
    with pytest.raises(LoadError, match="config"):
        load(path)


def test_the_checks_catch_an_allocation_and_a_hang(valid, monkeypatch):
    """The harness itself: 1 GB taken inside load() breaks the memory bound; a loop breaks the deadline."""
    if not _reset_peak():
        pytest.skip("no /proc/self/clear_refs: peak memory cannot be measured here")
    path = valid["root"] / "tiny.gguf"

    def greedy(p):  # more than the process can hold resident from earlier tests' freed memory (the full run)
        block = torch.ones(256 << 20)  # 1 GB, touched
        raise LoadError(f"{p}: took {block.nbytes >> 20} MB")

    monkeypatch.setattr(sys.modules[__name__], "PEAK", {"grown": 0, "of_bound": 0.0})  # keep the summary clean
    monkeypatch.setattr(sys.modules[__name__], "load", greedy)
    with pytest.raises(AssertionError, match="peak memory grew"):
        load_case(path, path)
    monkeypatch.setattr(sys.modules[__name__], "DEADLINE_S", 1)
    monkeypatch.setattr(sys.modules[__name__], "load", lambda p: [0 for _ in iter(int, 1)])  # never ends
    with pytest.raises(pytest.fail.Exception, match="ran past 1 s"):
        load_case(path, path)
