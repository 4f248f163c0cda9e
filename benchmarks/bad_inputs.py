"""Runs the bad-input matrix of ``benchmarks/chaos.py --bad-inputs`` (the cases:
:mod:`benchmarks.bad_input_cases`): every tool and the trainer, run as a user runs them, on
damaged or wrong input.

Cases run in one process (each tool's ``main(argv)``, the trainer's ``cli.main``; stdout, stderr
and log records captured, an exception escaping ``main`` counted as a traceback), or with
``subprocess=True`` each in a process of its own, as a user runs them (slower: every case then
imports torch and megatron again).

Each case must end with exactly one ``error: ...`` line (the trainer: one per rank, here one
rank) that contains the damaged file or the bad value, a non-zero exit status, no ``Traceback``
and nothing left behind: the output does not exist, no staging folder or partial file remains
beside it, and a folder given as input holds the same names as before. Anything else is
reported per case: ``accepted`` (exit 0 on bad input), ``traceback``, ``lines`` (not exactly one
error line), ``unnamed`` (the line lacks the file or value) or ``leftover``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, List

from benchmarks.bad_input_cases import REPO, SCRIPTS, Case


def _tool_main(tool: str) -> Callable[[List[str]], int]:
    if tool == "trainer":
        from megatron_patch.training import cli

        return cli.main
    import importlib.util

    name = f"bad_inputs_{tool}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS[tool])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].main


def _in_process(case: Case) -> tuple:
    """(exit status, captured output) of the tool's ``main`` in this process."""
    import contextlib
    import io
    import logging
    import traceback

    buffer = io.StringIO()
    streams = [(h, h.stream) for h in logging.root.handlers if isinstance(h, logging.StreamHandler)]
    for handler, _ in streams:
        handler.setStream(buffer)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                code = _tool_main(case.tool)(list(case.argv))
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:  # an exception that escaped main: what a user would see as a traceback
                traceback.print_exc()
                code = 1
    finally:
        for handler, stream in streams:
            handler.setStream(stream)
    return code, buffer.getvalue()


def run_case(case: Case, subprocess_mode: bool = False, timeout: float = 600) -> dict:
    before = {folder: sorted(os.listdir(folder)) for folder in case.watched if os.path.isdir(folder)}
    if subprocess_mode:
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
        try:
            done = subprocess.run(
                [sys.executable, SCRIPTS[case.tool], *case.argv],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            code, text = None, f"timed out after {timeout} s: {(error.stderr or '')[-500:]}"
    else:
        code, text = _in_process(case)
    errors = [line for line in text.splitlines() if line.startswith("error: ") or "] error: " in line]
    problems = []
    if code == 0:
        problems.append("accepted")
    elif code is None:
        problems.append("timeout")
    if "Traceback" in text:
        problems.append("traceback")
    if code != 0 and len(errors) != 1:
        problems.append(f"lines ({len(errors)})")
    if errors and not all(name in errors[0] for name in case.names):
        problems.append("unnamed")
    left = [path for path in case.outputs if os.path.exists(path)]
    for folder, names in before.items():
        now = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        left += [os.path.join(folder, n) for n in now if n not in names]
    if left:
        problems.append(
            "leftover "
            + ", ".join(os.path.relpath(p, os.path.dirname(case.outputs[0] if case.outputs else left[0])) for p in left)
        )
    return {
        "case": case.name,
        "tool": case.tool,
        "exit": code,
        "line": errors[0] if errors else text.strip()[-300:],
        "problems": problems,
        "ok": not problems,
    }


def run_matrix(
    work: str, prefix: str, tokenizer: str, root: str, final: str, subprocess_mode: bool = False
) -> List[dict]:
    """Build the cases in ``work`` (``bad_input_cases.build_cases``: a good corpus ``prefix`` and its
    ``tokenizer`` model, a finished run's ``root`` and its ``final`` checkpoint), run each, print one
    row per case and a summary line; returns :func:`run_case`'s results."""
    from benchmarks.bad_input_cases import build_cases

    cases = build_cases(work, prefix, tokenizer, root, final)
    print(f"bad-input matrix: {len(cases)} cases")
    print("case                          tool                exit  result  error line")
    results = []
    for case in cases:
        result = run_case(case, subprocess_mode=subprocess_mode)
        results.append(result)
        print(
            f"{case.name:28s}  {case.tool:18s}  {str(result['exit']):>4s}  "
            f"{'ok' if result['ok'] else ','.join(result['problems']):6s}  {result['line'][:160]}",
            flush=True,
        )
    ok = sum(r["ok"] for r in results)
    counts = {
        kind: sum(any(p.startswith(kind) for p in r["problems"]) for r in results)
        for kind in ("accepted", "traceback", "lines", "unnamed", "leftover", "timeout")
    }
    print(
        f"bad inputs: {ok}/{len(results)} one-line errors naming the input with nothing left behind; "
        + ", ".join(f"{kind} {count}" for kind, count in counts.items())
    )
    return results
