"""What every checker and experiment shares: which implementation to check, the teaching wrapper
around it, the default model and texts.

The switch: the environment variable EXERCISE_IMPL.
    (unset) or "student"   exercises/NN_name/student.py        the file you fill in
    "solution"             exercises/solutions/NN_name.py      the reference, same functions

    pytest exercises/05_streaming_ppl                             # checks your student.py
    EXERCISE_IMPL=solution pytest exercises/05_streaming_ppl      # checks the reference
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

import model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMPLS = ("student", "solution")


def which() -> str:
    impl = os.environ.get("EXERCISE_IMPL", "student") or "student"
    if impl not in IMPLS:
        raise ValueError(f"EXERCISE_IMPL={impl!r}: use 'student' (your file) or 'solution' (the reference)")
    return impl


def exercise_dir(name: str) -> Path:
    """'05' or '05_streaming_ppl' -> the exercise's folder."""
    found = sorted(p for p in HERE.glob(f"{name}*") if p.is_dir() and p.name[:2].isdigit())
    if not found:
        names = ", ".join(p.name for p in sorted(HERE.glob("[0-9][0-9]_*")))
        raise ValueError(f"no exercise {name!r}: choose one of {names}")
    return found[0]


def module_path(folder: Path, impl: str | None = None) -> Path:
    impl = impl or which()
    return folder / "student.py" if impl == "student" else HERE / "solutions" / f"{folder.name}.py"


def load_module(path: Path, name: str):
    """Import a file by its path (the exercise folders start with digits: not importable by name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and hypothesis look modules up by name
    spec.loader.exec_module(module)
    return module


def teach(message: str):
    """Fail the check with `message` alone: no traceback, and not the stub's NotImplementedError
    chained before it (`from None`), so the first thing the student reads is what to do."""
    raise pytest.fail.Exception(message, pytrace=False) from None


class Implementation:
    """The module under test; calling one of its functions that is still a stub (raises
    NotImplementedError) fails the check with what the function must do, not a traceback."""

    def __init__(self, module, folder: Path):
        self.module, self.folder = module, folder

    def __getattr__(self, name):
        if name.startswith("_") or name == "pytestmark":
            raise AttributeError(name)
        if not hasattr(self.module, name):
            raise AttributeError(f"{self.module.__file__} has no `{name}`: keep the names the stub gives "
                                 f"(see {self.folder.name}/README.md)")
        obj = getattr(self.module, name)
        if not callable(obj) or inspect.isclass(obj):
            return obj
        folder = self.folder.name

        @functools.wraps(obj)
        def call(*args, **kwargs):
            try:
                return obj(*args, **kwargs)
            except NotImplementedError as e:
                doc = (inspect.getdoc(obj) or "").strip()
                teach(f"`{name}` is not written yet ({e or 'it raises NotImplementedError'}).\n"
                      f"What it must do:\n    {doc.replace(chr(10), chr(10) + '    ')}\n"
                      f"Read exercises/{folder}/README.md, fill in {self.module.__file__}, run the check again.")
        return call


def implementation(checker_file: str) -> Implementation:
    """The implementation the checker beside `checker_file` must check (see the module docstring)."""
    folder = Path(checker_file).resolve().parent
    impl = which()
    path = module_path(folder, impl)
    return Implementation(load_module(path, f"exercise_{folder.name}_{impl}"), folder)


@functools.lru_cache(maxsize=1)
def default_model():
    """The default model (SmolLM2-135M-Instruct, fp32 on the CPU) and its tokenizer, loaded once."""
    import load_weights

    return load_weights.load(None)


def shakespeare_ids(tok, n: int, index: int = 0) -> list[int]:
    """The first n tokens of Shakespeare text `index` (what `evaluate.py ppl --limit 1` reads)."""
    import data

    text = list(data.shakespeare_texts().values())[index]
    return tok.encode(text)[:n]


def prompt_ids(tok, n: int) -> list[int]:
    """The first n tokens of generate.DEFAULT_PROMPT (the lighthouse story)."""
    import generate

    return tok.encode(generate.DEFAULT_PROMPT)[:n]


def random_tokens(seed: int, B: int, T: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


class explained:
    """`with course.explained(fn):` a NotImplementedError raised inside (by a stub called from the
    project's code, e.g. a cache method the model calls) fails the check with fn's docstring."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None and issubclass(kind, NotImplementedError):
            doc = (inspect.getdoc(self.fn) or "").strip().replace("\n", "\n    ")
            teach(f"`{self.fn.__qualname__}` is not written yet ({value}).\nWhat it must do:\n    {doc}\n"
                  f"Fill it in ({inspect.getsourcefile(self.fn)}) and run the check again.")
        return False


class HostSyncs:
    """`with course.HostSyncs() as s: ...` then s.ops: the operations run inside that make the host
    wait for the device's values (on CUDA, a synchronisation): .item(), int(t), float(t), bool(t),
    `if t:`, and ops whose output shape depends on the values (nonzero, masked_select, boolean
    indexing, unique, repeat_interleave by a tensor). On the CPU nothing waits, but the same calls
    run, so counting them here tells what a GPU would wait for. (.tolist() and .numpy() do not go
    through the dispatcher: the checkers look for those in the source.)"""

    VALUE_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
                 "unique_consecutive", "masked_scatter"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in outer.VALUE_OPS or func.__name__ == "repeat_interleave.Tensor":  # output size from values
                    outer.ops.append(name)
                elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                    outer.ops.append("index by a boolean mask")
                return func(*args, **(kwargs or {}))

        self.ops: list[str] = []
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@torch.no_grad()
def attention_probs(m, tokens):
    """Per layer, (probs (B, Hkv, G, T, T), values (B, Hkv, T, D)) of a plain causal forward (exercise 01's loop)."""
    B, T = tokens.shape
    pos = torch.arange(T).expand(B, T)
    causal = (pos[:, None, :] <= pos[:, :, None])[:, None].expand(B, m.cfg.n_kv_heads, T, T)
    x, angles, out = m.embed(tokens, pos), m.angles(pos), []
    for block in m.layers:
        a = block.attn
        q, k, v = a.project(block.attn_norm(x))
        o, probs = model.attend(a.rope(q, angles), a.rope(k, angles), v, causal, need_probs=True)
        out.append((probs, v))
        x = x + a.output(o)
        x = x + block.mlp(block.mlp_norm(x))
    return out
