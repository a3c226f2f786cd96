"""Memory of a DenseNet training step, plain against memory-efficient, and against torchvision's
two modes (memory_efficient=False/True), side by side on this machine's CPU, fp32.

    python benchmarks/memory.py                          # every part: results/memory-<machine>.md
    python benchmarks/memory.py --parts compiled time    # some parts; the others keep their figures
    python benchmarks/memory.py --smoke                  # tiny sizes, the code paths; writes /tmp/memory-smoke.md

Parts:
  compiled   what XLA's compiled train step allocates for its temporary buffers
             (``compile().memory_analysis().temp_size_in_bytes``), plain vs memory-efficient, for the
             trainer's own step (train/step.py under train/parallel.py's mesh jit) and for a user's
             plain ``jax.jit`` step; also across depth at one batch (densenet121/169/201/264d).
  residuals  what JAX lists as saved for the backward pass (tracing only).
  time       the trainer's step time, plain vs memory-efficient, alternating in one process.
  rss        resident-set growth over one step that has run once before, in a fresh process per
             configuration, ours and torchvision's: the peak (VmHWM, reset just before the step
             through /proc/self/clear_refs) minus the resident set just before it, after freed
             memory went back to the system (malloc_trim) on both sides.
  budget     the largest densenet121 batch at 224x224 that trains within 8 and 16 GiB: ours from
             the compiled step (temporary buffers + arguments + outputs not aliased to them), found
             by compiling; torchvision's from the rss part: the tensors it holds before a step
             (parameters, BN statistics, momentum, the batch) plus the step's resident growth, a
             straight line through the measured batches, extrapolated beyond them where said.

The compile-only parts (compiled, residuals, budget) give the same bytes, several times sooner,
with XLA_FLAGS=--xla_backend_optimization_level=0: LLVM's level comes after XLA's buffer
assignment (densenet_bc_52_k12, batch 32: identical temporary, argument and output bytes both
ways). The time part needs the default level.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30

FULL = {
    # (model, batch, image size): the compiled step, plain vs memory-efficient.
    "compiled": [("densenet121", 16, 224), ("densenet121", 32, 224), ("densenet_bc_100_k12", 64, 32),
                 ("densenet201", 32, 224), ("densenet_bc_190_k40", 64, 32)],
    "depth": [("densenet121", 32, 224), ("densenet169", 32, 224), ("densenet201", 32, 224),
              ("densenet264d", 32, 224)],
    "residuals": [("densenet121", 32, 224), ("densenet169", 32, 224), ("densenet201", 32, 224)],
    "time": [("densenet121", 32, 224), ("densenet_bc_100_k12", 64, 32)],
    "rss": [("densenet121", b, 224) for b in (8, 32, 64)],
    "budgets_gib": [8, 16], "budget_model": "densenet121", "budget_size": 224,
    "time_rounds": 5,
}
SMOKE = {
    "compiled": [("densenet_bc_16_k12", 4, 32)], "depth": [("densenet_bc_16_k12", 4, 32)],
    "residuals": [("densenet_bc_16_k12", 4, 32)], "time": [("densenet_bc_16_k12", 4, 32)],
    "rss": [("densenet_bc_16_k12", b, 32) for b in (2, 4)], "budgets_gib": [0.02, 0.04],
    "budget_model": "densenet_bc_16_k12", "budget_size": 32,
    "time_rounds": 2,
}
MODES = {False: "plain", True: "memory_efficient"}


# --- our side -----------------------------------------------------------------------------------

def trainer_step(name, batch, size, memory_efficient):
    """The trainer's runner (mesh jit, state donated) with its state and a random batch placed."""
    import numpy as np
    import densenet_jax as dj
    from densenet_jax.train import optim, parallel
    model = dj.create_model(name, memory_efficient=memory_efficient)
    runner = parallel.make("mesh", model, optim.sgd())
    rng = np.random.default_rng(0)
    batch_arrays = runner.place_batch(rng.standard_normal((batch, size, size, 3), dtype=np.float32),
                                      rng.integers(0, model.config.num_classes, batch).astype(np.int32))
    return runner, runner.place_state(runner.steps.initial), batch_arrays


def compiled_trainer_step(name, batch, size, memory_efficient):
    import numpy as np
    runner, state, (images, labels) = trainer_step(name, batch, size, memory_efficient)
    return runner._train.lower(state, runner.rest, images, labels, np.float32(0.01)).compile()


def compiled_user_step(name, batch, size, memory_efficient):
    """A user's train step: the model split once, a pure function of its state under jax.jit, SGD
    with momentum from optax, the new state returned (nothing donated)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    import densenet_jax as dj
    model = dj.create_model(name, memory_efficient=memory_efficient)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.01, momentum=0.9)

    def step(params, rest, opt_state, x, y):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.BatchStat)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.jit(step).lower(params, rest, tx.init(params), x, y).compile()


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp_gib": m.temp_size_in_bytes / GIB, "argument_gib": m.argument_size_in_bytes / GIB,
            "output_gib": m.output_size_in_bytes / GIB, "alias_gib": m.alias_size_in_bytes / GIB}


def compiled_part(configs, kinds=("trainer", "user_jit")) -> dict:
    import jax
    builders = {"trainer": compiled_trainer_step, "user_jit": compiled_user_step}
    out = {}
    for name, batch, size in configs:
        key = f"{name} b{batch} {size}"
        out[key] = {}
        for kind in kinds:
            build = builders[kind]
            row = {}
            for me, mode in MODES.items():
                start = time.perf_counter()
                row[mode] = analysis(build(name, batch, size, me))
                row[mode]["compile_s"] = time.perf_counter() - start
                jax.clear_caches()
            row["ratio"] = row["memory_efficient"]["temp_gib"] / row["plain"]["temp_gib"]
            out[key][kind] = row
            print(key, kind, {m: round(row[m]["temp_gib"], 3) for m in MODES.values()},
                  round(row["ratio"], 3), flush=True)
    return out


def residuals_part(configs) -> dict:
    import jax
    import jax.numpy as jnp
    import densenet_jax as dj
    from densenet_jax.model.memory import saved_residual_bytes
    out = {}
    for name, batch, size in configs:
        x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        row = {mode: saved_residual_bytes(dj.create_model(name, memory_efficient=me), x) / GIB
               for me, mode in MODES.items()}
        row["ratio"] = row["memory_efficient"] / row["plain"]
        out[f"{name} b{batch} {size}"] = row
    return out


def time_part(configs, rounds) -> dict:
    """Both steps built and run once, then ``rounds`` rounds of one step each, alternating."""
    import jax
    out = {}
    for name, batch, size in configs:
        steps = {}
        for me, mode in MODES.items():
            runner, state, (images, labels) = trainer_step(name, batch, size, me)
            holder = {"state": state}

            def step(runner=runner, holder=holder, images=images, labels=labels):
                holder["state"], metrics = runner.train(holder["state"], images, labels, 0.01)
                jax.block_until_ready(metrics)
            step()
            steps[mode] = step
        seconds = {mode: [] for mode in steps}
        for _ in range(rounds):
            for mode, step in steps.items():
                start = time.perf_counter()
                step()
                seconds[mode].append(time.perf_counter() - start)
        row = {mode: statistics.median(s) for mode, s in seconds.items()}
        row["ratio"] = row["memory_efficient"] / row["plain"]
        out[f"{name} b{batch} {size}"] = row
        print(name, batch, size, row, flush=True)
        del steps
        gc.collect()
        jax.clear_caches()
    return out


# --- one step's resident memory, in a fresh process ---------------------------------------------

def resident_kib(field="VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def give_back_freed_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_child(side: str, mode: str, name: str, batch: int, size: int) -> dict:
    """Run in a fresh process: one step (compiling, warming), then the measured one."""
    after_imports = resident_kib()
    if side == "jax":
        import jax
        import densenet_jax  # noqa: F401  (imported before the baseline, as torch is)
        after_imports = resident_kib()
        runner, state, (images, labels) = trainer_step(name, batch, size, mode == "memory_efficient")
        holder = {"state": state}

        def step():
            holder["state"], metrics = runner.train(holder["state"], images, labels, 0.01)
            jax.block_until_ready(metrics)
    else:
        import torch
        import torch.nn.functional as F
        import torchvision
        after_imports = resident_kib()
        memory_efficient = mode == "memory_efficient"
        if name in torchvision.models.list_models():
            model = torchvision.models.get_model(name, weights=None, memory_efficient=memory_efficient)
        else:  # --smoke's small model: torchvision's DenseNet class, its ImageNet stem
            import densenet_jax as dj
            c = dj.get_config(name)
            model = torchvision.models.DenseNet(c.growth_rate, c.block_config, c.num_init_features, c.bn_size,
                                                num_classes=c.num_classes, memory_efficient=memory_efficient)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=generator)
        y = torch.randint(0, model.classifier.out_features, (batch,), generator=generator)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def held_bytes():
            tensors = [*model.parameters(), *model.buffers(), x, y,
                       *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
            return sum(t.numel() * t.element_size() for t in tensors)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    give_back_freed_memory()
    before = resident_kib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = resident_kib("VmHWM")
    mib = 1 / 1024
    result = {"step_growth_mib": (peak - before) * mib, "before_step_mib": (before - after_imports) * mib,
              "peak_mib": (peak - after_imports) * mib, "first_step_s": first, "step_s": seconds}
    if side == "torch":
        result["held_mib"] = held_bytes() / 2**20
    return result


def in_fresh_process(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=3600)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def rss_part(configs) -> dict:
    out = {}
    for name, batch, size in configs:
        row = {}
        for side in ("jax", "torch"):
            for mode in MODES.values():
                row[f"{side} {mode}"] = in_fresh_process(side, mode, name, batch, size)
                print(name, batch, size, side, mode, row[f"{side} {mode}"], flush=True)
        out[f"{name} b{batch} {size}"] = row
    return out


# --- the largest batch within a budget ------------------------------------------------------------

def step_total_gib(name, batch, size, memory_efficient) -> float:
    """What the trainer's compiled step needs: temporary buffers, arguments (state and batch), and
    outputs that do not reuse a donated argument."""
    import jax
    a = analysis(compiled_trainer_step(name, batch, size, memory_efficient))
    jax.clear_caches()
    return a["temp_gib"] + a["argument_gib"] + a["output_gib"] - a["alias_gib"]


def largest_batch(fits, low: int, high: int) -> int:
    """The largest b in [low, high) with fits(b), given fits(low) and not fits(high)."""
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def budget_part(budgets, rss, name="densenet121", size=224) -> dict:
    out = {"ours": {}, "torchvision": {}}
    for me, mode in MODES.items():
        totals = {}

        def total(b):
            if b not in totals:
                totals[b] = step_total_gib(name, b, size, me)
                print("budget", mode, b, round(totals[b], 3), flush=True)
            return totals[b]

        # Nearly linear in the batch: a line through two compiles brackets the answer, which
        # bisection between compiles then pins down.
        b1, b2 = 16, 32
        slope = (total(b2) - total(b1)) / (b2 - b1)
        out["ours"][mode] = {}
        for budget in budgets:
            if total(1) > budget:
                out["ours"][mode][f"{budget:g}"] = 0
                continue
            guess = max(1, int(b2 + (budget - total(b2)) / slope))
            low, high = guess, guess + 1
            step = max(2, guess // 16)
            while total(low) > budget:
                high, low = low, max(1, low - step)
            while total(high) <= budget:
                low, high = high, high + step
            out["ours"][mode][f"{budget:g}"] = largest_batch(lambda b: total(b) <= budget, low, high)
        out["ours"][mode]["gib_by_batch"] = {str(b): v for b, v in sorted(totals.items())}
    for mode in MODES.values():
        measured = {int(k.split(" b")[1].split()[0]): v[f"torch {mode}"] for k, v in rss.items()
                    if k.startswith(f"{name} ") and "error" not in v[f"torch {mode}"]}
        points = sorted((b, (m["held_mib"] + m["step_growth_mib"]) / 1024) for b, m in measured.items())
        if len(points) < 2:
            continue
        (ba, ga), (bb, gb) = points[-2], points[-1]
        slope = (gb - ga) / (bb - ba)
        row = {"gib_by_batch": {str(b): g for b, g in points}, "gib_per_image": slope}
        for budget in budgets:
            best = int(bb + (budget - gb) / slope)
            row[f"{budget:g}"] = best
            row[f"{budget:g}_extrapolated"] = best > bb
        out["torchvision"][mode] = row
    return out


# --- the results file ------------------------------------------------------------------------------

def tables(r: dict) -> str:
    parts = []
    if "compiled" in r:
        lines = ["| step | configuration | plain GiB | memory_efficient GiB | ratio |", "|---|---|---|---|---|"]
        for key, row in r["compiled"].items():
            for kind in ("trainer", "user_jit"):
                c = row[kind]
                lines.append(f"| {kind} | {key} | {c['plain']['temp_gib']:.3f} | "
                             f"{c['memory_efficient']['temp_gib']:.3f} | {c['ratio']:.3f} |")
        parts.append("Compiled train step, temporary buffers:\n\n" + "\n".join(lines))
    if "depth" in r:
        lines = ["| step | model | dense layers | plain GiB | memory_efficient GiB | ratio |",
                 "|---|---|---|---|---|---|"]
        for key, row in r["depth"].items():
            for kind in ("trainer", "user_jit"):
                c = row[kind]
                lines.append(f"| {kind} | {key} | {row['layers']} | {c['plain']['temp_gib']:.3f} | "
                             f"{c['memory_efficient']['temp_gib']:.3f} | {c['ratio']:.3f} |")
        parts.append("Across depth, one batch:\n\n" + "\n".join(lines))
    if "residuals" in r:
        lines = ["| configuration | plain GiB | memory_efficient GiB | ratio |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['plain']:.3f} | {v['memory_efficient']:.3f} | {v['ratio']:.3f} |"
                  for k, v in r["residuals"].items()]
        parts.append("Saved for the backward pass as JAX lists it:\n\n" + "\n".join(lines))
    if "time" in r:
        lines = ["| configuration | plain s | memory_efficient s | ratio |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['plain']:.3f} | {v['memory_efficient']:.3f} | {v['ratio']:.3f} |"
                  for k, v in r["time"].items()]
        parts.append("Trainer's step time, medians of alternating rounds:\n\n" + "\n".join(lines))
    if "rss" in r:
        kinds = ("jax plain", "jax memory_efficient", "torch plain", "torch memory_efficient")
        lines = ["| configuration | " + " | ".join(f"{k} MiB" for k in kinds) + " |", "|---|---|---|---|---|"]
        for key, row in r["rss"].items():
            cells = [f"{row[k]['step_growth_mib']:.1f}" if "error" not in row[k] else "n/a" for k in kinds]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        parts.append("Resident-set growth over one step:\n\n" + "\n".join(lines))
    if "budget" in r:
        b = r["budget"]
        budgets = [k for k in next(iter(b["ours"].values())) if k != "gib_by_batch"]
        lines = ["| contender | " + " | ".join(f"within {k} GiB" for k in budgets) + " |",
                 "|---" * (len(budgets) + 1) + "|"]
        for mode, row in b["ours"].items():
            lines.append(f"| densenet_jax {mode} | " + " | ".join(str(row[k]) for k in budgets) + " |")
        for mode, row in b["torchvision"].items():
            cells = [f"{row[k]}{' (extrapolated)' if row[k + '_extrapolated'] else ''}" for k in budgets]
            lines.append(f"| torchvision {mode} | " + " | ".join(cells) + " |")
        parts.append("Largest batch that trains within a budget:\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def machine_name() -> str:
    sys.path.insert(0, str(HERE))
    from bench import machine_name as name
    return name()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="*", default=["compiled", "residuals", "time", "rss", "budget"],
                   choices=["compiled", "residuals", "time", "rss", "budget"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; writes /tmp/memory-smoke.md")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, mode, name, batch, size = args.child
        print(json.dumps(rss_child(side, mode, name, int(batch), int(size))))
        return
    plan = SMOKE if args.smoke else FULL
    out = Path("/tmp/memory-smoke.md") if args.smoke else HERE / "results" / f"memory-{machine_name()}.md"
    import jax
    import densenet_jax as dj
    measured = {}
    if "compiled" in args.parts:
        measured["compiled"] = compiled_part(plan["compiled"])
        measured["depth"] = compiled_part(plan["depth"])
        for key in measured["depth"]:
            measured["depth"][key]["layers"] = sum(dj.get_config(key.split()[0]).block_config)
    if "residuals" in args.parts:
        measured["residuals"] = residuals_part(plan["residuals"])
    if "time" in args.parts:
        measured["time"] = time_part(plan["time"], plan["time_rounds"])
    if "rss" in args.parts:
        measured["rss"] = rss_part(plan["rss"])
    if "budget" in args.parts:
        rss = measured.get("rss") or read_results(out).get("rss", {})
        measured["budget"] = budget_part(plan["budgets_gib"], rss, plan["budget_model"], plan["budget_size"])
    import flax
    import torch
    flags = f"XLA_FLAGS={os.environ['XLA_FLAGS']} " if os.environ.get("XLA_FLAGS") else ""
    run = (f"{datetime.date.today()}: `{flags}python benchmarks/memory.py {' '.join(sys.argv[1:])}` (jax "
           f"{jax.__version__}, flax {flax.__version__}, torch {torch.__version__})")
    print(write_results(out, measured, run))


def read_results(out: Path) -> dict:
    """The figures in the results file ``out`` (none if it is not there yet)."""
    if not out.exists():
        return {}
    return json.loads(out.read_text().split("```json\n", 1)[1].split("\n```", 1)[0])


def write_results(out: Path, measured: dict, run: str) -> str:
    """``measured`` merged into the results file as it is now, not as it was when this run began
    (a run of other parts may have written it meanwhile), under a temporary name, then renamed."""
    results = {**read_results(out), **measured}
    results["runs"] = [*results.get("runs", []), run]
    header = (f"# Training-step memory, {machine_name()}\n\n{os.cpu_count()} CPU cores, fp32; see "
              "benchmarks/memory.py's docstring for each measure. Runs that produced these figures:\n\n"
              + "\n".join(f"- {r}" for r in results["runs"]) + "\n\n")
    text = header + tables(results) + f"\n\n```json\n{json.dumps(results, indent=2)}\n```\n"
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, out)
    return text

if __name__ == "__main__":
    main()
