"""The command line: the greedy text a policy's definition implies; what a newcomer sees (the prompt
first, no EOS marker, honest counts, no Python reprs, examples in --help); one-line errors, the
cheap ones before any model loads."""

import functools
import re

import pytest
import torch
from helpers import tiny_model
from test_policies import Direct

import generate
import load_weights
import policies
from cache import KVCache


class ByteTokenizer:
    """A stand-in tokenizer for tiny models: one token per byte (mod the vocabulary)."""

    eos_id, bos_id, has_chat_template = None, None, False

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, s):
        return [b % self.vocab for b in s.encode()]

    def decode(self, ids):
        return "".join(chr(32 + i % 90) for i in ids)

    def chat(self, s):
        return s


class ChatTokenizer(ByteTokenizer):
    """With a chat template and an EOS token that decodes as ChatML's `<|im_end|>`."""

    has_chat_template = True

    def __init__(self, vocab, eos_id):
        super().__init__(vocab)
        self.eos_id = eos_id

    def decode(self, ids):
        return "".join("<|im_end|>" if i == self.eos_id else chr(32 + i % 90) for i in ids)

    def chat(self, s):
        return f"<|im_start|>user\n{s}<|im_end|>\n<|im_start|>assistant\n"


_real_load = load_weights.load


@functools.lru_cache
def _default_model():
    return _real_load(None)


@pytest.fixture
def real(monkeypatch):
    """The real default model, loaded once for the module."""
    monkeypatch.setattr(load_weights, "load", lambda path=None, device="cpu", dtype=torch.float32: _default_model())


def tiny_load(path=None, device="cpu", dtype=torch.float32):
    m = tiny_model("tiny-opt" if path == "opt" else "tiny-llama")
    return m.to(device=device, dtype=dtype), ByteTokenizer(m.cfg.vocab_size)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(load_weights, "load", tiny_load)


@pytest.fixture
def no_load(monkeypatch):
    """Any load of a model fails the test: the command must have refused before it."""
    def load(*args, **kwargs):
        pytest.fail("the model was loaded before a bad flag was refused")
    monkeypatch.setattr(load_weights, "load", load)


def run_cli(capsys, *args):
    code = generate.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


STATS = re.compile(r"^\[(\w+)\] prefill (\d+) tok .* \| decode (\d+) tok .* \| kept (\d+) of (\d+) tokens per KV head "
                   r"\(budget (\w+)\) \| KV bytes held ([\d,]+) vs full ([\d,]+) \((\d+)%\)$")


def parts(out, policy):
    """The printed run: -> (header, prompt shown, generated text, stats match)."""
    header, rest = out.split("\n", 1)
    shown, rest = rest.split(f"\n--- {policy} ---\n", 1)
    text, stats = rest.rsplit("\n", 2)[:2]
    m = STATS.match(stats)
    assert m, stats
    return header, shown, text, m


PROMPT = ("The old harbour town woke slowly. Fishermen mended nets on the quay, gulls argued over scraps, and the baker "
          "on the hill opened her shutters to the smell of bread. Write one more sentence about the town.")
SHORT = "a short prompt for the tiny model"


# -- the text a policy's definition implies -----------------------------------------------------------

def direct_h2o_greedy(m, ids, n, budget, recent, chunk):
    """Greedy decoding with H2O written out (test_policies.Direct, on the model's own projections,
    row by row): the prompt in calls of `chunk` rows, then one row per call. -> the new ids."""
    cfg = m.cfg
    ids = list(ids)
    calls = [(s, min(s + chunk, len(ids))) for s in range(0, len(ids), chunk)]
    for _ in range(n):
        tokens = torch.tensor([ids])
        T = len(ids)
        pos = torch.arange(T)[None]
        x = m.embed(tokens, pos)
        angles = m.angles(pos)
        for block in m.layers:
            attn = block.attn
            q, k, v = attn.project(block.attn_norm(x))
            q, k = attn.rope(q, angles), attn.rope(k, angles)
            out = torch.zeros_like(q)
            for g in range(cfg.n_kv_heads):
                d = Direct(budget, recent=recent)
                for s, e in calls:
                    held = sorted(set(d.score) | set(range(s, e)))
                    A = {}
                    for r in range(s, e):
                        seen = [j for j in held if j <= r]
                        p = (q[0, g, :, r] @ k[0, g, seen].T / cfg.head_dim ** 0.5).softmax(-1)  # (G, seen)
                        out[0, g, :, r] = p @ v[0, g, seen]
                        A.update({(h, r, j): float(p[h, i]) for h in range(cfg.group) for i, j in enumerate(seen)})
                    d.call(list(range(s, e)), lambda h, r, j, A=A: A.get((h, r, j), 0.0), range(cfg.group))
            x = x + attn.output(out)
            x = x + block.mlp(block.mlp_norm(x))
        ids.append(int(m.head(x)[0, -1].argmax()))
        calls.append((T, T + 1))
    return ids[-n:]


@pytest.mark.parametrize("args", [["--policy", "a2sf", "--alpha", "1"], ["--policy", "h2o"]], ids=["a2sf-alpha-1", "h2o"])
def test_h2o_and_a2sf_alpha_one_print_the_direct_h2o_text(tiny, capsys, args):
    """Both print what greedy decoding under H2O written out in the test generates (plain
    accumulation over the group's heads, recent window + top scores, oldest out among equals)."""
    budget, recent, chunk, n = 12, 4, 5, 10
    code, out, _ = run_cli(capsys, *args, "--prompt", SHORT, "--max-new-tokens", str(n), "--budget", str(budget),
                           "--recent", str(recent), "--mode", "streaming", "--chunk", str(chunk), "--reference")
    assert code == 0
    m, tok = tiny_load()
    with torch.no_grad():
        want = direct_h2o_greedy(m, tok.encode(SHORT), n, budget, recent, chunk)
    _, _, text, stats = parts(out, args[1])
    assert text == tok.decode(want)
    assert stats.group(4) == str(budget)  # eviction happened: 42 tokens fed, 12 kept
    code, out, _ = run_cli(capsys, *args[:2], "--prompt", SHORT, "--max-new-tokens", str(n), "--budget", str(budget),
                           "--recent", "0", "--mode", "streaming", "--chunk", str(chunk), "--reference")
    assert parts(out, args[1])[2] != text  # the check has power: another split, another text


@pytest.mark.parametrize("policy", ["a2sf", "sink"])
def test_a_budget_above_the_length_prints_what_full_prints(real, capsys, policy):
    args = ["--prompt", PROMPT, "--max-new-tokens", "8"]
    _, full, _ = run_cli(capsys, "--policy", "full", *args)
    _, other, _ = run_cli(capsys, "--policy", policy, "--budget", "120", *args)
    assert parts(other, policy)[2] == parts(full, "full")[2] and len(parts(full, "full")[2].strip()) > 0


def test_default_run_shows_its_prompt_evicts_and_reports(real, capsys):
    code, out, err = run_cli(capsys, "--max-new-tokens", "4")
    assert code == 0 and err == ""
    header, shown, text, stats = parts(out, "a2sf")
    assert header.startswith("--- prompt (") and "chat template" in header  # SmolLM2-Instruct has one
    assert shown == generate.DEFAULT_PROMPT  # the question before its answer
    T, n, kept, fed = (int(stats.group(i)) for i in (2, 3, 4, 5))
    assert stats.group(1) == "a2sf" and n == 4 and fed == T + n - 1
    assert kept == int(stats.group(6)) == round(0.5 * T)  # the default ratio 0.5, really evicted
    assert int(stats.group(9)) < 100


# -- what a newcomer hit (issue 14, item 6) ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefill", "streaming"])
def test_full_reports_every_token_fed_as_kept(tiny, capsys, mode):
    """Not `kept 309 of 310`: the last new token is never fed, and `full` keeps all that were."""
    n = 6
    code, out, _ = run_cli(capsys, "--policy", "full", "--prompt", SHORT, "--max-new-tokens", str(n), "--mode", mode)
    _, _, text, stats = parts(out, "full")
    T = len(SHORT.encode())
    assert code == 0 and len(text) == n
    assert (stats.group(2), stats.group(3), stats.group(4), stats.group(5)) == (str(T), str(n), str(T + n - 1), str(T + n - 1))
    held, full = (int(stats.group(i).replace(",", "")) for i in (7, 8))
    assert stats.group(6) == "all" and held >= full  # (storage for max_len = T + n slots: one more than fed)


def eos_after(monkeypatch):
    """The tiny model with a chat tokenizer whose EOS is the first token greedy decoding gives at
    a step k >= 2 that it did not give before. -> the k tokens before it."""
    m, _ = tiny_load()
    prompt = ChatTokenizer(m.cfg.vocab_size, None).chat(SHORT)
    ids = ByteTokenizer(m.cfg.vocab_size).encode(prompt)
    with torch.no_grad():
        new, _ = generate.generate(m, torch.tensor([ids]), KVCache(m.cfg, policies.make_policy("full", None), None),
                                   12)
    seq = new[0].tolist()
    k = next(i for i in range(2, 12) if seq[i] not in seq[:i])
    monkeypatch.setattr(load_weights, "load", lambda *a, **kw: (tiny_load()[0], ChatTokenizer(m.cfg.vocab_size, seq[k])))
    return seq[:k]


def test_chat_mode_never_prints_the_eos_marker(monkeypatch, capsys):
    before = eos_after(monkeypatch)
    code, out, _ = run_cli(capsys, "--prompt", SHORT, "--max-new-tokens", "20", "--policy", "full")
    header, shown, text, stats = parts(out, "full")
    assert code == 0 and "chat template" in header and shown == SHORT
    assert "<|im_end|>" not in out
    assert text == ByteTokenizer(128).decode(before) and stats.group(3) == str(len(before))  # stopped at the EOS, not after it


def test_generate_stops_at_eos_without_returning_or_passing_it(monkeypatch):
    m, _ = tiny_load()
    prompt = torch.tensor([ByteTokenizer(128).encode(SHORT)])
    cache = lambda: KVCache(m.cfg, policies.make_policy("full", None), None)  # noqa: E731
    with torch.no_grad():
        free, _ = generate.generate(m, prompt, cache(), 8)
        seq = free[0].tolist()
        k = next(i for i in range(1, 8) if seq[i] not in seq[:i])
        seen = []
        new, _ = generate.generate(m, prompt, cache(), 8, eos_id=seq[k], on_token=lambda t: seen.append(int(t[0])))
    assert new[0].tolist() == seen == seq[:k]


@pytest.mark.parametrize("args,words", [
    (["--ratio", "2"], "--ratio 2.0 is outside (0, 1]"),
    (["--budget", "0"], "--budget 0: use a number of tokens >= 1"),
    (["--budget", "4", "--ratio", "0.5"], "not both"),
    (["--policy", "lru"], "unknown policy 'lru'"),
    (["--alpha", "2"], "--alpha 2.0 is outside [0, 1]"),
])
def test_flags_that_cannot_work_are_refused_before_the_model_loads(no_load, capsys, args, words):
    code, out, err = run_cli(capsys, "--prompt", SHORT, *args)
    assert code == 2 and out == ""
    assert err == f"error: {err[7:].strip()}\n" and words in err


def test_help_shows_example_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    examples = out.split("examples:\n", 1)[1].splitlines()
    assert len(examples) >= 3 and all(line.strip().startswith("python generate.py --") for line in examples)
    assert "python generate.py --policy a2sf" in out and "--ratio" in out and "--reference" in out


@pytest.mark.parametrize("policy", ["full", "a2sf", "sink", "random"])
def test_no_python_reprs_in_the_output(tiny, capsys, policy):
    code, out, err = run_cli(capsys, "--policy", policy, "--prompt", SHORT, "--max-new-tokens", "3")
    assert code == 0 and err == ""
    stats = out.strip().splitlines()[-1]
    assert STATS.match(stats), stats
    for repr_ in ("None", "{'", "tensor(", "torch.", "Policy("):
        assert repr_ not in stats, stats
    assert (parts(out, policy)[3].group(6) == "all") == (policy == "full")


# -- one-line errors, after the load where they need the model -------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--policy", "h2o", "--budget", "6", "--n-sink", "4", "--recent", "4"], "below the protected slots"),
    (["--policy", "h2o", "--ratio", "1.5"], "outside (0, 1]"),
    (["--policy", "h2o", "--ratio", "0"], "outside (0, 1]"),
    (["--policy", "sink", "--positions", "slot", "--model", "opt"], "OPT"),
    (["--policy", "sink", "--mode", "both"], "mode"),
    (["--policy", "sink", "--chunk", "0"], "chunk"),
    (["--policy", "sink", "--positions", "rank"], "positions"),
    (["--prompt", "   "], "empty"),
    (["--prompt", "x" * 300], "longer than the model's context"),
    (["--prompt", "x" * 200, "--max-new-tokens", "100"], "exceed the context"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
])
def test_bad_input_is_one_line(tiny, capsys, args, words):
    if "--prompt" not in args:
        args = ["--prompt", "a short prompt", "--max-new-tokens", "4", *args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_a_gpu(tiny, capsys):
    code, _, err = run_cli(capsys, "--device", "cuda", "--prompt", "hi")
    assert code == 2 and "no CUDA GPU" in err and err.count("\n") == 1


# -- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p,kept", [(0.5, [3]), (0.64, [3]), (0.7, [2, 3]), (0.9, [1, 2, 3]), (0.99, [0, 1, 2, 3]),
                                    (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    """softmax([0, 1, 2, 3]) = .032 .087 .237 .644 (cumulated from the top: .644 .881 .968 1)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    got = (~generate.top_p_filter(logits, p).isinf())[0].nonzero().flatten().tolist()
    assert got == kept


def test_sampling_is_seeded_and_filters_behave():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert generate.top_k_filter(logits, 2).isinf().tolist() == [[True, True, False, False]]
    assert generate.top_k_filter(logits, 0).isinf().sum() == 0
    g = lambda: torch.Generator().manual_seed(3)
    draws = [generate.sample(logits.repeat(64, 1), 1.0, 0, 1.0, g()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and len(set(draws[0].tolist())) > 1
    assert set(generate.sample(logits.repeat(64, 1), 1.0, 2, 1.0, g()).tolist()) <= {2, 3}  # top-k 2: only those
    assert generate.sample(logits, 0.0, 0, 1.0, g()).tolist() == [3]
