"""soak.py on a tiny random model (CPU, seconds): rows at the checkpoints asked for, memory and
non-finite figures reported, held tokens never above the budget, the compiled steady calls (aot_eager
on the CPU) equal to the eager ones, a non-finite value ending in exit code 1, and every bad input
in one line with exit code 2. The GPU twin (inductor + CUDA graph) is marked gpu."""

import json
import math

import pytest
import torch

import soak

TINY = ["--weights", "random", "--preset", "tiny-llama", "--budget", "32", "--chunk", "8", "--positions", "slot"]


@pytest.fixture
def text(tmp_path):
    """A short text (about 900 bytes): a stream of 2,000 tokens goes round it twice."""
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"word{i * 7 % 97}" for i in range(150)), encoding="utf-8")
    return str(path)


def run_soak(capsys, argv):
    code = soak.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_checkpoints_are_rounded_up_to_whole_calls():
    assert soak.checkpoints(1_000_000, 100_000, [10_000], 8) == [10_000, *range(100_000, 1_000_001, 100_000)]
    assert soak.checkpoints(1_000_000, 100_000, [10_000], 64)[:3] == [10_048, 100_032, 200_000]
    assert soak.checkpoints(1_000_000, 100_000, [10_000], 64)[-1] == 1_000_000
    assert soak.checkpoints(2_000, 500, [100, 10_000], 8) == [104, 504, 1000, 1504, 2000]  # 10,000 is past the end
    assert soak.checkpoints(20, 100, [], 8) == [24]  # the end, rounded up to a whole call


def test_cyclic_stream_wraps_around():
    stream = soak.cyclic([1, 2, 3], chunk=4, device="cpu")
    assert stream.tolist() == [1, 2, 3, 1, 2, 3, 1, 2]  # any call's inputs and targets are one slice


def test_rows_at_the_checkpoints(capsys, text, tmp_path):
    out_file = tmp_path / "soak.json"
    code, out, err = run_soak(capsys, [*TINY, "--policies", "sink,a2sf", "--tokens", "2000", "--every", "500",
                                       "--at", "100", "--text", text, "--no-compile", "--out", str(out_file), "--json"])
    assert code == 0, err
    record = json.loads(out)
    assert record == json.loads(out_file.read_text())
    assert record["config"]["budget"] == 32 and record["dtype"] == "float32" and record["argv"][:2] == TINY[:2]
    assert [r["policy"] for r in record["results"]] == ["sink", "a2sf"]
    for result in record["results"]:
        rows = result["rows"]
        assert [r["tokens"] for r in rows] == [104, 504, 1000, 1504, 2000] == record["checkpoints"]
        assert sum(r["interval_tokens"] for r in rows) == 2000
        for r in rows:
            assert r["held"] == 32  # full, and never above the budget
            assert r["peak_mb"] > 0 and r["allocated_mb"] > 0 and r["tok_s"] > 0
            assert r["nonfinite_logits"] == 0 and math.isfinite(r["ppl"]) and r["ppl"] > 1
            assert r["nonfinite_scores"] == (0 if result["policy"] == "a2sf" else None)
        s = result["summary"]
        assert s["tokens"] == 2000 and not s["over_budget"] and s["held_max"] == 32
        assert s["ppl"] == pytest.approx(math.exp(s["nll_sum"] / 2000))
        assert result["warmup"]["eager_calls"] == 32 // 8  # until the cache is full: every later call is alike
        assert result["kv_bytes"] == 2 * 2 * 2 * (32 + 8) * 16 * 4  # layers x (k, v) x heads x slots x dim x fp32
    assert "| tokens | tok/s | peak MB |" in err and "| 1,504 |" in err  # the tables go to stderr with --json


def test_compiled_equals_eager(capsys, text, tmp_path):
    torch._dynamo.reset()
    runs = {}
    for name, flags in (("eager", ["--no-compile"]), ("compiled", ["--compile", "--backend", "aot_eager"])):
        path = tmp_path / f"{name}.json"
        code, out, err = run_soak(capsys, [*TINY, "--policies", "sink,a2sf", "--tokens", "1200", "--every", "400",
                                           "--at", "", "--text", text, "--out", str(path), *flags])
        assert code == 0, err
        runs[name] = json.loads(path.read_text())
        lines = [line for line in out.splitlines() if line.startswith("|")]
        assert len(lines) == 2 * (2 + 3), out  # per policy: header, rule, 3 rows
    for eager, compiled in zip(runs["eager"]["results"], runs["compiled"]["results"]):
        assert compiled["compiled"] and not eager["compiled"] and not compiled["cuda_graph"]
        assert compiled["summary"]["nll_sum"] == pytest.approx(eager["summary"]["nll_sum"], rel=1e-6)
        assert [r["nll"] for r in compiled["rows"]] == pytest.approx([r["nll"] for r in eager["rows"]], rel=1e-6)
        assert [r["held"] for r in compiled["rows"]] == [32] * 3


def test_non_finite_values_exit_1(capsys, text, tmp_path, monkeypatch):
    build = soak.build_model

    def poisoned(args, device, dtype):
        m, encode, description = build(args, device, dtype)
        with torch.no_grad():
            m.layers[0].mlp.w_down.weight[0, 0] = float("nan")
        return m, encode, description + " (poisoned)"

    monkeypatch.setattr(soak, "build_model", poisoned)
    path = tmp_path / "nan.json"
    code, out, err = run_soak(capsys, [*TINY, "--policies", "a2sf", "--tokens", "200", "--every", "100", "--text", text,
                                       "--no-compile", "--out", str(path)])
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("soak failed: a2sf: ") and "non-finite" in err
    s = json.loads(path.read_text())["results"][0]["summary"]
    assert s["nonfinite_logits"] == 200 * 128 and s["nonfinite_scores"] > 0 and math.isnan(s["ppl"])


BAD = [
    (["--policies", "sink,lru"], "unknown policy 'lru'"),
    (["--policies", "full"], "keeps every token"),
    (["--policies", ","], "--policies is empty"),
    (["--budget", "0"], "--budget 0"),
    (["--budget", "3", "--policies", "sink"], "policy sink at --budget 3"),  # 4 sinks do not fit
    (["--budget", "8", "--policies", "a2sf", "--n-sink", "9"], "below the protected slots"),
    (["--budget", "250"], "past the model's context of 256"),  # 250 + 8 slots: ranks past the context
    (["--positions", "original", "--tokens", "1000"], "use --positions slot"),
    (["--positions", "rank"], "invalid choice"),
    (["--tokens", "0"], "--tokens 0"),
    (["--chunk", "0"], "--chunk 0"),
    (["--every", "-1"], "--every -1"),
    (["--at", "ten"], "--at 'ten'"),
    (["--alpha", "2"], "outside [0, 1]"),
    (["--gqa", "mean"], "gqa 'mean'"),
    (["--text", "/no/such/file.txt"], "no such file"),
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["--model", "x.gguf"], "not both"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "use cpu or cuda"),
]


@pytest.mark.parametrize("flags,words", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_is_one_line(capsys, text, tmp_path, flags, words):
    code, out, err = run_soak(capsys, [*TINY, "--tokens", "100", "--text", text, "--out", str(tmp_path / "x.json"),
                                       "--no-compile", *flags])
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err, err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, text):
    code, out, err = run_soak(capsys, [*TINY, "--tokens", "100", "--text", text, "--device", "cuda"])
    assert code == 2 and err.startswith("error: ") and "no CUDA GPU" in err and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,rel", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_cuda_graph_soak_equals_eager(capsys, text, tmp_path, dtype, rel):
    """The shipped path (inductor + one CUDA graph per call) against eager calls, on the GPU."""
    runs = {}
    for name, flags in (("eager", ["--no-compile"]), ("graph", ["--compile"])):
        path = tmp_path / f"{name}.json"
        code, _, err = run_soak(capsys, [*TINY, "--policies", "sink,a2sf", "--tokens", "4000", "--every", "1000",
                                         "--text", text, "--device", "cuda", "--dtype", dtype, "--out", str(path), *flags])
        assert code == 0, err
        runs[name] = json.loads(path.read_text())
    for eager, graph in zip(runs["eager"]["results"], runs["graph"]["results"]):
        assert graph["cuda_graph"] and graph["summary"]["held_max"] == 32
        assert graph["summary"]["nll_sum"] == pytest.approx(eager["summary"]["nll_sum"], rel=rel)
        peaks = [r["peak_mb"] for r in graph["rows"][1:]]
        assert max(peaks) - min(peaks) < 1.0  # flat after the first checkpoint
