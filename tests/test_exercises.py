"""The course (exercises/): every exercise's checker passes on its reference solution and fails,
with messages that teach, on the untouched stub; stubs and solutions offer the same functions.

Each side runs once, as `EXERCISE_IMPL=... python -m pytest exercises` in a subprocess (the
checkers load the default model once per process); the heavy real-model checks are marked slow
and run here with -m slow."""

import ast
import os
import re
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted(p.name for p in (ROOT / "exercises").glob("[0-9][0-9]_*") if p.is_dir())


def run_checkers(impl: str, folder: Path, marks: str = "not slow and not gpu") -> dict:
    """{exercise: {"passed": n, "failed": [(test, message)]}} from one pytest run over exercises/."""
    xml = folder / f"{impl}.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "exercises", "-m", marks, "-p", "no:cacheprovider", "-q",
                           f"--junitxml={xml}"], cwd=ROOT, env={**os.environ, "EXERCISE_IMPL": impl},
                          capture_output=True, text=True, timeout=900)
    assert xml.exists(), f"pytest did not run the checkers:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = {name: {"passed": 0, "failed": [], "skipped": 0, "chained": []} for name in EXERCISES}
    for case in ET.parse(xml).getroot().iter("testcase"):
        found = re.search(r"(\d\d_[a-z0-9_]+)", case.get("classname", "") + "." + case.get("name", ""))
        assert found and found[1] in out, f"a test outside the exercises: {case.attrib}"
        result = out[found[1]]
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            result["failed"].append((case.get("name"), bad.get("message", "")))
            if "During handling of the above exception" in (bad.text or ""):  # the report as pytest prints it
                result["chained"].append(case.get("name"))
        elif case.find("skipped") is not None:
            result["skipped"] += 1
        else:
            result["passed"] += 1
    out["_output"] = proc.stdout[-4000:]
    return out


@pytest.fixture(scope="module")
def solution_run(tmp_path_factory):
    return run_checkers("solution", tmp_path_factory.mktemp("solution"))


@pytest.fixture(scope="module")
def stub_run(tmp_path_factory):
    return run_checkers("student", tmp_path_factory.mktemp("student"))


def test_there_are_six_to_eight_exercises_and_testpaths_leave_them_out():
    assert 6 <= len(EXERCISES) <= 8, EXERCISES
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"], "plain `pytest` must not collect the stubs"


@pytest.mark.parametrize("name", EXERCISES)
def test_each_exercise_has_its_files(name):
    folder = ROOT / "exercises" / name
    for f in ("README.md", "student.py", "test_check.py", "experiment.py"):
        assert (folder / f).exists(), f"{name}/{f} is missing"
    assert (ROOT / "exercises" / "solutions" / f"{name}.py").exists()
    assert f"pytest exercises/{name}" in (folder / "README.md").read_text(), "the README says how to check"


def public_api(path: Path) -> dict:
    """{name: argument names} of the module's top-level functions and classes' methods."""
    api = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if isinstance(node, ast.FunctionDef):
                api[node.name] = [a.arg for a in node.args.args]
            else:
                api[node.name] = {m.name: [a.arg for a in m.args.args] for m in node.body if isinstance(m, ast.FunctionDef)}
    return api


@pytest.mark.parametrize("name", EXERCISES)
def test_stub_and_solution_offer_the_same_functions(name):
    stub = public_api(ROOT / "exercises" / name / "student.py")
    solution = public_api(ROOT / "exercises" / "solutions" / f"{name}.py")
    assert stub == solution


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_passes_on_the_solution(solution_run, name):
    r = solution_run[name]
    assert not r["failed"] and r["passed"] > 0, f"{name}: {r}\n{solution_run['_output']}"


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_fails_on_the_stub_and_says_why(stub_run, name):
    r = stub_run[name]
    assert r["failed"], f"{name}: the untouched stub passes every check ({r['passed']} tests)"
    raw = [(test, msg) for test, msg in r["failed"] if msg.lstrip().startswith("NotImplementedError")]
    assert not raw, f"{name}: failures that are a bare NotImplementedError, not a message: {raw}"
    assert not r["chained"], (f"{name}: the teaching message comes after a chained exception dump in {r['chained']}: "
                              "raise it `from None` (course.teach)")


@pytest.mark.slow
def test_heavy_checks_pass_on_the_solutions(tmp_path):
    r = run_checkers("solution", tmp_path, marks="slow")
    failed = {name: r[name]["failed"] for name in EXERCISES if r[name]["failed"]}
    assert not failed, f"{failed}\n{r['_output']}"
