"""onnxruntime on the exported model, side by side with densenet_jax and torch eager (CPU).

    python benchmarks/export.py               # densenet121, batch 8, 224x224
    python benchmarks/export.py --rounds 3 --seconds 2

Same weights in all three (densenet_jax's init, converted for torch, exported for onnxruntime with
``densenet_jax.export.onnx_bytes``: NHWC input, onnxruntime's default CPU session options). Rounds
alternate between contenders; figures are medians. Writes
``benchmarks/results/<machine>-export.md``. Reported, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import REFERENCE, machine_name, table, throughput, versions, write_report  # noqa: E402
from contenders import Task, _data, jax_split, torch_eager  # noqa: E402

EXPORT_SECONDS = {}


def onnxruntime_contender(task: Task):
    """The exported model in an onnxruntime CPU session (export time kept in EXPORT_SECONDS)."""
    import onnxruntime as ort

    import densenet_jax as dj
    from densenet_jax.export import onnx_bytes

    start = time.perf_counter()
    data = onnx_bytes(dj.create_model(task.model), image_size=task.size)
    EXPORT_SECONDS[task] = time.perf_counter() - start
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = _data(task)[0]
    return lambda: session.run(None, {"images": x})


CONTENDERS = {"densenet_jax": jax_split, "onnxruntime": onnxruntime_contender, REFERENCE: torch_eager}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per contender per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"{machine_name()}-export.md")
    args = parser.parse_args()
    import onnxruntime

    task = Task("densenet121", "inference", args.batch, args.size)
    load_before = os.getloadavg()[0]
    results = {task: throughput(task, list(CONTENDERS), args.rounds, args.seconds, CONTENDERS)}
    load_after = os.getloadavg()[0]
    command = "python benchmarks/export.py " + " ".join(sys.argv[1:])
    report = [f"# {machine_name()}: exported model", "",
              f"{datetime.date.today()}, {versions()}, onnxruntime {onnxruntime.__version__}, "
              f"{os.cpu_count()} CPU cores, fp32.",
              f"Command: `{command.strip()}`; {args.rounds} rounds of about {args.seconds} s per "
              "contender, alternating; medians. `first call s` of onnxruntime includes the ONNX "
              f"export ({EXPORT_SECONDS.get(task, float('nan')):.1f} s) and the session's creation.",
              f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after: above the core "
              "count, other work shared the CPUs and the figures are lower and noisier than alone.",
              "", table(results), ""]
    write_report(args.out, report)


if __name__ == "__main__":
    main()
