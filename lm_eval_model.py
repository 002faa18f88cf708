"""This project's model and KV cache as an lm-evaluation-harness model (`lm-eval` on PyPI, optional:
`pip install lm-eval`), so any lm-eval task runs under any policy and cache ratio.

    python evaluate.py lm-eval --tasks arc_easy,piqa --policy a2sf --ratio 0.2 --limit 200
    python evaluate.py lm-eval --tasks my_task --include-path DIR   # your own task YAMLs over local files

`ProjectLM` implements lm-eval's `LM` interface over evaluate.py's machinery, so a score here is the
score `evaluate.py mc` gives: loglikelihood batches the requests as `evaluate.loglikelihoods` does
(each request its own budget, round(ratio x its length); context and continuation encoded apart),
loglikelihood_rolling is `evaluate.token_logprobs` over [end-of-text] + the text, generate_until
decodes greedily through the cache as ruler.py does (prompt in, then one token per call) and cuts
at the first stop string.

No hub: the shipped tasks (`data.MC_TASKS` whose choices share a context: all but WinoGrande and
COPA) become lm-eval task configs over local JSONL files (`dataset_path: json`, `data_files`), and
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set, so a task whose data is not on disk fails at once
with lm-eval's own error instead of trying a download. is_greedy (lm-eval's exact-match for
loglikelihood tasks such as LAMBADA's acc) is not computed: it is always False.

Each policy and size is a work cell (sweep.py): under `torchrun --nproc-per-node N` the cells are
shared between the ranks and rank 0 writes the one results file; each cell is kept as it ends, so
the same command again computes only the unfinished ones.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import data
import evaluate
import ruler
import sweep

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval imports datasets
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ValueError("lm-eval is not installed: pip install lm-eval (an optional dependency)") from e
    return LM


def make_lm(model, tok, variant: str = "full", size=None, setup=None, batch_size: int = 64, max_batch_tokens: int = 32768):
    """An lm_eval LM over `model` with policy `variant` at `size` (('ratio', 0.2), ('budget', 128) or None)."""

    class ProjectLM(_lm_base()):
        def __init__(self):
            super().__init__()
            self.model, self.tok, self.variant, self.size = model, tok, variant, size
            self.setup = setup or evaluate.Setup()
            self.args = SimpleNamespace(batch_size=batch_size, max_batch_tokens=max_batch_tokens)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            reqs = [evaluate.Request("lm-eval", i, self.tok.encode(r.args[0]), self.tok.encode(r.args[1]))
                    for i, r in enumerate(requests)]
            if not reqs:
                return []
            total = evaluate.mc_calls(reqs, self.variant, self.size, self.setup, self.args)
            with evaluate.progress(total, f"lm-eval {self.variant}") as bar:
                lls = evaluate.loglikelihoods(self.model, reqs, self.variant, self.size, self.setup, self.args, bar)
            return [(float(x), False) for x in lls]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            prefix = self.tok.eos_id if getattr(self.tok, "eos_id", None) is not None else 0
            out = []
            for r in requests:
                ids = [prefix] + self.tok.encode(r.args[0])
                if len(ids) > self.model.cfg.max_seq_len:
                    raise ValueError(f"a text of {len(ids)} tokens is past the model's context of {self.model.cfg.max_seq_len}")
                budget = evaluate.budget_for(self.size, len(ids))
                policy = evaluate.make_variant(self.variant, budget, self.setup.flags)
                lp = evaluate.token_logprobs(self.model, torch.tensor([ids], device=self.model.device), policy, budget,
                                             self.setup)
                out.append(float(lp.sum()))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = [""] * len(requests)
            by_len: dict = {}
            for i, r in enumerate(requests):
                context, kw = r.args
                n = int(kw.get("max_gen_toks", 256))
                by_len.setdefault(n, []).append((i, context, kw))
            for n, items in by_len.items():
                for s in range(0, len(items), batch_size):
                    chunk = items[s:s + batch_size]
                    samples = [dict(tokens=self.tok.encode(c), context_len=0) for _, c, _ in chunk]
                    texts, _ = ruler.answer(self.model, self.tok, samples, self.variant, self.size, self.setup, "end", n)
                    for (i, _, kw), text in zip(chunk, texts):
                        until = kw.get("until") or []
                        for stop in [until] if isinstance(until, str) else until:
                            text = text.split(stop)[0]
                        out[i] = text
            return out

    return ProjectLM()


# -- the shipped multiple-choice tasks as local lm-eval tasks ------------------------------------------

def local_task(task: str, variant: str, folder: Path, limit: int | None = None) -> dict:
    """An lm-eval task config over a JSONL file of the shipped docs (no hub): context, the choices
    (continuation = " " + choice, lm-eval's target_delimiter), gold."""
    docs = data.mc_task(task, variant)[:limit]
    rows = []
    for d in docs:
        contexts = {r["context"] for r in d["requests"]}
        if len(contexts) != 1 or any(r["continuation"] != " " + r["choice"] for r in d["requests"]):
            raise ValueError(f"{task}: its choices do not share one context (WinoGrande, COPA): use `evaluate.py mc`")
        rows.append({"id": d["id"], "context": contexts.pop(), "choices": [r["choice"] for r in d["requests"]],
                     "gold": d["gold"]})
    path = folder / f"{task}_{variant}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"task": f"{task}_shipped", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def evaluate_lm(lm, tasks: list, include_path: str | None = None, limit: int | None = None, log_samples: bool = False):
    """lm_eval.simple_evaluate on our LM, with only the given tasks indexed (no hub)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path,
                          include_defaults=include_path is None and any(isinstance(t, str) for t in tasks))
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                   log_samples=log_samples, verbosity="ERROR")


def run_lm_eval(model, tok, args, setup) -> list[dict]:
    _lm_base()
    if setup.method != "real":
        raise ValueError("lm-eval runs through the real cache: use --method real")
    folder = Path(tempfile.mkdtemp(prefix="lm-eval-tasks-"))
    tasks = [local_task(t, args.variant, folder, args.limit) if t in data.MC_TASKS else t for t in args.task_list]
    runs = [(v, s) for v in args.policy_list for s in (evaluate.sizes_from(args, "ratio=0.2") if v != "full" else [None])]
    if args.dry_run:
        return [{"calls": 0}]
    from lm_eval.utils import make_table

    def compute(cell, bar):  # a cell (sweep.py): one policy and size on every task -> its rows
        v, size = cell
        t0 = time.perf_counter()
        lm = make_lm(model, tok, v, size, setup, args.batch_size or 64, args.max_batch_tokens)
        out = evaluate_lm(lm, tasks, args.include_path, None if all(isinstance(t, dict) for t in tasks) else args.limit)
        print(f"lm-eval, {v} {evaluate.size_label(size)}:\n{make_table(out)}", file=sys.stderr)
        rows = []
        for name, r in out["results"].items():
            row = dict(task=name, policy=v, size=size and dict([size]), variant=args.variant,
                       n_docs=out["n-samples"].get(name, {}).get("effective"), seconds=time.perf_counter() - t0)
            for key, value in r.items():
                if "," in key and isinstance(value, (int, float)):
                    metric, _, _ = key.partition(",")
                    row[metric] = value
            rows.append(row)
        bar.update(1)
        return rows

    # under torchrun the cells are shared between the ranks; each is kept as it ends (sweep.py)
    done = sweep.run(getattr(args, "out", None), sweep.config_of(args), "lm-eval", runs, compute)
    return None if done is None else [row for cell in runs for row in done[cell]["result"]]


def plot(plt, rows, metric="acc"):
    return evaluate.plot_mc(plt, [{**r, "acc_stderr": r.get("acc_stderr", 0.0), "acc_norm_stderr": r.get("acc_norm_stderr", 0.0)}
                                  for r in rows], metric)


def add_command(add) -> None:
    s = add("lm-eval", run_lm_eval, "any lm-evaluation-harness task under a policy (pip install lm-eval)",
            default_policies="full,a2sf")
    s.add_argument("--tasks", dest="task_list", type=evaluate._list(str), default=["arc_easy"],
                   help="shipped tasks (arc_easy, arc_challenge, openbookqa, piqa, hellaswag: local JSONL) or lm-eval "
                        "task names found under --include-path")
    s.add_argument("--variant", default="rc_0shot", help="of the shipped tasks: rc_0shot, rc_5shot, ...")
    s.add_argument("--include-path", default=None, help="a folder of lm-eval task YAMLs (over local data files)")
