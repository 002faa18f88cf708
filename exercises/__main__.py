"""Run an exercise's experiment: `python -m exercises 05` (your student.py), or
`python -m exercises 05 --solution` (the reference). It prints the numbers the exercise's
README.md tells you to expect and writes any plot under results/exercises/."""

import argparse
import os
import sys

import torch

from exercises import course


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m exercises", description=__doc__.splitlines()[0])
    p.add_argument("exercise", help="its number (05) or folder name (05_streaming_ppl)")
    p.add_argument("--solution", action="store_true", help="run the reference solution instead of your student.py")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.solution:
        os.environ["EXERCISE_IMPL"] = "solution"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder = course.exercise_dir(args.exercise)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    impl = course.which()
    module = course.load_module(course.module_path(folder, impl), f"exercise_{folder.name}_{impl}")
    experiment = course.load_module(folder / "experiment.py", f"exercise_{folder.name}_experiment")
    print(f"[{folder.name}: {'reference solution' if impl == 'solution' else 'your student.py'}]")
    try:
        experiment.main(module)
    except NotImplementedError as e:
        print(f"not written yet: {e}. Fill in {course.module_path(folder, impl)} first.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
