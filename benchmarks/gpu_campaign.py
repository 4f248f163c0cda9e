"""The GPU campaign of issue 16: one entry point that turns a short GPU window into the speed and
cost figures, part by part, each part's JSON and log written as it goes.

Usage (benchmarks/README.md, "Issue 16: the GPU campaign", has the device commands and what each
part runs)::

    python benchmarks/gpu_campaign.py --prepare --corpus train.jsonl.xz --data-dir .campaign   # once, on CPU
    python3 benchmarks/gpu_campaign.py --parts tests,throughput,cost,activations --data-dir .campaign \
        --out OUT --deadline-s 560                             # GPU: the one main device call
    python3 benchmarks/gpu_campaign.py --parts throughput --throughput-runs rope,ce,adam --out OUT \
        --deadline-s N                                         # optional second call: what did not finish
    python benchmarks/gpu_campaign.py ... --cpu            # rehearsal: tiny preset, CPU mode, few steps

Parts, in this order: ``tests`` (``pytest -m gpu`` over the files that hold GPU tests),
``throughput`` (``throughput.py``: the five MFU levers together at 8 micro-batches per step, none
and all five at one, then each alone), ``cost`` (the trainer, ``--stage both`` against token-only
on the same tokens of the prepared corpus, with the levers; without them if the two-stage run with
them exits with an error) and ``activations`` (``throughput.py --measure-layer-activations``).
Every run is a subprocess given the time its part has left and stopped there (the first,
``cudnn``, a canary, at most 90 s x ``--time-scale``, then counted as a failed lever): a part's
``--<part>-budget-s`` is reserved for it (the defaults add up to the main call's deadline, 560 s,
less 10 s for the summary), and within ``--deadline-s`` it may also use what earlier parts left.
OUT receives ``summary.md``, per part ``<part>.json``, rewritten under temporary names after every
run, and ``campaign.log``, every run's output (6 files: the device returns at most 8), so a
campaign stopped at its time limit leaves what finished; the summary follows its run list with
the flags that rerun what did not finish.
``--unpack DIR`` writes each run's own ``throughput.py`` JSON from those files (for
``memory_plan.py --measured``).

Optional parts, not run by this script (one device call each, when a window has time left;
benchmarks/README.md has the commands): ``multi-epoch``, the multi-epoch recipe's three arms
(``examples/reproduce_small.py --epochs 4``: token-only, patch λ=1/2 over the epochs, and the
control that trains only the last half of the epochs at token level), 3 seeds.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and the campaign_*.py beside this file

from campaign_carry import carry_lines  # noqa: E402
from campaign_corpus import prepare_corpus  # noqa: E402
from campaign_options import cost_plan, parse_options  # noqa: E402
from campaign_parts import PART_RUNNERS  # noqa: E402
from campaign_runner import REPO_ROOT, Campaign, Stopped  # noqa: E402
from common import write_json  # noqa: E402

from megatron_patch.runtime.command import run_main  # noqa: E402


def unpack(out: Path, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for part, prefix in (("throughput", "throughput"), ("activations", "acts")):
        path = out / f"{part}.json"
        for run in json.loads(path.read_text())["runs"] if path.exists() else []:
            if run.get("payload"):
                write_json(str(folder / f"{prefix}_{run['name']}.json"), run["payload"])
                print(folder / f"{prefix}_{run['name']}.json")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: _campaign(argv))


def _campaign(argv: List[str]) -> int:
    opts = parse_options(argv)
    if opts.prepare:
        prepare_corpus(
            Path(opts.corpus), Path(opts.data_dir), opts.vocab_size, cost_plan(opts), opts.cpu, argv, REPO_ROOT
        )
        lines = carry_lines(REPO_ROOT, Path(opts.data_dir), opts.cpu)
        for line in lines:
            print(line, file=sys.stderr if line.startswith("error") else sys.stdout, flush=True)
        return 1 if any(line.startswith("error") for line in lines) else 0
    if opts.unpack:
        return unpack(Path(opts.out), Path(opts.unpack))
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="gpu_campaign-"))
    work.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, on_sigterm)
    campaign = Campaign(opts, argv, work)
    try:
        for name in opts.parts:
            try:
                PART_RUNNERS[name](campaign)
            except (OSError, ValueError, KeyError, TypeError) as error:  # a bug here must not cost the next part
                campaign.state["parts"].setdefault(name, {"part": name, "runs": []})["error"] = repr(error)
                print(f"[{name}] error: {error!r}", flush=True)
            campaign.save()
            print(f"[{name}] done; {campaign.out / 'summary.md'} updated", flush=True)
    except Stopped:
        print("stopped by SIGTERM: writing what finished", flush=True)
    finally:
        campaign.save()
        if not opts.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + (campaign.out / "summary.md").read_text())
    parts = campaign.state["parts"].values()
    runs = [run for part in parts for run in part["runs"]]
    ok = runs and not any("error" in part for part in parts) and all(run["status"] == "ok" for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
