"""bench.py's row order: `--reverse` runs a plan's rows last to first (issue 18: is the idle time inside
a later row's decode step the row's own, or its place in the process?)."""
import json

import bench


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
