"""The command line: same greedy text where the policies say it must be; one-line errors."""

import functools

import pytest
import torch
from helpers import tiny_model

import generate
import load_weights


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


_real_load = load_weights.load


@functools.lru_cache
def _default_model():
    return _real_load(None)


@pytest.fixture
def real(monkeypatch):
    """The real default model, loaded once for the module."""
    monkeypatch.setattr(load_weights, "load", lambda path=None, device="cpu", dtype=torch.float32: _default_model())


@pytest.fixture
def tiny(monkeypatch):
    def load(path=None, device="cpu", dtype=torch.float32):
        m = tiny_model("tiny-opt" if path == "opt" else "tiny-llama")
        return m, ByteTokenizer(m.cfg.vocab_size)
    monkeypatch.setattr(load_weights, "load", load)


def run_cli(capsys, *args):
    code = generate.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def text_of(out):
    return out.rsplit("[", 1)[0]  # what was generated, without the closing stats line


PROMPT = ("The old harbour town woke slowly. Fishermen mended nets on the quay, gulls argued over scraps, and the baker "
          "on the hill opened her shutters to the smell of bread. Write one more sentence about the town.")


def test_a2sf_with_alpha_one_prints_what_h2o_prints(real, capsys):
    common = ["--prompt", PROMPT, "--max-new-tokens", "12", "--budget", "24", "--recent", "8", "--mode", "streaming",
              "--chunk", "8"]
    c1, a2sf, _ = run_cli(capsys, "--policy", "a2sf", "--alpha", "1", *common)
    c2, h2o, _ = run_cli(capsys, "--policy", "h2o", *common)
    assert c1 == c2 == 0 and text_of(a2sf) == text_of(h2o) and len(text_of(h2o).strip()) > 0
    _, a2sf_forget, _ = run_cli(capsys, "--policy", "a2sf", "--alpha", "0.1", *common)
    assert "kept 24 of" in a2sf_forget  # and eviction really happened


@pytest.mark.parametrize("policy", ["a2sf", "sink", "vatp", "tova"])
def test_a_budget_above_the_length_prints_what_full_prints(real, capsys, policy):
    args = ["--prompt", PROMPT, "--max-new-tokens", "10"]
    _, full, _ = run_cli(capsys, "--policy", "full", *args)
    _, other, _ = run_cli(capsys, "--policy", policy, "--budget", "120", *args)
    assert text_of(other) == text_of(full)


def test_default_run_evicts_and_reports(real, capsys):
    code, out, _ = run_cli(capsys, "--max-new-tokens", "4")
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("[a2sf] prefill") and "KV bytes held" in last and "vs full" in last


@pytest.mark.parametrize("args,words", [
    (["--policy", "lru"], "choose one of full, window, sink"),
    (["--policy", "h2o", "--budget", "6", "--n-sink", "4", "--recent", "4"], "below the protected slots"),
    (["--policy", "h2o", "--ratio", "1.5"], "outside (0, 1]"),
    (["--policy", "h2o", "--ratio", "0"], "outside (0, 1]"),
    (["--policy", "a2sf", "--alpha", "2"], "outside [0, 1]"),
    (["--policy", "sink", "--positions", "slot", "--model", "opt"], "OPT"),
    (["--policy", "sink", "--mode", "both"], "mode"),
    (["--policy", "sink", "--chunk", "0"], "chunk"),
    (["--policy", "sink", "--positions", "rank"], "positions"),
    (["--prompt", "   "], "empty"),
    (["--prompt", "x" * 300], "longer than the model's context"),
    (["--prompt", "x" * 200, "--max-new-tokens", "100"], "exceed the context"),
    (["--policy", "h2o", "--budget", "0"], "budget"),
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


def test_sampling_is_seeded_and_filters_behave():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert generate.top_k_filter(logits, 2).isinf().tolist() == [[True, True, False, False]]
    kept = ~generate.top_p_filter(logits, 0.5).isinf()
    assert kept.tolist() == [[False, False, False, True]] or kept.sum() >= 1
    g = lambda: torch.Generator().manual_seed(3)
    draws = [generate.sample(logits.repeat(64, 1), 1.0, 0, 1.0, g()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and len(set(draws[0].tolist())) > 1
    assert generate.sample(logits, 0.0, 0, 1.0, g()).tolist() == [3]
