"""The families people have (issue 15): Llama 3.x (llama3, linear and yarn rope scaling), Qwen2 /
Qwen2.5 (q, k, v biases), Qwen3 (per-head q / k RMSNorm, explicit head_dim) and Mistral (sliding
window), as tiny random checkpoints written here with transformers (every parameter random, norms
and biases too; fp32), as safetensors directories and as GGUF files (gguf.GGUFWriter).

What is held: logits equal to transformers' at 32 and 1500 tokens (past the scaled models'
original_max_position_embeddings), GGUF files loaded by us and by transformers' gguf_file=, the
GGUF tokenizers (llama-bpe, qwen2, sentencepiece-style) against transformers / sentencepiece, our
chat templates against transformers' apply_chat_template, the real cache against the masked
simulation on each family, `generate.py --chat` on each, and the one-line refusals of strict
loading. The measured max differences are printed at the end of the module."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
from helpers import byte_bpe as train_bpe
from helpers import randomize, report_after, run_through
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

import generate
import policies
import simulate
from cache import KVCache
from load_weights import LoadError, load

ATOL = 1e-4  # fp32 logits, ours vs transformers
VOCAB = 320  # the model's rows; the tiny tokenizers use fewer
TEMPLATES = Path(__file__).parent / "chat_templates"
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048)
ORIGINAL = 256  # original_max_position_embeddings of the scaled models: 1500 tokens are well past it
FAMILIES = {  # name -> (transformers config, chat template file, special tokens: bos, eos, others)
    "llama3": (lambda: LlamaConfig(**SIZES, rope_theta=5e5, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL}),
        "llama-3.2-instruct.jinja", ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "llama-linear": (lambda: LlamaConfig(**SIZES, rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                     None, None),
    "llama-yarn": (lambda: LlamaConfig(**SIZES, rope_theta=1e4, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}), None, None),
    "qwen2": (lambda: Qwen2Config(**SIZES, rope_theta=1e6, tie_word_embeddings=False),
              "qwen2.5-instruct.jinja", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    "qwen3": (lambda: Qwen3Config(**SIZES, head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
              "qwen3.jinja", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    "mistral": (lambda: MistralConfig(**SIZES, sliding_window=24, rope_theta=1e6, tie_word_embeddings=False),
                "mistral-nemo-instruct-2407.jinja", ["<s>", "</s>", "[INST]", "[/INST]"]),
}
MEASURED = {}  # (family, format, tokens) -> max |diff|, printed at the end


WORDS = ("the quick brown fox jumps over a lazy dog while 42 big wizards vex my old queen and 1999 zebras "
         "quietly hum jazz by the river, don't they? I'll say 7 times: 123456789").split()
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(9)) + "." for i in range(300)]


def byte_bpe(specials) -> tokenizers.Tokenizer:
    return train_bpe(CORPUS, specials)


def write_dir(name: str, d: Path):
    """A Hugging Face directory of the family: save_pretrained, and (where the family has a chat
    template) tokenizer.json with tokenizer_config.json naming the template and the special tokens."""
    make, template, specials = FAMILIES[name]
    hf = randomize(AutoModelForCausalLM.from_config(make()), seed=len(name))
    hf.save_pretrained(d)
    if template:
        byte_bpe(specials).save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": (TEMPLATES / template).read_text(), "bos_token": specials[0], "eos_token": specials[1],
            "tokenizer_class": "PreTrainedTokenizerFast"}))
    return hf


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """name -> (directory, the transformers model written there)."""
    out = {}
    for name in FAMILIES:
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, write_dir(name, d))
    return out


def tokens_of(T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(T))


def max_diff(ours, theirs, T) -> float:
    tokens = tokens_of(T)
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    rows = [f"  {fam:13s} {fmt:28s} {d32:9.1e} {d1500:9.1e}" for (fam, fmt), (d32, d1500) in sorted(MEASURED.items())]
    report_after(request, ["test_families: max |logit diff| vs transformers, fp32 (32 tokens, 1500 tokens):", *rows])


# ---------------------------------------------------------------------------------------------
# Parity with transformers: safetensors directories


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_transformers(dirs, name):
    d, hf = dirs[name]
    model, _ = load(d)
    cfg = model.cfg
    assert (cfg.qkv_bias, cfg.qk_norm) == (name == "qwen2", name == "qwen3")
    assert cfg.window == (24 if name == "mistral" else 0) and cfg.head_dim == (32 if name == "qwen3" else 16)
    assert cfg.rope_scaling.kind == {"llama3": "llama3", "llama-linear": "linear", "llama-yarn": "yarn"}.get(name, "default")
    diffs = [max_diff(model, hf, T) for T in (32, 1500)]
    MEASURED[name, "safetensors"] = diffs
    assert max(diffs) < ATOL, diffs


@pytest.mark.parametrize("name", ["llama3", "llama-yarn", "qwen3", "mistral"])
def test_the_family_feature_matters(dirs, name, tmp_path):
    """Control: the same weights without the family's feature (rope scaling, q/k norm, window) give
    other logits at 1500 tokens, so the parity above could not pass without it."""
    d, hf = dirs[name]
    c = json.loads((d / "config.json").read_text())
    if name == "qwen3":  # a Qwen3 without its norms: drop them from the weights too
        state = load_file(d / "model.safetensors")
        state = {k: v for k, v in state.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
        c.update(model_type="llama", architectures=["LlamaForCausalLM"])
        save_file(state, tmp_path / "model.safetensors")
    else:
        (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
        if name == "mistral":
            c["sliding_window"] = None
        else:
            c["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_parameters"]["rope_theta"]}
    (tmp_path / "config.json").write_text(json.dumps(c))
    model, _ = load(tmp_path)
    assert max_diff(model, hf, 1500) > 1e-2


# ---------------------------------------------------------------------------------------------
# GGUF files: written with gguf.GGUFWriter as llama.cpp's converter names them


def llama3_divisors(c) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py for Llama 3: rope_freqs.weight, one divisor per frequency."""
    r, D = c.rope_parameters, c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (r["rope_theta"] ** (np.arange(0, D, 2, dtype=np.float32) / D))
    low_wavelen, high_wavelen = ORIGINAL / r["low_freq_factor"], ORIGINAL / r["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(r["factor"])
        else:
            smooth = (ORIGINAL / wavelen - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
            out.append(1 / ((1 - smooth) / r["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permute for llama's Wq / Wk (rows, and biases): HF rotate-half -> interleaved."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(hf, arch: str, path: Path, pre: str | None = None, sp=None) -> Path:
    """hf's weights under llama.cpp's names (llama: Wq, Wk rows interleaved; Llama 3: rope_freqs),
    and, with `pre`, a byte-level BPE in the metadata; with `sp` (a SentencePieceProcessor), its
    vocabulary as llama.cpp's converter writes a Llama 2 one: pieces, scores, types, no merges."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if pre:
        specials = ["<|begin_of_text|>", "<|end_of_text|>"] if arch == "llama" else ["<|endoftext|>", "<|im_end|>"]
        spec = json.loads(byte_bpe(specials).to_str())["model"]
        tokens = sorted(spec["vocab"], key=spec["vocab"].get)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in specials else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    if sp is not None:
        n = sp.vocab_size()
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                           for i in range(n)])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            ours = f"blk.{i}.{GGUF_NAMES[module]}.{leaf}"
        else:
            ours = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        if arch == "llama" and ours.split(".")[-2] in ("attn_q", "attn_k"):
            t = to_interleaved(t, c.num_attention_heads if "attn_q" in ours else c.num_key_value_heads)
        w.add_tensor(ours, t.contiguous().numpy())
    if arch == "llama" and c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_divisors(c))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_CASES = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_matches_transformers(dirs, name, tmp_path):
    """Ours from the GGUF against the source model, and against transformers' own GGUF reader (which
    ignores rope_freqs.weight: on the Llama 3 file it is transformers that differs from the source)."""
    _, hf = dirs[name]
    if name == "qwen3":  # transformers' GGUF reader ignores qwen3.attention.key_length: head_dim is its default 128
        hf = randomize(AutoModelForCausalLM.from_config(Qwen3Config(**SIZES, head_dim=128, tie_word_embeddings=True)))
    path = write_gguf(hf, GGUF_CASES[name], tmp_path / f"{name}.gguf")
    model, _ = load(path)
    assert (model.cfg.rope_scaling.kind == "factors") == (name == "llama3")
    diffs = [max_diff(model, hf, T) for T in (32, 1500)]
    MEASURED[name, "gguf (ours)"] = diffs
    assert max(diffs) < ATOL, diffs
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        diffs = [(model(tokens_of(T)) - theirs(tokens_of(T)).logits).abs().max().item() for T in (32, 1500)]
    MEASURED[name, "gguf (vs transformers' gguf)"] = diffs
    if name == "llama3":  # transformers' reader drops rope_freqs.weight: it is the one that differs from the source
        with torch.no_grad():
            dropped = (theirs(tokens_of(1500)).logits - hf(tokens_of(1500)).logits).abs().max().item()
        assert dropped > 1e-3, dropped
    else:
        assert max(diffs) < ATOL, diffs


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_gguf_byte_level_tokenizers_match_transformers(dirs, name, tmp_path):
    """llama-bpe (digits in threes) and qwen2 (digits one by one) pre-tokenizers against
    transformers' tokenizer from the same GGUF."""
    pre = {"llama3": "llama-bpe", "qwen2": "qwen2"}[name]
    path = write_gguf(dirs[name][1], GGUF_CASES[name], tmp_path / "t.gguf", pre=pre)
    _, tok = load(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    specials = "<|begin_of_text|> 12 <|end_of_text|>" if name == "llama3" else "<|endoftext|> 12 <|im_end|>"
    texts = [*CORPUS[:20], "In 1999, 42 zebras paid $1234567.89!\n\n  Don't they?", specials]
    for text in texts:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("1234567")]
    assert pieces == (["123", "456", "7"] if pre == "llama-bpe" else list("1234567"))


def test_gguf_sentencepiece_vocabulary_matches_sentencepiece(tmp_path):
    """A Llama-2 / TinyLlama-style GGUF vocabulary (tokenizer.ggml.model "llama": pieces, scores,
    types, no merges): our tokenizers BPE encodes and decodes as the sentencepiece model it came from."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_by_whitespace=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    hf = randomize(AutoModelForCausalLM.from_config(LlamaConfig(**{**SIZES, "vocab_size": sp.vocab_size()})))
    model, tok = load(write_gguf(hf, "llama", tmp_path / "spm.gguf", sp=sp))
    assert (tok.bos_id, tok.eos_id) == (1, 2) and max_diff(model, hf, 32) < ATOL
    for text in [*CORPUS[:40], "Jazz, 42 wizards! Über naïve ☃ quietly", "  two  spaces"]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.encode("<s>") == [1]  # control pieces written in the text are their ids (a chat template's bos_token)


# ---------------------------------------------------------------------------------------------
# Chat templates: ours (jinja2) equal transformers' apply_chat_template


@pytest.mark.parametrize("name", [n for n, (_, t, _) in FAMILIES.items() if t])
def test_chat_template_matches_transformers(dirs, name):
    d, _ = dirs[name]
    _, tok = load(d)
    theirs = AutoTokenizer.from_pretrained(d)
    assert tok.has_chat_template and tok.eos_id == theirs.convert_tokens_to_ids(FAMILIES[name][2][1])
    for system in (None, "You answer in one word."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi there"}]
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.chat("Hi there", system=system) == want


def test_default_model_chat_template_matches_transformers():
    """SmolLM2's template, from the default GGUF's metadata."""
    _, tok = load()
    theirs = PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=tok.chat_template,
                                     bos_token="<|im_start|>", eos_token="<|im_end|>")
    want = theirs.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.chat("Hi") == want and want.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


# ---------------------------------------------------------------------------------------------
# Real eviction = masked simulation on each family; generate.py --chat


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("policy_name", ["a2sf", "sink"])
@pytest.mark.parametrize("mode", ["streaming", "prefill"])
def test_real_eviction_equals_masked_simulation(dirs, name, policy_name, mode):
    model, _ = load(dirs[name][0])
    T, budget, prompt_len = 60, 12, 30  # past the Mistral window of 24, the budget below it
    tokens = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    p = policies.make_policy(policy_name, budget)
    cache = KVCache(model.cfg, p, budget, batch=2, mode=mode)
    real = run_through(model, tokens, cache, prompt_len)
    with torch.no_grad():
        sim, masks = simulate.masked_simulation(model, tokens, p, budget, mode=mode, prompt_len=prompt_len)
    torch.testing.assert_close(real, sim, rtol=0, atol=1e-4)
    for layer in range(model.cfg.n_layers):
        kept = cache.kept_mask(layer, T)
        assert int(kept.sum(-1).max()) <= budget
        if model.cfg.window:  # nothing out of the window stays
            assert not kept[..., :T - model.cfg.window + 1].any()


def test_windowed_full_cache_equals_no_cache(dirs):
    """Mistral with a full cache, token by token, equals the plain forward: the window holds in both."""
    model, _ = load(dirs["mistral"][0])
    tokens = tokens_of(60)
    cache = KVCache(model.cfg, policies.make_policy("full", None), None, max_len=60)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([model(tokens[:, i:i + 1], cache) for i in range(60)], 1), model(tokens),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [n for n, (_, t, _) in FAMILIES.items() if t])
def test_generate_chat_runs(dirs, name, capsys):
    code = generate.main(["--model", str(dirs[name][0]), "--policy", "a2sf", "--chat", "--max-new-tokens", "4",
                          "--prompt", "Hi there, tell me about the fox.", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and "chat template" in out and "KV bytes held" in out.splitlines()[-1], (out, err)


def test_generate_chat_without_template_says_so(dirs, capsys):
    d = dirs["llama-linear"][0]
    byte_bpe([]).save(str(d / "tokenizer.json"))
    code = generate.main(["--model", str(d), "--chat", "--max-new-tokens", "2", "--prompt", "hi", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "no chat template" in err, err
    (d / "tokenizer.json").unlink()


# ---------------------------------------------------------------------------------------------
# Strict loading: one line for what does not fit


def copy_dir(src: Path, dst: Path, **config_changes) -> Path:
    for f in ("config.json", "model.safetensors"):
        (dst / f).write_bytes((src / f).read_bytes())
    c = json.loads((dst / "config.json").read_text())
    c.update(config_changes)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def one_line(err, *words):
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("name,words", [
    ("qwen2", ["tensors of the checkpoint are not used", "model.layers.0.self_attn.k_proj.bias"]),
    ("qwen3", ["not used", "model.layers.0.self_attn.k_norm.weight"]),
    ("mistral", ["sliding_window 24 under model_type 'llama'"]),
])
def test_relabelled_as_llama_is_refused(dirs, name, words, tmp_path):
    d = copy_dir(dirs[name][0], tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(LoadError) as err:
        load(d)
    one_line(err, str(d), *words)


def test_unused_tensor_is_named(dirs, tmp_path):
    d = copy_dir(dirs["qwen2"][0], tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.layers.1.self_attn.extra_gate.weight"] = torch.zeros(4)
    save_file(state, d / "model.safetensors")
    with pytest.raises(LoadError) as err:
        load(d)
    one_line(err, "1 tensors", "model.layers.1.self_attn.extra_gate.weight")


def test_gguf_unused_tensor_and_unknown_pre_tokenizer(dirs, tmp_path):
    hf = dirs["qwen3"][1]
    path = write_gguf(hf, "qwen2", tmp_path / "relabelled.gguf")  # a Qwen3 written as qwen2: norms unused
    with pytest.raises(LoadError) as err:
        load(path)
    one_line(err, str(path), "blk.0.attn_q.bias")  # qwen2 needs biases this file lacks
    path = write_gguf(dirs["qwen2"][1], "qwen2", tmp_path / "pre.gguf", pre="falcon")
    with pytest.raises(LoadError) as err:
        load(path)
    one_line(err, str(path), "pre-tokenizer 'falcon' is not supported")


@pytest.mark.parametrize("changes,words", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, ["'dynamic'", "keys already in the cache"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "mscale": 0.7, "mscale_all_dim": 1},
      "max_position_embeddings": 2048}, ["mscale"]),
    ({"use_sliding_window": True, "sliding_window": 16}, ["use_sliding_window"]),
])
def test_refused_config_fields(dirs, tmp_path, changes, words):
    d = copy_dir(dirs["qwen2"][0], tmp_path, **changes)
    with pytest.raises(LoadError) as err:
        load(d)
    one_line(err, str(d / "config.json"), *words)


def test_fast_path_equals_masked_simulation_with_a_window(dirs):
    """The speed twins (fast.enable, fast.KVCache) on the windowed Mistral: the prompt's twin stands
    aside (its causal kernels know no window) and the rest keeps the window through Call.mask."""
    import fast

    for mode in ("streaming", "prefill"):
        model, _ = load(dirs["mistral"][0])
        tokens = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(5))
        p = policies.make_policy("a2sf", 10)
        with torch.no_grad():
            sim, _ = simulate.masked_simulation(model, tokens, p, 10, mode=mode, prompt_len=30)
        model = fast.enable(model)
        real = run_through(model, tokens, fast.KVCache(model.cfg, p, 10, mode=mode), 30)
        torch.testing.assert_close(real, sim, rtol=0, atol=1e-4)


def test_meta_scaled_rope_matches_transformers(tmp_path):
    """Meta's Llama 3.1 params.json (use_scaled_rope): Llama 3's scaling with Meta's constants."""
    from test_load_weights import write_meta

    cfg = LlamaConfig(**{**SIZES, "max_position_embeddings": 16384}, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    hf = randomize(AutoModelForCausalLM.from_config(cfg))
    write_meta(hf, tmp_path)
    assert max_diff(load(tmp_path)[0], hf, 1500) > 1e-2  # control: without use_scaled_rope (measured 2.9e-2)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    model, _ = load(tmp_path)
    assert model.cfg.rope_scaling.kind == "llama3" and max_diff(model, hf, 1500) < ATOL
