"""Benchmarks of every pipeline stage: throughput and peak memory, each row measured in a fresh process.

    make bench                                         # = python -m tools.bench --all
    python -m tools.bench --all                        # tiny configs on the CPU, plus paper configs on a GPU
    python -m tools.bench --config tiny                # every stage at tiny sizes on the CPU (seconds)
    python -m tools.bench --config paper --stage cam random_walk --device cuda
    python -m tools.bench --config semformer-paper --amp bf16 --grad_checkpointing   # <stage>-<size>
    python -m tools.bench --stage evaluation --jobs 2 --out /tmp/bench

Stages (``--stage``; all by default) and what one timed call does:

- ``caae``, ``semformer``, ``affinitynet``, ``deeplab``: a training step of the script's own model builder
  and ``train_step`` with the optimiser of its flags (forward, backward, optimiser step) on a random batch
  with random weights (no download): iterations/s and images/s.
- ``cam``: ``core.cam.multiscale_cams`` of one photo with ``inference_semformer.py``'s segmentor, scales and
  class-relevant attention: images/s.
- ``affinity_label``: ``tools.scoring.labels.affinity_label`` of one photo with ``make_affinity_labels.py``'s
  thresholds and CRF (two 10-iteration label CRFs): images/s.
- ``random_walk``: ``core.random_walk.random_walk`` of 2 CAM channels with ``inference_rw.py``'s radius, beta
  and length on the inputs' device: seconds per image.
- ``pseudo_label``: ``tools.scoring.labels.scores_to_label`` with ``make_pseudo_labels.py``'s threshold and a
  1-iteration CRF: images/s.
- ``evaluation``: ``tools.scoring.evaluation.evaluate`` of a temporary folder of random ``.npz`` predictions
  (1-3 classes) and GT PNGs, ``evaluate.py``'s 31 thresholds with erosion, on one job and on all cores.

The stages are built from the stage scripts (``tools/benchmark/stages.py``), so a change to a script's
model, step or defaults is what the benchmark measures.

Sizes (``--config``): ``tiny`` takes seconds on a CPU; ``paper`` is each script's defaults (DeiT-S 448 px
SemFormer with a frozen DeiT-B CAAE, DeiT-B CAAE 224 px batch 64, ResNet-50 AffinityNet 512 px batch 32
with radius-10 pairs on its 128x128 grid, DeepLabV2-ResNet-101 321 px batch 10) on VOC-sized 500x375
photos and their 125x94 walk grid; hours on a CPU. The old single-stage names (``caae-tiny``, ``semformer-paper``,
``deeplabv2-paper``...) pick one training stage. Torch stages run on ``--device`` (default: the CPU for
tiny, the GPU if there is one for paper); the CRF and evaluation stages always run on the CPU. ``--all``
runs tiny on the CPU, and paper on the GPU where one is present. ``--amp`` defaults to bf16 autocast for
training on a GPU (fp16 where bf16 is missing), fp32 and bf16 for CAMs on a GPU, fp32 on the CPU.

Inputs are smooth random fields (``tools/benchmark/inputs.py``). The first ``--warmup`` calls are untimed; a
row's throughput comes from the mean of ``--steps`` timed calls (with ``--repeat N``, of the fastest of N
processes: on a shared machine compare minima, and note the load). Each row runs in a fresh process
(``tools/benchmark/measure.py``, which says how peak memory is counted).

Writes ``<out>/bench.json`` (a header: devices, package versions, torch threads, cores, load averages,
git commit; one entry per row) and ``<out>/bench.md`` (the same as a Markdown table, also printed). A row
that fails keeps its error as a note; the run then exits with status 1 once both files are written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import torch

from tools.artifacts.files import atomic_write_text
from tools.artifacts.provenance import git_state, package_versions
from tools.benchmark.measure import Job, fork_server, measure_in_new_process
from tools.benchmark.stages import CONFIGS, SIZES, STAGES, Stage
from tools.cli.arguments import StageArgumentParser, non_negative_int, positive_int
from tools.cli.exits import CommandFailed, run_main
from tools.scoring.parallel import default_jobs
from tools.training.distributed import parse_device
from tools.training.precision import AMP_CHOICES, resolve_amp

DEFAULT_OUT = Path("experiments/bench")
JSON_NAME, MARKDOWN_NAME = "bench.json", "bench.md"
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The single-stage names of the first version of this script: <training stage>-<size>.
ALIASES = {f"{stage}-{size}": (stage, size) for stage, spec in STAGES.items() if spec.training for size in SIZES}
ALIASES["deeplabv2-paper"] = ("deeplab", "paper")


def run_job(job: Job, context: BaseContext) -> dict[str, Any]:
    """The row of ``job``: the fastest of its repeats and their largest peak; a failure becomes its note."""
    stage = STAGES[job.stage]
    bench = job.bench
    row = {"stage": job.stage, "config": job.config, "device": job.device, "amp": job.amp, "jobs": job.jobs,
           "script_flags": " ".join(job.script_flags) or None,
           "batch": job.batch_size if stage.training else bench.batch,
           "size": stage.size_format.format(*bench.size) if bench.size else None, "steps": bench.steps,
           "warmup": bench.warmup, "repeats": job.repeats, "unit": stage.unit, "throughput": None,
           "seconds_per_call": None, "seconds_per_call_each": None, "peak_memory_mib": None,
           "memory": "CUDA allocator peak" if job.device.startswith("cuda") else "peak RSS growth", "note": None}
    start = time.perf_counter()
    try:
        runs = [measure_in_new_process(job, context) for _ in range(job.repeats)]
    except BrokenProcessPool:
        row["note"] = "the process died (killed, e.g. out of memory)"
        runs = []
    except Exception as error:  # the stage's own failure, e.g. CUDA out of memory: keep the other rows
        row["note"] = one_line(error)
        runs = []
    row["wall_seconds"] = time.perf_counter() - start
    if runs:
        seconds = min(run.seconds for run in runs)
        row.update(batch=runs[0].batch, size=stage.size_format.format(*runs[0].size),
                   throughput=throughput(stage.unit, runs[0].batch, seconds), seconds_per_call=seconds,
                   seconds_per_call_each=[run.seconds for run in runs],
                   peak_memory_mib=max(run.peak_mib for run in runs))
        if stage.training:
            row["iterations_per_s"] = 1.0 / seconds
    return row


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def throughput(unit: str, batch: int, seconds: float) -> float:
    """A call of ``seconds`` over ``batch`` items in ``unit``."""
    if unit == "images/s":
        return batch / seconds
    if unit == "s/image":
        return seconds / batch
    return seconds


# ----------------------------------------------------------------------------- the plan
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true",
                        help="tiny configs on the CPU, plus paper configs on the GPU if there is one")
    parser.add_argument("--config", choices=(*SIZES, *ALIASES), default=None, metavar="CONFIG",
                        help="tiny (default) or paper for every stage, or <training stage>-<size> for one: "
                             + ", ".join(ALIASES))
    parser.add_argument("--stage", nargs="+", choices=list(STAGES), default=None, metavar="STAGE",
                        help="one or more of " + ", ".join(STAGES) + " (default: all)")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="of the torch stages (default: the CPU for tiny, the GPU if any for paper)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="autocast of the training and CAM stages (default: see above)")
    parser.add_argument("--grad_checkpointing", action="store_true", help="of the ViT training stages")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed calls (default: the config's)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="untimed calls before them (default: the config's)")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="of the training stages")
    parser.add_argument("--script_flags", type=shlex.split, default=(), metavar="'FLAGS'",
                        help="more flags of the training and CAM stages' scripts, e.g. '--backbone "
                             "vit_small_patch14_reg4_dinov2' (SemFormer) or '--ae_backbone ...'")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="evaluation processes (default: a row with 1 and one with every core)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads of every row")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="fresh processes per row; the fastest counts (compare minima on a shared machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {JSON_NAME} and {MARKDOWN_NAME}")
    parser.add_check(lambda args: "--all picks its configs and devices: drop --config and --device"
                     if args.all and (args.config or args.device) else None)
    parser.add_check(lambda args: f"--config {args.config} is a single stage: drop --stage"
                     if args.config in ALIASES and args.stage else None)
    return parser.parse_args(argv)


def targets(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """``(stage, size, device of the torch stages)`` of every (stage, size) to time."""
    gpu = torch.cuda.is_available()
    if args.all:
        stages = args.stage or list(STAGES)
        sizes = [("tiny", "cpu")] + ([("paper", "cuda")] if gpu else [])
        return [(stage, size, device) for size, device in sizes for stage in stages]
    if args.config in ALIASES:
        stage, size = ALIASES[args.config]
        stages = [stage]
    else:
        stages, size = args.stage or list(STAGES), args.config or "tiny"
    device = args.device or ("cuda" if gpu and size == "paper" else "cpu")
    return [(stage, size, device) for stage in stages]


def amp_settings(stage: Stage, args: argparse.Namespace, device: torch.device) -> list[str | None]:
    """The resolved autocast names a stage runs with on ``device`` (None: the stage has no autocast)."""
    if not stage.amp:
        return [None]
    requested = [args.amp] if args.amp else list(stage.amp) if device.type == "cuda" else ["off"]
    return list(dict.fromkeys(AMP_NAMES[resolve_amp(amp, device)] for amp in requested))


def plan(args: argparse.Namespace) -> list[Job]:
    """Every row to measure, in order."""
    jobs = []
    for stage_name, size, torch_device in targets(args):
        stage = STAGES[stage_name]
        bench = CONFIGS[stage_name][size]
        overrides = {"steps": args.steps, "warmup": args.warmup}
        bench = dataclasses.replace(bench, **{name: value for name, value in overrides.items() if value is not None})
        device = torch_device if stage.on_device else "cpu"
        job_counts = [args.jobs] if args.jobs else list(dict.fromkeys((1, default_jobs())))
        for amp in amp_settings(stage, args, torch.device(device)):
            for count in job_counts if stage_name == "evaluation" else [None]:
                jobs.append(Job(stage_name, size, bench, device, amp, count, args.threads, args.grad_checkpointing,
                                args.batch_size if stage.training else None, args.repeat, tuple(args.script_flags)))
    return jobs


# ----------------------------------------------------------------------------- reporting
def cpu_name() -> str:
    """The CPU model of ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Where and with what the rows are measured."""
    return {
        "command": " ".join(["python -m tools.bench", *argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": package_versions(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": default_jobs(),
        "load_average_before": list(os.getloadavg()),
        "git": git_state(),
    }


def number(value: float | None) -> str:
    """Three significant digits (whole numbers from 1000 up); ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def table_row(row: dict[str, Any]) -> str:
    """One Markdown table line of a row."""
    rate = "-" if row["throughput"] is None else f"{number(row['throughput'])} {row['unit']}"
    if row.get("iterations_per_s") is not None:
        rate += f" ({number(row['iterations_per_s'])} it/s)"
    cells = [row["stage"], row["config"], row["device"], row["amp"] or "-", row["jobs"] or "-", row["batch"],
             row["size"], rate, number(row["seconds_per_call"]), number(row["peak_memory_mib"]),
             "; ".join(filter(None, (row.get("script_flags"), row["note"])))]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def loads(averages: list[float]) -> str:
    return " / ".join(f"{average:.2f}" for average in averages)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the setting, the table and the notes."""
    git = report["git"] or {}
    lines = [
        f"# `{report['command']}` ({report['created']})", "",
        f"- CPU: {report['cpu']} ({report['usable_cpus']} of {report['cpu_count']} cores usable, "
        f"{report['torch_threads']} torch threads); GPU: {report['gpu'] or 'none'}",
        "- " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()),
        f"- load average (1, 5, 15 min) before {loads(report['load_average_before'])}, "
        f"after {loads(report['load_average_after'])}",
        f"- git {git.get('commit', 'unknown')}{' (with local changes)' if git.get('dirty') else ''}; "
        f"{report['wall_seconds']:.0f} s for the rows",
        "- memory: CUDA allocator peak on a GPU, growth of the peak resident set size on the CPU", "",
        "| stage | config | device | amp | jobs | batch | size | throughput | s/call | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(table_row(row) for row in report["rows"]),
    ]
    lines += ["", *(f"Note: {note}" for note in report["notes"])] if report["notes"] else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    report = header(args, argv)
    notes = []
    if args.all and not torch.cuda.is_available():
        notes.append("no GPU here: the paper configs were skipped (`--config paper` times them on the CPU)")
    context = fork_server()
    rows = []
    for job in plan(args):
        rows.append(run_job(job, context))
        print(table_row(rows[-1]), flush=True)
    report.update(load_average_after=list(os.getloadavg()), wall_seconds=time.perf_counter() - start,
                  notes=notes, rows=rows)
    atomic_write_text(args.out / JSON_NAME, json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(args.out / MARKDOWN_NAME, text)
    print(f"\n{text}\nwritten: {args.out / JSON_NAME}, {args.out / MARKDOWN_NAME}")
    failed = [row for row in rows if row["note"]]
    if failed:
        raise CommandFailed(f"{len(failed)} of {len(rows)} rows failed (see their notes)")


if __name__ == "__main__":
    run_main(main)
