"""Many invocations of one launcher in one process: a fresh Python + JAX import is most of what a bad-input
case costs, so tests/test_cli_errors.py runs each group of cases through this instead of one process each.

  python -m tests.launcher_cases SCRIPT CASES_JSON OUT_JSON

CASES_JSON: [{"args": [...], "cwd": dir, "stdin": text (optional)}, ...]. Each case runs the launcher's own
entry point (`omni_jax.cli.run(main)`, exit-code contract included) with its flags reset to their defaults, in its own
working directory, with stdout and stderr captured; OUT_JSON gets [{"returncode", "stdout", "stderr"}, ...].
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys


def run_cases(script: str, cases: list[dict], work_dir: str, devices: int | None = None) -> list[dict]:
    """Run `cases` ([{"args", "cwd", optional "stdin"}]) through `script` in one subprocess; [{"returncode", "stdout", "stderr"}]."""
    from tests import procs

    cases_path, out_path = os.path.join(work_dir, "cases.json"), os.path.join(work_dir, "results.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.launcher_cases", script, cases_path, out_path], cwd=root,
                          capture_output=True, text=True, env=procs.env(devices), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_path) as f:
        results = json.load(f)
    assert len(results) == len(cases), (len(results), len(cases))
    return results


def main(script: str, cases_path: str, out_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    launcher = runpy.run_path(script, run_name="launcher_under_test")  # defines its flags once
    from absl import flags

    from omni_jax import cli

    results = []
    for case in cases:
        flags.FLAGS.unparse_flags()
        os.chdir(case["cwd"])
        sys.argv = [script, *case["args"]]
        out, err = io.StringIO(), io.StringIO()
        code = 0
        sys.stdin = io.StringIO(case.get("stdin", ""))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(launcher["main"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m tests.launcher_cases SCRIPT CASES_JSON OUT_JSON")
    main(*sys.argv[1:])
