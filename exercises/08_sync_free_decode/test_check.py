"""Checker for exercise 08 (a decode loop with no host syncs): `pytest exercises/08_sync_free_decode`."""

import ast
import inspect
import textwrap

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import generate
import policies
from cache import KVCache
from exercises import course

impl = course.implementation(__file__)


def make_cache(m, name, B):
    budget = None if name == "full" else 8
    return KVCache(m.cfg, policies.make_policy(name, budget), budget, batch=B, max_len=64 if name == "full" else None)


def both(m, prompt, name, n, eos):
    B = prompt.shape[0]
    with torch.no_grad():
        naive = impl.decode_with_syncs(m, make_cache(m, name, B), prompt, n, eos)
        yours = impl.decode_without_syncs(m, make_cache(m, name, B), prompt, n, eos)
    return naive, yours


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), B=st.integers(1, 3), T=st.integers(1, 12), stop=st.integers(0, 6),
       name=st.sampled_from(["full", "a2sf", "sink", "h2o"]))
def test_the_same_tokens_as_the_naive_loop(seed, B, T, stop, name):
    m = tiny_model("tiny-llama", seed=seed % 3)
    prompt = course.random_tokens(seed, B, T)
    n = 8
    with torch.no_grad():
        free_run = impl.decode_with_syncs(m, make_cache(m, name, B), prompt, n, -1)  # eos -1: never stops
    eos = int(free_run[0, stop])  # sequence 0 stops at its token `stop` (or before, if it came earlier)
    naive, yours = both(m, prompt, name, n, eos)
    assert isinstance(yours, torch.Tensor) and yours.shape == (B, n) and yours.dtype == torch.long, (
        f"decode_without_syncs returns (B, n) = {(B, n)} long: all n steps, whatever happened; got "
        f"{getattr(yours, 'dtype', type(yours))} {tuple(getattr(yours, 'shape', ()))}")
    k = naive.shape[1]
    want = torch.cat([naive, torch.full((B, n - k), eos)], dim=1)
    assert torch.equal(yours, want), (
        f"{name}, eos {eos}: the naive loop gives {naive.tolist()} (it stops when every sequence has emitted eos), so "
        f"yours must be {want.tolist()} (the same, then eos to the end); got {yours.tolist()}")


def test_batch_of_one_is_what_generate_py_generates():
    m = tiny_model("tiny-llama", seed=1)
    prompt = course.random_tokens(3, 1, 10)
    with torch.no_grad():
        ref, _ = generate.generate(m, prompt, make_cache(m, "a2sf", 1), 10)
        eos = int(ref[0, 4])
        ref, _ = generate.generate(m, prompt, make_cache(m, "a2sf", 1), 10, eos_id=eos)  # stops at eos, host-side
        yours = impl.decode_without_syncs(m, make_cache(m, "a2sf", 1), prompt, 10, eos)
    k = ref.shape[1]
    assert torch.equal(yours[:, :k], ref) and (yours[:, k:] == eos).all(), (
        f"generate.generate gives {ref.tolist()} and stops at eos {eos} (which it does not return), so yours must be "
        f"those tokens, then eos to the end; got {yours.tolist()}")


def test_no_host_sync_while_decoding():
    m = tiny_model("tiny-llama")
    prompt = course.random_tokens(0, 2, 6)
    with torch.no_grad(), course.HostSyncs() as naive:
        impl.decode_with_syncs(m, make_cache(m, "a2sf", 2), prompt, 6, 5)
        cache = make_cache(m, "a2sf", 2)
    with torch.no_grad(), course.HostSyncs() as yours:
        impl.decode_without_syncs(m, cache, prompt, 6, 5)
    assert not yours.ops, (
        f"decode_without_syncs asked the device for values {len(yours.ops)} times ({', '.join(sorted(set(yours.ops)))}) in 6 "
        f"steps (the naive loop: {len(naive.ops)}). On a GPU each one stalls the host until the device catches up, "
        "and a CUDA graph cannot contain it. Keep `done` and the tokens as tensors, use torch.where, no Python `if` on them.")


BANNED_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "masked_select"}
BANNED_CALLS = {"int", "float", "bool", "print"}


def test_no_host_sync_in_the_source():
    fn = inspect.unwrap(impl.module.decode_without_syncs)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in BANNED_METHODS:
                found.append(f"line {node.lineno}: .{f.attr}()")
            elif isinstance(f, ast.Name) and f.id in BANNED_CALLS:
                found.append(f"line {node.lineno}: {f.id}(...)")
            elif isinstance(f, ast.Attribute) and f.attr == "tensor" and ast.unparse(f.value) == "torch":
                found.append(f"line {node.lineno}: torch.tensor(...) of Python values (a host-to-device copy per call)")
            elif isinstance(f, ast.Name) and f.id == "decode_with_syncs":
                found.append(f"line {node.lineno}: it calls decode_with_syncs")
    if found:
        pytest.fail("decode_without_syncs (lines counted from its `def`) still has host syncs:\n    " + "\n    ".join(found)
                    + "\nEach makes the host wait for (or copy to) the device at every step; see the README.", pytrace=False)
