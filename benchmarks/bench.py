"""One command for the speed and memory figures, measured side by side on this machine.

    python benchmarks/bench.py                # everything, writes benchmarks/results/<machine>.md
    python benchmarks/bench.py --quick        # fewer rounds, no torch.compile

Throughput: every contender is built and warmed up, then measured in rounds that alternate between
contenders (so that a noisy neighbour hurts all alike); each figure is the median over the rounds.
Compile time and peak memory are measured in fresh processes, one configuration each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import CONTENDERS, Task, keras_available  # noqa: E402

TASKS = [Task("densenet121", "inference", 8, 224), Task("densenet121", "train", 8, 160),
         Task("densenet_bc_100_k12", "inference", 64, 32), Task("densenet_bc_100_k12", "train", 64, 32)]
REFERENCE = "torch eager"


def machine_name() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    slug = "-".join(cpu.lower().replace("(r)", "").replace("(tm)", "").split()[:3])
    return f"cpu-{slug}-{os.cpu_count()}core"


def time_calls(fn, seconds: float) -> float:
    """Seconds per call, over as many calls as fit in about ``seconds``."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    n = max(1, int(seconds / max(once, 1e-6)))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def throughput(task: Task, names: list[str], rounds: int, seconds: float,
               contenders=CONTENDERS) -> dict[str, dict]:
    built, results = {}, {}
    for name in names:
        try:
            start = time.perf_counter()
            fn = contenders[name](task)
            fn()  # first call: tracing and compilation for the compiled contenders
            results[name] = {"first_call_s": time.perf_counter() - start, "per_round": []}
            built[name] = fn
        except Exception as e:  # a contender that cannot run this task is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"}
    for _ in range(rounds):
        for name, fn in built.items():
            results[name]["per_round"].append(task.batch / time_calls(fn, seconds))
    for name in built:
        results[name]["images_per_s"] = statistics.median(results[name]["per_round"])
    return results


def in_fresh_process(code: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=HERE, timeout=1800)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


FIRST_STEP = """
import json, time
from pathlib import Path
start = time.perf_counter()
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from contenders import Task, jax_split
step = jax_split(Task("densenet121", "train", 8, 160), store=Path({cache!r}) / "densenet-jax-steps")
built = time.perf_counter()
step()
done = time.perf_counter()
step()
again = time.perf_counter()
print(json.dumps({{"build_s": built - start, "first_step_s": done - built, "total_s": done - start,
                  "second_step_s": again - done, "first_step_overhead_s": (done - built) - (again - done)}}))
"""

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
PEAK_MEMORY = """
import json
from contenders import CONTENDERS, Task
fn = CONTENDERS[{name!r}](Task({model!r}, "train", {batch}, {size}))
for _ in range(3):
    fn()
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"peak_rss_mib": int(hwm.split()[1]) / 1024}}))
"""


def compile_times(tmp: Path) -> dict:
    cache = str(tmp / "xla-cache")
    cold = in_fresh_process(FIRST_STEP.format(cache=cache))
    warm = in_fresh_process(FIRST_STEP.format(cache=cache))
    return {"cold": cold, "cached": warm}


def dispatch_overhead() -> dict:
    """Host time a train step costs beyond running its compiled program: densenet121 at 32x32,
    batch 2 (little compute; batch 1 would leave the last BatchNorms one value per channel, which
    the model refuses). The trainer's step against the same program called directly (ahead-of-time
    compiled), and a plain nnx.jit step (which walks the module graph every call)."""
    import jax
    import numpy as np
    from contenders import jax_nnx_jit
    import densenet_jax as dj
    from densenet_jax.train import optim, parallel

    runner = parallel.make("mesh", dj.create_model("densenet121"), optim.sgd())
    holder = {"state": runner.place_state(runner.steps.initial)}
    x, y = runner.place_batch(np.zeros((2, 32, 32, 3), np.float32), np.zeros((2,), np.int32))
    lr = np.asarray(0.01, np.float32)
    compiled = runner._train.lower(holder["state"], runner.rest, x, y, lr).compile()

    def via_runner():
        holder["state"], m = runner.train(holder["state"], x, y, 0.01)
        jax.block_until_ready(m)

    def direct():
        holder["state"], m = compiled(holder["state"], runner.rest, x, y, lr)
        jax.block_until_ready(m)

    via_runner(), direct()
    ours, raw = [], []
    for _ in range(15):
        ours.append(time_calls(via_runner, 0.3))
        raw.append(time_calls(direct, 0.3))
    step = jax_nnx_jit(Task("densenet121", "train", 2, 32))
    step()
    nnx_jit = statistics.median(time_calls(step, 0.3) for _ in range(5))
    ms = lambda v: round(1e3 * v, 2)
    return {"compiled_program_ms": ms(statistics.median(raw)),
            "trainer_step_ms": ms(statistics.median(ours)),
            "trainer_overhead_ms": ms(statistics.median(ours) - statistics.median(raw)),
            "nnx_jit_step_ms": ms(nnx_jit),
            "nnx_jit_overhead_ms": ms(nnx_jit - statistics.median(raw))}


def residuals() -> dict:
    """Bytes saved for the backward pass (inputs and parameters aside), batch 32 at 224x224, plain
    vs memory_efficient; and, for densenet121, the compiled CPU program's temporary buffers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import densenet_jax as dj
    from densenet_jax.model.memory import saved_residual_bytes
    from densenet_jax.train import optim, parallel

    x = jax.ShapeDtypeStruct((32, 224, 224, 3), jnp.float32)
    out = {}
    for name in ("densenet121", "densenet169", "densenet201"):
        plain, efficient = (saved_residual_bytes(dj.create_model(name, memory_efficient=m), x)
                            for m in (False, True))
        out[name] = {"plain_gib": round(plain / 2**30, 3), "memory_efficient_gib": round(efficient / 2**30, 3),
                     "ratio": round(efficient / plain, 3)}
    temp = {}
    for m in (False, True):
        runner = parallel.make("mesh", dj.create_model("densenet121", memory_efficient=m), optim.sgd())
        state = runner.place_state(runner.steps.initial)
        batch = runner.place_batch(np.zeros((32, 224, 224, 3), np.float32), np.zeros((32,), np.int32))
        analysis = runner._train.lower(state, runner.rest, *batch, np.float32(0.01)).compile().memory_analysis()
        temp["memory_efficient" if m else "plain"] = round(analysis.temp_size_in_bytes / 2**30, 3)
    out["densenet121_cpu_compiled_temp_gib"] = temp
    return out


def table(results: dict[Task, dict]) -> str:
    lines = ["| task | contender | images/s (median) | vs torch eager | first call s |",
             "|---|---|---|---|---|"]
    for task, by_name in results.items():
        ref = by_name.get(REFERENCE, {}).get("images_per_s")
        for name, r in by_name.items():
            if "error" in r:
                lines.append(f"| {task.label} | {name} | n/a ({r['error']}) | | |")
                continue
            ratio = f"{r['images_per_s'] / ref:.2f}x" if ref else ""
            lines.append(f"| {task.label} | {name} | {r['images_per_s']:.1f} | {ratio} | "
                         f"{r['first_call_s']:.1f} |")
    return "\n".join(lines)


def versions() -> str:
    import flax
    import jax
    import torch
    return f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per contender per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds, no torch.compile, no subprocesses")
    parser.add_argument("--tasks", nargs="*", type=int, help="indices into the task list")
    parser.add_argument("--contenders", nargs="*", default=None)
    parser.add_argument("--skip-throughput", action="store_true", help="only the fresh-process figures")
    parser.add_argument("--skip-extras", action="store_true",
                        help="only throughput: no compile, dispatch, residual or peak-memory figures")
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"{machine_name()}.md")
    args = parser.parse_args()
    import tempfile

    rounds = 2 if args.quick else args.rounds
    names = args.contenders or [n for n in CONTENDERS if not (args.quick and n == "torch.compile")
                                and (n != "keras-jax" or keras_available())]
    tasks = [] if args.skip_throughput else [TASKS[i] for i in args.tasks] if args.tasks else TASKS
    results = {}
    for task in tasks:
        print(f"== {task.label}", flush=True)
        results[task] = throughput(task, names, rounds, args.seconds)
        for name, r in results[task].items():
            print(f"   {name}: {r.get('images_per_s', r.get('error'))}", flush=True)
    extra = {}
    if not (args.quick or args.skip_extras):
        with tempfile.TemporaryDirectory() as tmp:
            extra["compile"] = compile_times(Path(tmp))
        extra["dispatch"] = dispatch_overhead()
        extra["saved_residuals_b32_224"] = residuals()
        extra["peak_memory_densenet121_train_160_b8"] = {
            name: in_fresh_process(PEAK_MEMORY.format(name=name, model="densenet121", batch=8, size=160))
            for name in ("densenet_jax", REFERENCE)}
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    report = [f"# {machine_name()}", "",
              f"{datetime.date.today()}, {versions()}, {os.cpu_count()} CPU cores, fp32, NHWC for JAX.",
              f"Command: `{command.strip()}`; {rounds} rounds of about {args.seconds} s per contender, "
              "alternating; medians.", "", table(results), ""]
    if not keras_available():
        report += ["Keras-JAX: not installed here, not measured.", ""]
    if extra:
        report += ["```json", json.dumps(extra, indent=2), "```", ""]
    write_report(args.out, report)


def write_report(path, lines: list[str]) -> None:
    """Print the results file's ``lines`` and write them to ``path`` (its folder made)."""
    text = "\n".join(lines)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
