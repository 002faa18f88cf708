"""Settings for the exercise checkers (`pytest exercises/NN_name`).

One intra-op thread, as in tests/conftest.py (many tiny ops on a small machine). The repository
root goes on sys.path so that `import model` and `from exercises import course` work however
pytest is started. The checkers all share the basename test_check.py, so they are imported by
path (import mode `importlib`), which lets `pytest exercises` run every checker in one session.
"""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, settings

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

torch.set_num_threads(1)
# no deadline: the first call of a torch op can take a while; the examples per test are set in each checker
# and no "explain" phase (extra runs of every failing example: a stub fails on purpose)
settings.register_profile("exercises", deadline=None, max_examples=25,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
settings.load_profile("exercises")


def pytest_configure(config):
    config.option.importmode = "importlib"
    if config.option.tbstyle == "auto":  # the checkers' messages say what is wrong: short tracebacks
        config.option.tbstyle = "short"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    """Hypothesis would write a patch file under .hypothesis/patches for every failing example
    (and import libcst to do it): a stub fails on purpose, so skip that."""
    item.__dict__.pop("_hypothesis_failing_examples", None)
