"""Images per second of ``annotate.py`` and ``anonymize.py`` on one process and on several (``trainer=ddp``), as a
user runs them, on one fixed set of miniature-world scenes.

    python bench/batch_jobs.py --images 32 --out bench/results/<date>_cpu_batch_jobs_tiny_64.json   # 2 CPU cores
    python bench/batch_jobs.py --accelerator gpu --processes 1 8 --model base --faces buffalo_l ... # a GPU node

Each run is a fresh ``python annotate.py`` / ``python anonymize.py`` into a new output (nothing to resume). Its
images per second are the job's own (``seconds`` of its summary: every process ready to every process done;
interpreter start, model loading and process launch are left out, and reported apart as ``wall_s``). Anonymization
reads the one-process run's person records (``persons=``), so it times anonymization alone. On the CPU each of
``n`` processes computes on ``cores / n`` threads (Lightning's setting; one process: torch's default, every core),
so the ratio shows what splitting the inputs between processes gains over one process using every core;
``--threads N`` fixes every process's threads instead (``OMP_NUM_THREADS``). Each row records the load average
before it: on a shared machine, threads waiting for a busy core slow the run down, so each configuration runs
``--rounds`` times, interleaved, and the ratios use the fastest round of each. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, not an installed one
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from camouflage_train.data.schema import AttributeSchema  # noqa: E402
from camouflage_train.data.synthetic import draw_scene  # noqa: E402
from camouflage_train.miniworld.scenes import FACE_ATTRIBUTES  # noqa: E402


def scenes(folder: Path, count: int, size: int) -> None:
    """``count`` synthetic multi-person scenes (seeds 0 ..), ``size`` pixels square: the same set on every run."""
    schema = AttributeSchema.from_config({**FACE_ATTRIBUTES, "max_persons": 3})
    folder.mkdir(parents=True)
    for seed in range(count):
        draw_scene(seed, schema, size)[0].save(folder / f"{seed:05d}.png")


def trainer_overrides(processes: int, accelerator: str) -> list[str]:
    """One process, or ``processes`` of them with DDP (gloo on the CPU, NCCL on GPUs)."""
    if processes == 1:
        return [f"trainer.accelerator={accelerator}"]
    return ["trainer=ddp", f"trainer.accelerator={accelerator}", f"trainer.devices={processes}"]


def run(script: str, arguments: list[str], summary: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run an entry point in a fresh interpreter; its summary, wall time and the load average before it."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as handle:
        command = [sys.executable, str(REPO / script), *arguments]
        done = subprocess.run(command, stdout=handle, stderr=handle, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return {"summary": json.loads(summary.read_text()), "wall_s": round(wall, 2), "load_before": round(load, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="scenes in the fixed set")
    parser.add_argument("--resolution", type=int, default=64, help="scene size and anonymize.py's resolution")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (the first: 1)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--model", default="base_tiny", help="anonymize.py's model= (a configs/anonymize/model file)")
    parser.add_argument("--faces", default="mini", help="the face pack (faces=)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch, per process")
    parser.add_argument("--threads", type=int, default=None, help="threads of every process (default: as above)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each (job, processes), interleaved; best kept")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    if args.processes[0] != 1:
        parser.error("--processes starts with 1: the other counts are compared with it")

    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    rows: list[dict[str, Any]] = []

    def record(job: str, processes: int, round_: int, images: int, done: dict[str, Any]) -> None:
        seconds = done["summary"]["seconds"]
        rows.append(
            {"job": job, "processes": processes, "round": round_, "images": images, "job_s": round(seconds, 3),
             "images_per_s": round(images / seconds, 2), "wall_s": done["wall_s"], "load_before": done["load_before"]}
        )  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="batch-jobs-") as tmp:
        root = Path(tmp)
        scenes(root / "images", args.images, args.resolution)
        common = [f"faces={args.faces}", "bodies=none", f"batch_size={args.batch_size}", "num_workers=0"]
        for round_, processes in ((r, n) for r in range(args.rounds) for n in args.processes):  # interleaved
            sidecar = root / f"persons_{processes}_{round_}.jsonl"
            done = run(
                "annotate.py",
                [f"input.folder={root / 'images'}", f"output={sidecar}", *common,
                 *trainer_overrides(processes, args.accelerator), f"hydra.run.dir={root / f'annotate_{sidecar.stem}'}"],
                sidecar.with_suffix(".summary.json"),
                root / f"annotate_{sidecar.stem}.log",
                env,
            )  # fmt: skip
            record("annotate", processes, round_, done["summary"]["images"], done)
        persons = root / "persons_1_0.jsonl"
        for round_, processes in ((r, n) for r in range(args.rounds) for n in args.processes):
            out = root / f"anonymized_{processes}_{round_}"
            done = run(
                "anonymize.py",
                [f"model={args.model}", f"input.folder={root / 'images'}", f"persons={persons}", f"output={out}",
                 f"resolution={args.resolution}", *common, *trainer_overrides(processes, args.accelerator),
                 f"hydra.run.dir={root / f'run_{out.name}'}"],
                out / "summary.json",
                root / f"{out.name}.log",
                env,
            )  # fmt: skip
            summary = done["summary"]
            images = summary["done"] + summary["blurred"] + summary["copied"] + summary["partly_anonymized"]
            record("anonymize", processes, round_, images, done)

    best = {}  # the fastest round of each (job, processes): the one least disturbed by other work on the machine
    for row in rows:
        key = (row["job"], row["processes"])
        best[key] = max(best.get(key, 0.0), row["images_per_s"])
    ratios = {
        f"{job}_{n}_over_1": round(best[(job, n)] / best[(job, 1)], 3)
        for job in ("annotate", "anonymize")
        for n in args.processes[1:]
    }
    header = ("job", "processes", "round", "images", "job s", "images/s", "wall s", "load")
    print("\n{:<10} {:>9} {:>5} {:>6} {:>7} {:>9} {:>7} {:>5}".format(*header))
    for row in rows:
        print(
            f"{row['job']:<10} {row['processes']:>9} {row['round']:>5} {row['images']:>6} {row['job_s']:>7.2f} "
            f"{row['images_per_s']:>9.2f} {row['wall_s']:>7.1f} {row['load_before']:>5.2f}"
        )
    print("ratios (n processes over 1, best images/s of each, measured in this run): " + json.dumps(ratios))
    result = {
        "accelerator": args.accelerator,
        "cores": os.cpu_count(),
        "images": args.images,
        "resolution": args.resolution,
        "model": args.model,
        "faces": args.faces,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "rows": rows,
        "best_images_per_s": {f"{job}_{n}": speed for (job, n), speed in best.items()},
        "ratios": ratios,
    }
    line = json.dumps(result)
    if args.out is not None:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
