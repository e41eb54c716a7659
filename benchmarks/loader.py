"""Loader throughput per worker (StepLoader: read + decode + preprocess + pack) vs what training consumes.

    python benchmarks/loader.py [--samples 400] [--steps 8] [--model qwen2_5_vl/7b --gpu H100 --mfu 0.4] [--workers 0,1,2]

One worker = one process running `StepLoader.next_step()` for a whole step (dp 1, all micro-batches),
as each training rank does. On synthetic shards written first into a temporary directory
(`data_pipelines.synth`: PNG images with text, 20% text-only), per image-size setting:

* `plan ms`: GlobalPlanner step planning (index only; done ahead in a thread with data.plan_ahead);
* `read ms`: streaming the needed tar members with WebDataset;
* `build ms`: JSON, image decode + resize + patchify (vision.py), template + tokens (text.py),
  M-RoPE positions, then `pack` into PackedBatch;
* `samples/s`, `tokens/s` (real tokens, text + visual, of the packed batches), `img/s` per worker;
* `GPU tok/s`: what one GPU training a named model consumes, from the framework's FLOP model
  (`qvl_train.monitor.flops.packed_batch_flops` of the very batches timed, training = 3 × forward):
  tokens / (their training FLOPs / (bf16 dense peak of `--gpu` × `--mfu`)). Default: Qwen2.5-VL-7B on
  an H100 SXM (989 TFLOP/s) at an assumed 40% MFU, i.e. ~396 TFLOP/s achieved; images cost ViT FLOPs,
  so the rate differs per row. `--consumption N` instead fixes N tokens/s for every row;
* `workers/GPU`: how many such workers one GPU needs to be fed at that rate (GPU tok/s / tokens/s
  of one worker, rounded up).

Then decode workers (`data.num_workers` = 0, 1, 2; `data.prefetch_steps` 1, planning ahead): per
size setting and worker count, after a warm-up step (worker start-up; `first step s`) and the step
prefetched during it, `tokens/s` of `--steps` steps back to back (one rank's loader throughput), then `--steps` steps with a
simulated training step
between them (`time.sleep` of the time this GPU needs for the step's tokens at the consumption
rate, or `--train-step` seconds): `wait ms` is how long `next_step` blocks per step, `GPU idle` the
share of wall time the GPU would wait (wait / (wait + step)), and `worker MB` the resident memory of one worker process.

Then the worker → rank transfer of one image's pixels (`--transfer`, on by default; a 1148x840
qwen2_vl image = 4,920 patches): the float32 pixel_values [4920, 1176] decode workers sent before
against the uint8 codes [4920, 3, 1, 196] they send now — bytes, the worker's `to_wire` (a file in
/dev/shm, or a pickle where there is none), the rank's `from_wire` (map, or unpickle; the pipe's own
copying is not in these times) and its `pack` into the batch (`np.concatenate` of the floats before;
`stream.pack_codes`, which writes the T = 2 copies, now); median wall time of a few repeats.

Then planning ahead: GlobalPlanner at dp 32 x 4 micro-batches of 16,384 tokens on the realistic
index of benchmarks/packing.py (no media), with a simulated training step of `--sim-step` seconds
(sleep, which releases the GIL like CUDA work mostly does): how long `next_step` waits for its plan,
inline vs planned ahead.

Then shard I/O (`--io-dp`, default 1,8,64; `--io-samples` synthetic samples, `--io-steps` steps): per
source (a local directory, an HTTP server with Range support and moto's S3 server, both on 127.0.0.1)
and per dp size, every simulated rank reads its share of each step (its micro-batches `j % dp == r` of
`--io-micro` per step) through `StepLoader._read`, once streaming (an index without offsets, as before)
and once by range (offsets in the index): `amplification` = bytes read / bytes of the samples used
(summed over the ranks), `samples/s` = samples read / read time of all ranks one after the other (one
process; decoding not included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.schema import DataConfig, DataSource  # noqa: E402
from data_pipelines.shards import write_index  # noqa: E402
from data_pipelines.stream import StepLoader  # noqa: E402
from data_pipelines.synth import generate  # noqa: E402
from qvl_train.monitor.flops import packed_batch_flops  # noqa: E402

SIZES = {"small 56-224 px": (56, 224), "medium 224-672 px": (224, 672), "large 448-1344 px": (448, 1344)}


class _Timed:
    """Wraps a callable and sums its wall time."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.total += time.perf_counter() - t


def measure(data_dir: str, *, max_tokens: int, micro: int, steps: int, generation: str, model=None) -> dict[str, float]:
    """Time `steps` steps of one worker (after one warm-up step); phases summed over all steps. With
    `model` (a ModelConfig), also the training FLOPs of the batches built (`flops_step`)."""
    cfg = DataConfig(sources=[DataSource(data_dir)], max_tokens=max_tokens, generation=generation, plan_ahead=False)
    ld = StepLoader(cfg, micro_batches_per_step=micro, dp_rank=0, dp_size=1)
    ld.next_step()
    plan, read = _Timed(ld._take_plan), _Timed(ld._read)
    ld._take_plan, ld._read = plan, read  # instance attributes shadow the methods
    samples = tokens = images = 0
    built = []
    t0 = time.perf_counter()
    for _ in range(steps):
        for b in ld.next_step():
            samples += b.num_samples
            tokens += b.num_tokens
            images += int(b.grid_thw.shape[0])
            built.append(b)
    wall = time.perf_counter() - t0
    flops = sum(packed_batch_flops(model, b).training for b in built) if model is not None else 0
    return {
        "plan_ms": 1e3 * plan.total / steps, "read_ms": 1e3 * read.total / steps,
        "build_ms": 1e3 * (wall - plan.total - read.total) / steps,
        "samples_s": samples / wall, "tokens_s": tokens / wall, "images_s": images / wall,
        "tokens_step": tokens / steps, "skipped": ld.stats()["data_skipped"], "flops_step": flops / steps,
    }


def consumer_rate(model_name: str, gpu: str, mfu: float) -> tuple[object, float, str]:
    """(ModelConfig, achieved FLOP/s, description) of one GPU training `model_name` (configs/model/)."""
    from benchmarks.packing import model_yaml
    from qvl_train.monitor.flops import peak_tflops

    peak = peak_tflops(0.0, gpu)
    if peak is None:
        raise SystemExit(f"--gpu {gpu!r}: no bf16 peak known for it; use a name from qvl_train.monitor.flops.PEAK_TFLOPS")
    return model_yaml(model_name), peak * 1e12 * mfu, f"{model_name} on {gpu} ({peak:.0f} TFLOP/s bf16 dense) at {mfu:.0%} MFU"


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), NaN elsewhere."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_workers(data_dir: str, *, workers: int, max_tokens: int, micro: int, steps: int, generation: str,
                    consumption: float, train_step: float) -> dict[str, float]:
    """Throughput with `workers` decode processes, then the wait per step behind a simulated training step."""
    cfg = DataConfig(sources=[DataSource(data_dir)], max_tokens=max_tokens, generation=generation,
                     num_workers=workers, prefetch_steps=1)
    ld = StepLoader(cfg, micro_batches_per_step=micro, dp_rank=0, dp_size=1)
    t0 = time.perf_counter()
    ld.next_step()
    startup = time.perf_counter() - t0
    if ld._jobs:  # let the step built during the warm-up finish and take it: the clock starts on an empty pipeline
        for todo in ld._jobs[0].result().pending.values():
            if not isinstance(todo, Exception):
                todo.result()
        ld.next_step()
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens += sum(b.num_tokens for b in ld.next_step())
    wall = time.perf_counter() - t0
    sim = train_step if train_step > 0 else tokens / steps / consumption
    waits = []
    for _ in range(steps):
        time.sleep(sim)  # the GPU trains on the step just returned
        t = time.perf_counter()
        ld.next_step()
        waits.append(time.perf_counter() - t)
    rss = max((_rss_mb(p) for p in ld.worker_pids), default=0.0)
    ld.close()
    wait = statistics.mean(waits)
    return {"tokens_s": tokens / wall, "first_step_s": startup, "train_step_s": sim, "wait_ms": 1e3 * wait,
            "gpu_idle": wait / (wait + sim), "worker_mb": rss}


def transfer(repeats: int = 7) -> list[tuple[str, str, float, float, float]]:
    """(form, channel, MB, worker ms, rank ms) for one 1148x840 image's pixels, float32 vs uint8 codes."""
    import pickle

    import numpy as np
    import torch

    from data_pipelines.stream import pack_codes
    from data_pipelines.workers import _shm_dir, from_wire, to_wire

    cfg = DataConfig(generation="qwen2_vl")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (4920, 3, 1, 196), dtype=np.uint8)
    forms = {"float32 pixel_values": (np.repeat(codes, 2, axis=2).reshape(4920, -1).astype(np.float32),
                                      lambda a: torch.from_numpy(np.concatenate([a]))),
             "uint8 codes": (codes, lambda a: pack_codes(cfg, [a]))}
    channels = {"/dev/shm": _shm_dir(), "pickle": None} if _shm_dir() else {"pickle": None}
    out = []
    for form, (array, pack) in forms.items():
        for channel, shm in channels.items():
            sent, got = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                msg = pickle.dumps(to_wire({"pixel_codes": [array]}, shm))
                t1 = time.perf_counter()
                pack(from_wire(pickle.loads(msg))["pixel_codes"][0])
                t2 = time.perf_counter()
                sent.append(t1 - t0)
                got.append(t2 - t1)
            out.append((form, channel, array.nbytes / 1e6, 1e3 * statistics.median(sent), 1e3 * statistics.median(got)))
    return out


def plan_overlap(sim_step: float, steps: int) -> list[tuple[str, float, float]]:
    """Mean seconds `next_step` spends obtaining its plan at dp32 x 4, inline vs planned ahead."""
    from benchmarks.packing import BUDGET, MAX_PIXELS, model_yaml, synthetic_index
    from qvl_train.monitor.flops import SampleFlops

    flop_model = SampleFlops(model_yaml("qwen2_5_vl/7b"))  # balance=compute as training plans it

    out = []
    with tempfile.TemporaryDirectory() as d:
        write_index(d, synthetic_index(20000, 0)["shards"])
        for ahead in (False, True):
            cfg = DataConfig(sources=[DataSource(d)], max_tokens=BUDGET, max_pixels=MAX_PIXELS,
                             generation="qwen2_5_vl", plan_ahead=ahead)
            ld = StepLoader(cfg, micro_batches_per_step=128, dp_rank=0, dp_size=32, flop_model=flop_model)
            waits = []
            for i in range(steps + 1):
                t = time.perf_counter()
                ld._take_plan()  # the planning part of next_step (no shard exists here to read)
                if i:
                    waits.append(time.perf_counter() - t)
                time.sleep(sim_step)  # the training step
            ld.close()
            out.append(("ahead" if ahead else "inline", statistics.mean(waits), max(waits)))
    return out


def _strip_offsets(src: str, dst: str) -> None:
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "index.json")) as f:
        idx = json.load(f)
    for sh in idx["shards"]:
        sh.pop("size", None)
        for s in sh["samples"]:
            s.pop("offset", None)
            s.pop("members", None)
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(idx, f)


def io_rows(samples: int, dps: list[int], micro: int, steps: int, max_tokens: int) -> list[dict]:
    """Amplification and samples/s of each step's reads, per source x dp x (streamed, ranged)."""
    from moto.server import ThreadedMotoServer

    from data_pipelines import ranged
    from tests.range_server import RangeServer

    rows = []
    with tempfile.TemporaryDirectory() as root:
        generate(os.path.join(root, "ranged"), samples, seed=0, samples_per_shard=100, min_side=224, max_side=672)
        _strip_offsets(os.path.join(root, "ranged"), os.path.join(root, "streamed"))
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        host, port = s3.get_host_and_port()
        os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        client = ranged.s3_client()
        client.create_bucket(Bucket="bench")
        for sub in ("ranged", "streamed"):
            for name in os.listdir(os.path.join(root, sub)):
                client.upload_file(os.path.join(root, sub, name), "bench", f"{sub}/{name}")
        try:
            with RangeServer(root) as (url, _):
                for kind, base in (("local", root), ("http", url), ("s3", "s3://bench")):
                    for dp in dps:
                        for mode in ("streamed", "ranged"):
                            r = {"source": kind, "dp": dp, "mode": mode,
                                 **_io_measure(f"{base}/{mode}", dp, micro, steps, max_tokens)}
                            rows.append(r)
                            print(f"  {kind:<6} {dp:>4} {mode:<9} {r['amplification']:>13.2f} {r['samples_s']:>10.1f} "
                                  f"{r['read_mb']:>9.1f} {r['requests']:>9d}", flush=True)
        finally:
            s3.stop()
    return rows


def _io_measure(path: str, dp: int, micro: int, steps: int, max_tokens: int) -> dict:
    from data_pipelines.ranged import IOStats

    cfg = DataConfig(sources=[DataSource(path)], max_tokens=max_tokens, plan_ahead=False)
    ld = StepLoader(cfg, micro_batches_per_step=micro, dp_rank=0, dp_size=dp)
    io, n, wall = IOStats(), 0, 0.0
    for _ in range(steps):
        plans = ld._take_plan()
        for rank in range(dp):
            refs = [ref for plan in plans[rank::dp] for ref in plan]
            t = time.perf_counter()
            n += len(ld._read(refs, io))
            wall += time.perf_counter() - t
    ld.close()
    return {"amplification": io.bytes_read / max(io.bytes_used, 1), "samples_s": n / wall, "read_mb": io.bytes_read / 1e6,
            "requests": io.requests}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=400, help="synthetic samples per size setting")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--max-tokens", type=int, default=4096, help="data.max_tokens")
    ap.add_argument("--generation", default="", help="data generation (default: the model's)")
    ap.add_argument("--model", default="qwen2_5_vl/7b", help="configs/model/<name> whose FLOPs set the GPU's consumption "
                    "(and whose generation the data is built for)")
    ap.add_argument("--gpu", default="H100", help="GPU whose bf16 dense peak is used (qvl_train.monitor.flops.PEAK_TFLOPS)")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation of that GPU")
    ap.add_argument("--consumption", type=float, default=0.0,
                    help="fixed tokens/s per GPU instead of the FLOP model (0: the FLOP model)")
    ap.add_argument("--sim-step", type=float, default=1.0, help="simulated step (s) of the plan-ahead part; 0 skips it")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated rows of: " + ", ".join(SIZES) + " ('' skips them)")
    ap.add_argument("--workers", default="0,1,2", help="data.num_workers values of the decode-worker table ('' skips it)")
    ap.add_argument("--train-step", type=float, default=0.0,
                    help="simulated training step (s) of the worker table; 0: the step's tokens / consumption")
    ap.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                    help="time one image's worker -> rank transfer, float32 vs uint8 codes")
    ap.add_argument("--io-dp", default="1,8,64", help="dp sizes of the shard I/O table ('' skips it)")
    ap.add_argument("--io-samples", type=int, default=1000, help="synthetic samples of the shard I/O table")
    ap.add_argument("--io-micro", type=int, default=64, help="micro-batches per step of the I/O table (a multiple of every dp)")
    ap.add_argument("--io-steps", type=int, default=2, help="steps per row of the I/O table")
    args = ap.parse_args(argv)
    model, achieved, who = consumer_rate(args.model, args.gpu, args.mfu)
    generation = args.generation or model.generation
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"worker = 1 process, dp 1, {args.micro} x {args.max_tokens}-token micro-batches per step, "
          f"{generation}; consumer: " + (f"{args.consumption:,.0f} tokens/s per GPU (fixed)" if args.consumption else
                                         f"{who} = {achieved / 1e12:.0f} TFLOP/s achieved")
          + f"; load average {load:.1f}")
    if args.sizes:
        print(f"{'images':<18} {'plan ms':>8} {'read ms':>8} {'build ms':>9} {'samples/s':>10} {'tokens/s':>9} "
              f"{'img/s':>7} {'GPU tok/s':>10} {'workers/GPU':>11}")
    results, pooled = {}, {}
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    for name in filter(None, args.sizes.split(",")):  # --sizes '' skips the loader tables
        lo, hi = SIZES[name]
        with tempfile.TemporaryDirectory() as d:
            generate(d, args.samples, seed=0, samples_per_shard=100, min_side=lo, max_side=hi)
            r = measure(d, max_tokens=args.max_tokens, micro=args.micro, steps=args.steps, generation=generation,
                        model=model)
            need = args.consumption or r["tokens_step"] / (r["flops_step"] / achieved)
            r["consumption_tokens_s"] = need
            results[name] = r
            print(f"{name:<18} {r['plan_ms']:>8.1f} {r['read_ms']:>8.1f} {r['build_ms']:>9.1f} {r['samples_s']:>10.1f} "
                  f"{r['tokens_s']:>9,.0f} {r['images_s']:>7.1f} {need:>10,.0f} {math.ceil(need / r['tokens_s']):>11d}",
                  flush=True)
            for w in workers:
                pooled[f"{name} / {w}"] = measure_workers(
                    d, workers=w, max_tokens=args.max_tokens, micro=args.micro, steps=args.steps,
                    generation=generation, consumption=need, train_step=args.train_step,
                )
    if workers:
        print(f"decode workers (data.num_workers, prefetch_steps 1, plan ahead); load average now {os.getloadavg()[0]:.1f}:")
        print(f"{'images / workers':<22} {'tokens/s':>9} {'speed-up':>8} {'train step ms':>13} {'wait ms':>8} "
              f"{'GPU idle':>8} {'first step s':>12} {'worker MB':>9}")
        for key, r in pooled.items():
            base = pooled.get(key.rsplit(" / ", 1)[0] + " / 0", r)["tokens_s"]
            print(f"{key:<22} {r['tokens_s']:>9,.0f} {r['tokens_s'] / base:>7.2f}x {1e3 * r['train_step_s']:>13.0f} "
                  f"{r['wait_ms']:>8.0f} {r['gpu_idle']:>7.0%} {r['first_step_s']:>12.1f} {r['worker_mb']:>9.0f}", flush=True)
    if args.transfer:
        print("worker -> rank transfer of one 1148x840 image's pixels (median wall ms):")
        print(f"  {'form':<22} {'channel':<9} {'MB':>6} {'worker ms':>9} {'rank ms':>8}")
        for form, channel, mb, sent, got in transfer():
            print(f"  {form:<22} {channel:<9} {mb:>6.1f} {sent:>9.1f} {got:>8.1f}", flush=True)
    if args.sim_step > 0:
        print(f"planning dp32 x 4 micro-batches, 16,384 tokens, qwen2_5_vl, simulated step {args.sim_step} s:")
        for mode, mean, worst in plan_overlap(args.sim_step, steps=5):
            print(f"  {mode:<7} plan wait per step: mean {1e3 * mean:7.1f} ms, max {1e3 * worst:7.1f} ms", flush=True)
    if args.io_dp:
        print(f"shard I/O: {args.io_samples} samples (224-672 px PNG), shards of 100, {args.io_micro} x "
              f"{args.max_tokens}-token micro-batches per step, {args.io_steps} steps; servers on 127.0.0.1:")
        print(f"  {'source':<6} {'dp':>4} {'read':<9} {'amplification':>13} {'samples/s':>10} {'read MB':>9} {'requests':>9}")
        io = io_rows(args.io_samples, [int(d) for d in args.io_dp.split(",")], args.io_micro, args.io_steps, args.max_tokens)
        print(json.dumps({"io": io}))
    print(json.dumps({"consumer": args.consumption or who, "rows": results, "workers": pooled}))


if __name__ == "__main__":
    main()
