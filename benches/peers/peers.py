#!/usr/bin/env python3
"""moe-kernels beside its peers, on one GPU, in one run.

1. Ceilings: device-to-device copy bandwidth (1 GiB, bytes read + written) and the rate of a
   dense bf16 GEMM (8192^3, torch.matmul), both medians of CUDA-event timings.
2. Every system on the same block: the same shapes, the same weights (drawn by the rule of
   `moe-kernels bench`, see weights.py) and the same inputs, hence the same routing:
   moe-kernels (`moe-kernels bench --json`), transformers' MoE block with its experts
   implementations, a plain PyTorch block on torch._grouped_mm, and its FP8 and int4 variants
   where torch has the kernels; the routing alone in torch beside moe-kernels' route stage.
   Each system is checked against a float32 reference of the block and against the others
   before it is timed.
3. One markdown table: each system's time, moe-kernels' speedup over the best peer and its
   share of the roofline, and for each row short of the targets where the time goes.

Run by run.sh; `python3 peers.py --help` for the options. Smoke test without a GPU:
  python3 peers.py --device cpu --shape 64,32,16,4 --tokens 1,16,64
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import systems as S
import weights as W

HERE = Path(__file__).resolve().parent
TOKENS = [1, 16, 128, 1024, 4096, 16384]
FORMATS = ["bf16", "fp8", "int4", "mxfp4"]
COLUMNS = ["hf eager", "hf batched_mm", "hf grouped_mm", "torch grouped_mm", "torch int4 loop"]
TOLERANCE = {"bf16": 0.03, "fp8": 0.15, "int4": 0.25}   # max relative error per token
TARGET_COPY, TARGET_MATRIX = 0.80, 0.70


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Clock:
    """Median time of a callable: on a GPU by CUDA events, each timed call preceded by a memset
    of 4x the L2 size so that no weight is served from L2 (moe-kernels bench does the same);
    on a CPU by the wall clock (for smoke tests)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flush = None
        if self.cuda:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(4 * max(l2, 1 << 20), dtype=torch.uint8, device=device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, iters: int, cap_s: float, flush: bool = True) -> tuple[float, int]:
        """(median microseconds, iterations): one warm-up call, one wall-clock estimate, then
        up to `iters` timed calls, fewer (at least 3) where they would take over cap_s."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        est = time.perf_counter() - t0
        n = max(3, min(iters, int(cap_s / max(est, 1e-6))))
        samples = []
        if self.cuda:
            marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(n)]
            for start, end in marks:
                if flush:
                    self.flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            samples = [s.elapsed_time(e) * 1e3 for s, e in marks]
        else:
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples), n


class Budget:
    """Wall-clock budget of the run, shared out evenly over the models still to run."""

    def __init__(self, seconds: float, parts: int):
        self.end, self.parts = time.monotonic() + seconds, parts
        self.part_end = self.end

    def next_part(self):
        now = time.monotonic()
        self.part_end = now + max(0.0, self.end - now) / max(1, self.parts)
        self.parts -= 1

    def left(self) -> float:
        return self.part_end - time.monotonic()


def free_bytes(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ceilings(clock: Clock, device, iters: int) -> dict:
    cuda = device.type == "cuda"
    nbytes, n = (1 << 30, 8192) if cuda else (1 << 26, 512)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us, _ = clock.time(lambda: dst.copy_(src), max(iters, 10), 10.0, flush=False)
    copy = 2 * nbytes / (us * 1e-6) / 1e9
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    c = torch.empty_like(a)
    us, _ = clock.time(lambda: torch.matmul(a, b, out=c), max(iters, 10), 10.0, flush=False)
    return {"copy_gbs": copy, "matrix_tflops": 2 * n**3 / (us * 1e-6) / 1e12,
            "copy_bytes": nbytes, "gemm_n": n}


# ---------------------------------------------------------------------------------------------
# moe-kernels
# ---------------------------------------------------------------------------------------------


def run_ours(binary, spec, tokens, args, matrix_tflops, budget, fmt="bf16") -> dict:
    """{T: bench JSON run or an "unavailable: ..." string}, plus the JSON header under None.
    One call for all T; if it fails, the smallest T alone, and then each T alone."""
    if not spec.preset:
        return {t: "unavailable: custom shape (moe-kernels bench builds presets only)"
                for t in tokens}
    if binary is None:
        return {t: "unavailable: no moe-kernels binary (pass --binary)" for t in tokens}

    def call(ts):
        if budget.left() <= 0:
            return "unavailable: time budget spent (raise --budget)"
        cmd = [str(binary), "bench", "--preset", spec.name, "--tokens", ",".join(map(str, ts)),
               "--json", "--iters", str(args.iters), "--seed", str(args.seed)]
        if fmt != "bf16":
            cmd += ["--format", fmt]
        if matrix_tflops:
            cmd += ["--matrix-tflops", f"{matrix_tflops:.1f}"]
        log(f"[{spec.name}] {shlex.join(cmd)}")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=min(args.ours_timeout, max(60.0, budget.left())))
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable: {type(e).__name__}: {e}"
        if p.returncode != 0:
            lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
            err = next((ln for ln in reversed(lines) if ln.startswith("error:")),
                       lines[-1] if lines else f"exit status {p.returncode}")
            return f"unavailable: {err}"
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError) as e:
            return f"unavailable: unreadable output ({e})"

    out = call(tokens)
    if isinstance(out, str) and len(tokens) > 1:
        first = call(tokens[:1])
        if isinstance(first, str):
            return {t: out for t in tokens}
        rest = [first] + [call([t]) for t in tokens[1:]]
        runs = {t: (r if isinstance(r, str) else r["runs"][0]) for t, r in zip(tokens, rest)}
        runs[None] = first
        return runs
    if isinstance(out, str):
        return {t: out for t in tokens}
    runs = {r["tokens"]: r for r in out["runs"]}
    runs[None] = out
    return runs


# ---------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------


class Result:
    def __init__(self, spec):
        self.spec = spec
        self.ours = {}          # format -> {T: run dict or "unavailable: ..."}
        self.times = {}         # (fmt, T, system) -> us
        self.route = {}         # T -> torch routing us
        self.checks = []        # lines
        self.skips = []         # (fmt, system, T or None, reason)
        self.failed = False

    def skip(self, fmt, system, t, reason):
        self.skips.append((fmt, system, t, reason))
        log(f"[{self.spec.name}] {fmt} {system} T={t if t else 'all'}: skipped: {reason}")


def rel_err(y, ref, keep) -> float:
    d = (y.float() - ref)[keep].norm(dim=-1)
    r = ref[keep].norm(dim=-1).clamp(min=1e-30)
    return (d / r).max().item() if keep.any() else float("nan")


def check(res, spec, w, systems, device, t_check, hf_router=None):
    """Runs every system at t_check (T=4 where it would not fit), compares it with the f32
    reference and with the first system, and returns those within tolerance."""
    refs, passed, first = {}, [], {}
    for sysm in systems:
        t = t_check if sysm.skip(t_check, free_bytes(device)) is None else 4
        if t not in refs:
            x = W.make_input(spec, t, device)
            ref, tie, ids = S.reference(spec, w, x)
            refs[t] = (x, ref, ~tie, ids)
        x, ref, keep, ids = refs[t]
        try:
            sysm.prepare()
            y = sysm(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:                          # noqa: BLE001 (report, go on)
            res.skip(sysm.fmt, sysm.name, None, f"failed at T={t}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}")
            continue
        err = rel_err(y, ref, keep)
        vs = ""
        if t in first:
            vs = f"; vs {first[t][0]}: {rel_err(y, first[t][1].float(), keep):.1e}"
        else:
            first[t] = (sysm.name, y)
        ok = err <= TOLERANCE[sysm.fmt]
        res.checks.append(f"{sysm.fmt} {sysm.name}: T={t}, {int(keep.sum())} of {t} tokens "
                          f"(near-ties left out), max relative error vs f32 reference "
                          f"{err:.1e}{vs}: {'ok' if ok else 'FAILED'}")
        if ok:
            passed.append(sysm)
        else:
            res.failed = True
            res.skip(sysm.fmt, sysm.name, None, f"wrong result (relative error {err:.1e} "
                     f"> {TOLERANCE[sysm.fmt]})")
    if hf_router is not None and t_check in refs:
        x, _, keep, ids = refs[t_check]
        mine = S.route(spec, w, S.router_logits(spec, w, x))[0]
        theirs = hf_router(x)
        same = lambda a, b: (a.sort(-1).values == b.sort(-1).values).all(-1)  # noqa: E731
        n = int(keep.sum())
        agree_hf = int((same(mine, theirs) & keep).sum())
        agree_ref = int((same(mine, ids) & keep).sum())
        res.checks.append(f"routing: torch route = transformers' router on {agree_hf} of {n} "
                          f"tokens, = f32 reference on {agree_ref} of {n}")
    return passed


def measure(res, spec, w, fmt, systems, args, clock, budget, device):
    for t in args.tokens:
        x = W.make_input(spec, t, device)
        if fmt == "bf16":
            fn = lambda: S.route(spec, w, S.router_logits(spec, w, x))  # noqa: E731
            res.route[t], _ = clock.time(fn, args.iters, args.cap)
        for sysm in systems:
            reason = sysm.skip(t, free_bytes(device))
            if reason is None and budget.left() <= 0:
                reason = "time budget spent (raise --budget)"
            if reason:
                res.skip(fmt, sysm.name, t, reason)
                continue
            sysm.prepare()
            try:
                us, n = clock.time(lambda: sysm(x), args.iters, min(args.cap, budget.left()))
            except Exception as e:                      # noqa: BLE001 (report, go on)
                oom = isinstance(e, torch.OutOfMemoryError)
                res.skip(fmt, sysm.name, t, "out of memory" if oom else
                         f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            res.times[(fmt, t, sysm.name)] = us
            log(f"[{spec.name}] {fmt} T={t} {sysm.name}: {us:.1f} us ({n} iterations)")


def run_model(spec, args, clock, ceil, budget, device) -> Result:
    budget.next_part()
    res = Result(spec)
    if device.type == "cuda":
        torch.cuda.empty_cache()        # leave the memory to moe-kernels' own process
    # moe-kernels first, while this process holds little device memory. Its compressed formats
    # are random codes (same routing); MXFP4 has no peer here, so it is left out.
    for fmt in ["bf16"] + [f for f in args.formats if f in ("fp8", "int4")]:
        res.ours[fmt] = run_ours(args.binary, spec, args.tokens, args,
                                 ceil["matrix_tflops"] if device.type == "cuda" else None,
                                 budget, fmt)
    log(f"[{spec.name}] drawing weights ({spec.describe()})")
    w = W.make(spec, args.seed, device)

    systems, hf_router = [], None
    try:
        cfg, fwd, hf_router = S.hf_block(spec, w)
        systems += [S.HF(cfg, fwd, impl, spec) for impl in ("eager", "batched_mm", "grouped_mm")]
    except Exception as e:                              # noqa: BLE001
        res.skip("bf16", "hf *", None, f"transformers block unavailable: {type(e).__name__}: {e}")
    systems.append(S.TorchMoE(spec, w, S.Bf16GroupedMM(w)))
    systems = check(res, spec, w, systems, device, args.check_tokens, hf_router)
    measure(res, spec, w, "bf16", systems, args, clock, budget, device)
    del systems, hf_router
    gc.collect()

    for fmt in args.formats:
        backend = None
        if fmt == "fp8":
            if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
                res.skip(fmt, "torch grouped_mm", None, "torch._scaled_grouped_mm needs sm_90+")
                continue
            backend = S.Fp8ScaledGroupedMM
            res.skip(fmt, "hf fp8 experts", None, "transformers' FP8 experts load the "
                     "kernels-community/finegrained-fp8 kernel from the Hugging Face Hub, "
                     "out of reach offline")
        elif fmt == "int4":
            backend = S.Int4Tinygemm
        elif fmt == "mxfp4":
            res.skip(fmt, "peers", None, S.mxfp4_unavailable())
            continue
        if backend is None:
            continue
        try:
            peer = S.TorchMoE(spec, w, backend(w, device))
        except Exception as e:                          # noqa: BLE001
            res.skip(fmt, backend.name, None, f"cannot build: {type(e).__name__}: {e}")
            continue
        measure(res, spec, w, fmt, check(res, spec, w, [peer], device, args.check_tokens),
                args, clock, budget, device)
        del peer
        gc.collect()
    del w
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt_us(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_x(theirs, ours) -> str:
    if not theirs or not ours:
        return "-"
    x = theirs / ours
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def roofline(flops, nbytes, us, ceil):
    """(share of the roofline, 'bytes' | 'FLOPs'): the binding resource's time over `us`."""
    tb = nbytes / (ceil["copy_gbs"] * 1e9)
    tf = flops / (ceil["matrix_tflops"] * 1e12)
    return max(tb, tf) / (us * 1e-6), ("bytes" if tb >= tf else "FLOPs")


def where_time_goes(run, t, ceil) -> str | None:
    """One line for a run short of a target: the dominant stage and the stages short."""
    total = run["total_us"]
    rows, short = [], []
    for st in run["stages"]:
        pct, res = roofline(st["flops"], st["bytes"], st["us"], ceil)
        target = None
        if st["stage"] in ("gemm1", "gemm2", "shared"):
            target = TARGET_MATRIX if res == "FLOPs" else TARGET_COPY
        elif st["stage"] == "combine" and t >= 4096:
            target = TARGET_COPY
        what = "matrix rate" if res == "FLOPs" else "copy bandwidth"
        rows.append((st["us"], st["stage"], pct, what))
        if target is not None and pct < target:
            short.append(f"{st['stage']} {pct:.0%} of {what} (target {target:.0%})")
    if not short:
        return None
    us, stage, pct, what = max(rows)
    return (f"T={t}: {stage} takes {us / total:.0%} of {total:.0f} us at {pct:.0%} of "
            f"{what}; short: {', '.join(short)}")


def table(results, ceil) -> list[str]:
    head = (["model", "T", "format", "moe-kernels"] + COLUMNS
            + ["best peer", "speedup vs best", "% roofline", "route: ours", "route: torch",
               "route speedup"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        fmts = ["bf16"] + [f for f in ("fp8", "int4") if any(k[0] == f for k in r.times)
                           or any(isinstance(v, dict) for v in r.ours.get(f, {}).values())]
        for fmt in fmts:
            for t in r.spec_tokens:
                peers = {c: r.times.get((fmt, t, c)) for c in COLUMNS}
                best = min((v for v in peers.values() if v is not None), default=None)
                ours = r.ours.get(fmt, {}).get(t)
                cells = [r.spec.name, str(t), fmt]
                o_us = r_us = None
                if isinstance(ours, dict):
                    o_us = ours["total_us"]
                    cells.append(fmt_us(o_us))
                    if fmt == "bf16":
                        r_us = sum(s["us"] for s in ours["stages"] if s["stage"] == "route")
                else:
                    cells.append("unavailable" if ours else "n/a")
                cells += [fmt_us(peers[c]) for c in COLUMNS]
                cells.append(fmt_us(best))
                cells.append(fmt_x(best, o_us))
                if o_us:
                    pct, res = roofline(sum(s["flops"] for s in ours["stages"]),
                                        sum(s["bytes"] for s in ours["stages"]), o_us, ceil)
                    cells.append(f"{pct:.0%} {res}")
                else:
                    cells.append("-")
                rt = r.route.get(t) if fmt == "bf16" else None
                cells += [fmt_us(r_us), fmt_us(rt), fmt_x(rt, r_us)]
                out.append("| " + " | ".join(cells) + " |")
    return out


def gpu_info(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    if device.type != "cuda":
        info["gpu"] = f"none (CPU smoke run: {platform.processor() or platform.machine()})"
        return info
    p = torch.cuda.get_device_properties(device)
    info["gpu"] = (f"{torch.cuda.get_device_name(device)} (sm_{p.major}{p.minor}, "
                   f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                   f"L2 {p.L2_cache_size / 2**20:.0f} MiB)")
    info["cuda"] = torch.version.cuda
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        info["driver"] = "unknown (no nvidia-smi)"
    return info


def commit_info(binary) -> str:
    """From BUNDLE_INFO next to the binary (or above this folder), else from git."""
    for d in ([Path(binary).resolve().parent] if binary else []) + [HERE, HERE.parent]:
        f = d / "BUNDLE_INFO"
        if f.is_file():
            for line in f.read_text().splitlines():
                if line.startswith("commit:"):
                    return line.split(":", 1)[1].strip() + " (BUNDLE_INFO)"
    try:
        head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return (head + (" (with uncommitted changes)" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def report(results, ceil, args, info, ours_copy, elapsed) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cuda = args.device.type == "cuda"
    lines = [f"### Peers, {date}", "",
             f"- GPU: {info['gpu']}" + (f", driver {info['driver']}, CUDA {info['cuda']}"
                                        if cuda else ""),
             f"- software: torch {info['torch']}, transformers {info['transformers']}, "
             f"Python {info['python']}",
             f"- commit: {args.commit}",
             f"- command: `{args.command}` ({elapsed / 60:.1f} min)",
             f"- ceilings: copy {ceil['copy_gbs']:.0f} GB/s ({ceil['copy_bytes'] >> 20} MiB "
             f"device to device, read + write, torch"
             + (f"; moe-kernels measured {ours_copy:.0f} GB/s" if ours_copy else "") + "); "
             f"dense bf16 GEMM {ceil['gemm_n']}^3 {ceil['matrix_tflops']:.3g} TFLOP/s "
             "(torch.matmul)" + ("; moe-kernels is given this rate" if cuda else ""),
             "- timing: " + ("CUDA events" if cuda else "wall clock (CPU smoke run)")
             + f", median of up to {args.iters} runs after a warm-up (at least 3, fewer than "
             f"{args.iters} only where the runs would pass {args.cap:.1f} s)"
             + ("; before every timed run a memset of 4x the L2 evicts the weights, for every "
                "system, as moe-kernels bench does" if cuda else ""),
             f"- seed {args.seed}: weights and inputs drawn by the rule of `moe-kernels bench` "
             "(benches/peers/weights.py), identical in every system", ""]
    for r in results:
        lines.append(f"- {r.spec.name}: {r.spec.describe()}, {r.spec.family} routing")
    lines += [""] + table(results, ceil) + [""]
    lines += ["Times in microseconds for the whole block (router, experts, shared expert). "
              "`speedup vs best`: the best peer's time over moe-kernels'. `% roofline`: "
              "moe-kernels' time against the larger of bytes / copy bandwidth and FLOPs / dense "
              "GEMM rate, and which one binds. `route`: moe-kernels' route stage (router "
              "projection and top-k) beside the same in torch, and the ratio. `torch grouped_mm` "
              "in an fp8 row is torch._scaled_grouped_mm with rowwise scales; `torch int4 loop` "
              "is tinygemm (torch._weight_int4pack_mm) per expert. moe-kernels' fp8 and int4 "
              "rows are `moe-kernels bench --format`: random codes of its own formats (FP8 e4m3 "
              "with 128x128 block scales, int4 symmetric in groups of 128) behind the same "
              "router, so the same routing and bytes per weight as the peers, not the same "
              "values.", ""]
    notes = []
    for r in results:
        for fmt, runs in r.ours.items():
            for t in r.spec_tokens:
                if isinstance(runs.get(t), dict):
                    line = where_time_goes(runs[t], t, ceil)
                    if line:
                        notes.append(f"- {r.spec.name} {fmt} {line}")
    if notes:
        lines += [f"Where the time goes, rows short of the targets (GEMMs: {TARGET_COPY:.0%} "
                  f"of copy bandwidth where bytes bind, {TARGET_MATRIX:.0%} of the GEMM rate "
                  f"where FLOPs bind; combine at T >= 4096: {TARGET_COPY:.0%} of copy "
                  "bandwidth):", ""] + notes + [""]
    unavailable = {}
    for r in results:
        for fmt, runs in r.ours.items():
            for t in r.spec_tokens:
                if isinstance(runs.get(t), str):
                    unavailable.setdefault((r.spec.name, fmt, runs[t]), []).append(t)
    if unavailable:
        lines += ["moe-kernels:", ""] + [
            f"- {name} {fmt} at T={','.join(map(str, ts))}: {why}"
            for (name, fmt, why), ts in unavailable.items()] + [""]
    lines += ["Checks (before timing):", ""]
    for r in results:
        lines += [f"- {r.spec.name}: {c}" for c in r.checks]
    skips = {}                  # (format, system, reason) -> {model: [T or None]}
    for r in results:
        for fmt, system, t, reason in r.skips:
            skips.setdefault((fmt, system, reason), {}).setdefault(r.spec.name, []).append(t)
    if skips:
        lines += ["", "Skipped:", ""]
        for (fmt, system, reason), where in skips.items():
            if len(where) == len(results) and all(None in ts for ts in where.values()):
                at = "all models"
            else:
                at = "; ".join(name + ("" if None in ts else " at T=" + ",".join(map(str, ts)))
                               for name, ts in where.items())
            lines.append(f"- {fmt} {system} ({at}): {reason}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", type=Path, help="the moe-kernels executable")
    p.add_argument("--models", default="all",
                   help=f"comma-separated, from {', '.join(W.PRESETS)} (default: all)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts T")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help="weight formats beyond bf16 to try, where a peer has them")
    p.add_argument("--shape", help="H,I,E,K: run each model's family at this shape instead "
                   "(smoke tests; moe-kernels is left out)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--cap", type=float, default=1.0,
                   help="seconds one measurement may take before it runs fewer iterations")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole run; later measurements are skipped past it")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--check-tokens", type=int, default=32, help="T of the correctness checks")
    p.add_argument("--ours-timeout", type=float, default=240.0)
    p.add_argument("--out", type=Path, help="also write the markdown here (and .json beside)")
    p.add_argument("--command", help="the command line to record (default: this one)")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.formats = [f for f in args.formats.split(",") if f and f != "bf16"]
    names = list(W.PRESETS) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in W.PRESETS]
    if unknown or any(f not in FORMATS for f in args.formats):
        p.error(f"unknown model or format: {unknown or args.formats}")
    args.specs = [W.PRESETS[n] for n in names]
    if args.shape:
        h, i, e, k = (int(v) for v in args.shape.split(","))
        args.specs = [W.custom(s, h, i, e, k) for s in args.specs]
    args.device = torch.device(args.device)
    args.command = args.command or shlex.join([sys.executable] + sys.argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    dev = args.device
    if dev.type == "cuda" and not torch.cuda.is_available():
        log("error: no CUDA device visible to torch (use --device cpu for a smoke run)")
        return 1
    if args.binary is not None and not args.binary.exists():
        log(f"warning: {args.binary} does not exist; moe-kernels will be unavailable")
    args.commit = commit_info(args.binary)
    torch.manual_seed(0)
    with torch.inference_mode():
        W.self_test(dev)
        if dev.type != "cuda" and "fp8" in args.formats:
            S.fp8_layout_check()
        log("weights: generator matches the pinned values and the pure-Python version")
        clock = Clock(dev)
        ceil = ceilings(clock, dev, args.iters)
        log(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, "
            f"dense bf16 {ceil['matrix_tflops']:.1f} TFLOP/s")
        budget = Budget(args.budget - (time.monotonic() - start), len(args.specs))
        results = []
        for spec in args.specs:
            r = run_model(spec, args, clock, ceil, budget, dev)
            r.spec_tokens = args.tokens
            results.append(r)
    ours_copy = next((r.ours["bf16"][None]["copy_gbs"] for r in results
                      if None in r.ours.get("bf16", {})), None)
    text = report(results, ceil, args, gpu_info(dev), ours_copy, time.monotonic() - start)
    print(text)
    if args.out:
        args.out.write_text(text)
        data = {"ceilings": ceil, "command": args.command, "commit": args.commit,
                "models": [{"name": r.spec.name, "shape": r.spec.describe(),
                            "moe_kernels": {f: {("header" if k is None else str(k)): v
                                                for k, v in runs.items()}
                                            for f, runs in r.ours.items()},
                            "peers": [{"format": f, "tokens": t, "system": s, "us": us}
                                      for (f, t, s), us in r.times.items()],
                            "torch_route_us": r.route, "checks": r.checks,
                            "skipped": [list(s) for s in r.skips]} for r in results]}
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
