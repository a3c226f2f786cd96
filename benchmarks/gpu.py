"""The GPU figures in one run: parity at highest precision, bf16 training and inference throughput
against torch (channels-last + autocast, eager and torch.compile), and the memory of a training
step: plain vs memory-efficient, against torchvision's memory_efficient=False/True.

    bash benchmarks/gpu.sh                    # on a GPU machine, from the checkout
    bash benchmarks/gpu.sh --only memory      # the memory figures alone
    python benchmarks/gpu.py --smoke          # the same code paths on CPU, tiny sizes

Memory, as benchmarks/memory.py measures it on the CPU: the compiled train step's temporary buffers
(XLA's memory_analysis, the trainer's step, plain vs memory-efficient), and the peak a training
process reaches, one configuration per process: ``device.memory_stats()["peak_bytes_in_use"]``
for JAX, ``torch.cuda.max_memory_allocated()`` for torch, densenet121 at each ``--memory-batches``
batch; from two batches, the largest one within 8, 16 and 32 GiB (a straight line, extrapolated
where beyond the batches measured). On the CPU these peaks do not exist and are reported as null,
never estimated. Writes benchmarks/results/<gpu>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def timed(fn, iters: int, rounds: int) -> float:
    """Median seconds per call over ``rounds`` rounds of ``iters`` calls (fn must synchronise)."""
    fn()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        per_round.append((time.perf_counter() - start) / iters)
    return statistics.median(per_round)


# --- JAX side ----------------------------------------------------------------------------------

def jax_train_step(batch, size, precision, memory_efficient=False):
    import jax.numpy as jnp
    import numpy as np
    import densenet_jax as dj
    from densenet_jax.train import optim, parallel
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[precision]
    runner = parallel.make("mesh", dj.create_model("densenet121", memory_efficient=memory_efficient),
                           optim.sgd(), compute_dtype=dtype)
    holder = {"state": runner.place_state(runner.steps.initial)}
    rng = np.random.default_rng(0)
    images, labels = runner.place_batch(rng.standard_normal((batch, size, size, 3), dtype=np.float32),
                                        rng.integers(0, 1000, batch).astype(np.int32))

    def step():
        holder["state"], metrics = runner.train(holder["state"], images, labels, 0.01)
        metrics["loss"].block_until_ready()
    return step


def jax_inference(batch, size, precision):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    import densenet_jax as dj
    model = dj.DenseNet121(rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[precision]
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x.astype(dtype)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32))
    return lambda: forward(state, x).block_until_ready()


# --- torch side --------------------------------------------------------------------------------

def torch_setup(memory_efficient=False):
    import torch
    import torchvision
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.densenet121(weights=None, memory_efficient=memory_efficient)
    return torch, model.to(device).to(memory_format=torch.channels_last), device


def torch_train_step(batch, size, compile=False, memory_efficient=False, precision="bf16"):
    torch, model, device = torch_setup(memory_efficient)
    import torch.nn.functional as F
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    forward = torch.compile(model) if compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def torch_inference(batch, size, compile=False):
    torch, model, device = torch_setup()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    model.eval()
    forward = torch.compile(model) if compile else model

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            forward(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return run


# --- parity at highest precision ----------------------------------------------------------------

def parity(size, batch) -> dict:
    import jax
    import numpy as np
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import flax_twin
    from torch_twins import nchw, torchvision_model
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = torchvision_model("densenet121", seed=1).eval()
    model = flax_twin(reference)
    model.eval()
    reference = reference.to(device)
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)
    with torch.no_grad():
        expected = reference(nchw(x).to(device)).cpu().numpy()
    got = np.asarray(jax.jit(lambda x: model(x))(x))
    return {"densenet121_eval_fp32_highest_relative_error":
            float(np.abs(got - expected).max() / np.abs(expected).max())}


# --- memory: the compiled step, and peaks one configuration per process --------------------------

KINDS = ("jax_plain", "jax_memory_efficient", "torch_plain", "torch_memory_efficient")


def peak_memory_child(kind: str, batch: int, size: int, precision: str = "bf16") -> dict:
    if kind.startswith("jax"):
        import jax
        step = jax_train_step(batch, size, precision, memory_efficient=kind == "jax_memory_efficient")
        for _ in range(3):
            step()
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        seconds = timed(step, 5, 3)
    else:
        import torch
        step = torch_train_step(batch, size, memory_efficient=kind == "torch_memory_efficient",
                                precision=precision)
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        seconds = timed(step, 5, 3)
    return {"peak_gib": None if peak is None else peak / 2**30, "step_s": seconds}


def peak_memory(batches, size, precision) -> dict:
    """{batch: {kind: peak}} for densenet121, each in a fresh process; and the largest batch within
    8, 16 and 32 GiB from a line through the two largest batches measured."""
    out = {}
    for batch in batches:
        out[str(batch)] = row = {}
        for kind in KINDS:
            result = subprocess.run([sys.executable, __file__, "--child", kind, "--batch", str(batch),
                                     "--size", str(size), "--memory-precision", precision],
                                    capture_output=True, text=True,
                                    env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                                         "PYTHONPATH": str(ROOT)})
            lines = result.stdout.strip().splitlines()
            row[kind] = json.loads(lines[-1]) if result.returncode == 0 and lines else \
                {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
            print("peak memory", batch, kind, row[kind], flush=True)
    largest = {}
    for kind in KINDS:
        points = sorted((int(b), r[kind]["peak_gib"]) for b, r in out.items() if r[kind].get("peak_gib"))
        if len(points) < 2:
            continue
        (ba, ga), (bb, gb) = points[-2:]
        slope = (gb - ga) / (bb - ba)
        largest[kind] = {f"{budget}_gib": {"batch": int(bb + (budget - gb) / slope),
                                           "extrapolated": bb + (budget - gb) / slope > bb}
                         for budget in (8, 16, 32)}
    return {"precision": precision, "size": size, "by_batch": out, "largest_batch": largest}


def compiled_memory(smoke: bool) -> dict:
    """The trainer's compiled step on this device: temporary buffers, plain vs memory-efficient
    (benchmarks/memory.py's measure, here for the accelerator's compiler)."""
    sys.path.insert(0, str(HERE))
    from memory import compiled_part
    configs = [("densenet_bc_16_k12", 4, 32)] if smoke else [
        ("densenet121", 32, 224), ("densenet121", 128, 224), ("densenet_bc_100_k12", 64, 32)]
    return compiled_part(configs, kinds=("trainer",))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for checking on CPU")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--only", choices=["memory"], help="only the memory figures")
    p.add_argument("--memory-batches", default="64,256", help="densenet121 batches for the peaks")
    p.add_argument("--memory-precision", default="bf16", choices=["bf16", "fp32"],
                   help="what the peak-memory steps compute in (torch: autocast or not)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(peak_memory_child(args.child, args.batch, args.size, args.memory_precision)))
        return
    batch, size, iters, rounds = (args.batch, args.size, 10, 5) if not args.smoke else (4, 64, 1, 2)
    memory_batches = [2] if args.smoke else [int(b) for b in args.memory_batches.split(",")]
    import jax
    import torch
    device = jax.devices()[0].device_kind
    results = {"device": device, "batch": batch, "size": size}
    if args.only != "memory":
        results["parity"] = parity(224, 8 if not args.smoke else 1)
        results["throughput"] = throughput(args, batch, size, iters, rounds)
    results["compiled_memory"] = compiled_memory(args.smoke)
    results["peak_memory_train"] = peak_memory(memory_batches, 32 if args.smoke else 224, args.memory_precision)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    # A smoke run checks the code path; its numbers are not results.
    out = Path("/tmp/gpu-smoke.md") if args.smoke else HERE / "results" / f"{slug}.md"
    text = (f"# {device}\n\n{datetime.date.today()}, jax {jax.__version__}, torch {torch.__version__}. "
            f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`\n\n```json\n"
            f"{json.dumps(results, indent=2)}\n```\n")
    out.write_text(text)
    print(text)


def throughput(args, batch, size, iters, rounds) -> dict:
    """Images per second and first-call seconds of each contender."""
    throughput = {}
    contenders = {
        "train densenet_jax bf16": lambda: jax_train_step(batch, size, "bf16"),
        "train torch eager channels_last autocast-bf16": lambda: torch_train_step(batch, size),
        "train torch.compile channels_last autocast-bf16": lambda: torch_train_step(batch, size, compile=True),
        "inference densenet_jax bf16": lambda: jax_inference(batch, size, "bf16"),
        "inference torch eager channels_last autocast-bf16": lambda: torch_inference(batch, size),
        "inference torch.compile channels_last autocast-bf16": lambda: torch_inference(batch, size, compile=True),
    }
    for name, make in contenders.items():
        if args.no_compile and "compile" in name:
            continue
        try:
            start = time.perf_counter()
            fn = make()
            fn()
            first = time.perf_counter() - start
            throughput[name] = {"images_per_s": batch / timed(fn, iters, rounds), "first_call_s": first}
        except Exception as e:
            throughput[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}
        print(name, throughput[name], flush=True)
    return throughput


if __name__ == "__main__":
    main()
