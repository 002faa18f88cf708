"""bench.py's switches: `--reverse` runs a plan's rows last to first (issue 18: is the idle time inside
a later row's decode step the row's own, or its place in the process?); `--inductor KEY=VALUE` sets
torch._inductor.config for the compiled step, and a key it lacks is a one-line error; `--no-rows`
turns the fused projections off."""
import json

import pytest
import torch

import bench
import fast


def test_reverse_runs_the_plan_rows_last_to_first(tmp_path, monkeypatch):
    plan = [("tiny", "full", None, 24, 1), ("tiny", "sink", 8, 24, 1), ("tiny", "h2o", 8, 32, 2)]
    monkeypatch.setitem(bench.PLANS, "tiny-order", plan)
    keys = {}
    for flag in ([], ["--reverse"]):
        out = tmp_path / f"order{len(flag)}.json"
        bench.main(["--plan", "tiny-order", "--device", "cpu", "--dtype", "float32", "--no-hf", "--no-compile",
                    "--new-tokens", "2", "--prefill-reps", "1", "--out", str(out), *flag])
        keys[bool(flag)] = [(r["policy"], r["ctx"], r["batch"]) for r in json.loads(out.read_text())["rows"]]
    assert keys[False] == [("full", 24, 1), ("sink", 24, 1), ("h2o", 32, 2)]
    assert keys[True] == keys[False][::-1]


def test_inductor_settings_and_the_no_flags_reach_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "combo_kernels", False)
    monkeypatch.setattr(torch._inductor.config, "aggressive_fusion", False)
    monkeypatch.setattr(torch._inductor.config, "triton.enable_pdl", False)
    monkeypatch.setattr(fast.model, "ROWS", True)
    monkeypatch.setattr(fast.kernels, "PDL", None)
    monkeypatch.setattr(fast.model, "APPEND", True)
    monkeypatch.setattr(fast.model, "JOIN", True)
    monkeypatch.setattr(fast.step, "EMBED", True)
    monkeypatch.setattr(fast.kernels, "COLUMN_SUMS_SPLIT", True)
    plan = [("tiny", "full", None, 24, 1)]
    monkeypatch.setitem(bench.PLANS, "tiny-one", plan)
    bench.main(["--plan", "tiny-one", "--device", "cpu", "--dtype", "float32", "--no-hf", "--no-compile", "--new-tokens",
                "2", "--prefill-reps", "1", "--out", str(tmp_path / "o.json"), "--inductor",
                "combo_kernels=True,aggressive_fusion=True,triton.enable_pdl=True", "--no-rows", "--no-pdl",
                "--no-append", "--no-join", "--no-embed", "--no-colsum-split"])
    assert torch._inductor.config.combo_kernels is True and torch._inductor.config.aggressive_fusion is True
    assert torch._inductor.config.triton.enable_pdl is True  # a sub-config's setting, by its dotted name
    assert fast.model.ROWS is False and fast.kernels.PDL is False and fast.model.APPEND is False
    assert fast.model.JOIN is False and fast.step.EMBED is False and fast.kernels.COLUMN_SUMS_SPLIT is False


@pytest.mark.parametrize("setting", ["no_such_setting=1", "combo_kernels"])
def test_an_unknown_inductor_setting_is_a_one_line_error(setting, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--inductor", setting])
    assert "give KEY=VALUE" in capsys.readouterr().err
