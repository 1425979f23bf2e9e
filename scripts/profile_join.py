#!/usr/bin/env python3
"""Modelled beside measured, one row per kernel launch, as a markdown table for GPU_LOG.md.

The modelled side is a JSON-lines file made on the CPU emulator: one object per kernel launch
with the emulator's counters (global ld/st sectors and requests, unique DRAM bytes, shared
wavefronts and their ideal) and the crate's "model" object (card, microseconds, limiter). The
measured side is Nsight Compute's CSV (`ncu --import REPORT --csv --page raw`; the long
`--page details` layout is read too). Launches pair up by kernel name, grid and block, in order
when several share all three. Where ncu could not run, the bench's own `--json` output (CUDA
events per stage) can be given instead, and is tabled below the join.

Standard library only: it runs on the GPU machine, which has python3 and nothing else of ours.

usage: profile_join.py [--modelled FILE] [--ncu CSV ...] [--bench JSON ...] [--out FILE]
"""

import argparse
import csv
import io
import json
import math
import os
import re
import sys

# The quantities compared, in table order: (column, modelled getter, ncu metric, kind).
COLUMNS = [
    ("DRAM read", "dram_read", "dram__bytes_read.sum", "bytes"),
    ("DRAM write", "dram_write", "dram__bytes_write.sum", "bytes"),
    ("ld sectors", "ld_sectors", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "count"),
    ("ld requests", "ld_requests", "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "count"),
    ("st sectors", "st_sectors", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", "count"),
    ("st requests", "st_requests", "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", "count"),
    ("bank conflicts", "conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum", "count"),
    ("occupancy", "occupancy", "sm__warps_active.avg.pct_of_peak_sustained_active", "pct"),
    ("time (us)", "us", "gpu__time_duration.sum", "us"),
]
CONFLICTS_LD = "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"
CONFLICTS_ST = "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
# Warps an SM holds at most (Hopper, Ampere's A100): the modelled occupancy's denominator.
MAX_WARPS_PER_SM = 64

SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
TIME_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
           "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


class JoinError(Exception):
    """A file that cannot be read as what it claims to be; the message names it."""


def base_name(kernel):
    """The bare function name: `void ns::k<int>(float*, int)` -> `k`. The crate's kernels are
    extern "C", so their names come through unchanged."""
    name = kernel.strip()
    if "(" in name:
        name = name[: name.index("(")]
    if " " in name:
        name = name.rsplit(" ", 1)[1]
    if "<" in name:
        name = name[: name.index("<")]
    return name.rsplit("::", 1)[-1]


def dims(text):
    """`(96, 8, 1)` or `[96,8,1]` or `768` -> a tuple of ints (one entry for a bare total)."""
    return tuple(int(x) for x in re.findall(r"\d+", "" if text is None else str(text)))


def number(value, unit=""):
    """A metric's value in base units (bytes, counts, percent, microseconds); None for n/a."""
    text = str(value).strip().replace(",", "")
    if text in ("", "n/a", "N/A", "-"):
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    unit = (unit or "").strip()
    if unit in TIME_US:
        return v * TIME_US[unit]
    m = re.match(r"^([KMGT]?)(byte|sector|request|B)?$", unit)
    if m and unit:
        return v * SCALE[m.group(1)]
    return v


# -- the modelled side --------------------------------------------------------------------------


def modelled_values(rec):
    """The compared quantities of one modelled record (None where the record has no figure)."""
    g = rec.get("global") or {}
    d = rec.get("dram") or {}
    sh = rec.get("shared") or {}
    model = rec.get("model") or {}
    res = rec.get("resources") or {}

    def mem(kind, field):
        v = (g.get(kind) or {}).get(field)
        return float(v) if v is not None else None

    conflicts = None
    if sh:
        conflicts = 0.0
        for tally in sh.values():
            if isinstance(tally, dict):
                conflicts += float(tally.get("wavefronts", 0)) - float(tally.get("ideal", 0))
    occupancy = None
    block = rec.get("block") or [0]
    threads = math.prod(int(x) for x in block) if block else 0
    if res.get("blocks_per_sm") is not None and threads:
        warps = res["blocks_per_sm"] * math.ceil(threads / 32)
        occupancy = 100.0 * min(warps, MAX_WARPS_PER_SM) / MAX_WARPS_PER_SM
    us = model.get("us")
    return {
        "dram_read": d.get("unique_read_bytes"),
        "dram_write": d.get("unique_write_bytes"),
        "ld_sectors": mem("ld", "sectors"),
        "ld_requests": mem("ld", "requests"),
        "st_sectors": mem("st", "sectors"),
        "st_requests": mem("st", "requests"),
        "conflicts": conflicts,
        "occupancy": occupancy,
        "us": float(us) if us is not None else None,
    }


def read_modelled(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise JoinError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "kernel" not in rec:
                raise JoinError(f"{path}:{n}: no \"kernel\" field")
            records.append(rec)
    return records


# -- the measured side --------------------------------------------------------------------------


def csv_rows(path):
    """The CSV rows from the header (`"ID",...`) on; ncu may print progress lines before it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith('"ID"') or line.startswith("ID,"):
            return list(csv.reader(io.StringIO("\n".join(lines[i:]))))
    return []


def read_ncu(path):
    """One dict per profiled launch, in the report's order: name, grid, block, metrics."""
    rows = csv_rows(path)
    if not rows:
        raise JoinError(f"{path}: no ncu CSV header (\"ID\",...) found")
    header = rows[0]
    col = {name: i for i, name in enumerate(header)}
    for needed in ("ID", "Kernel Name"):
        if needed not in col:
            raise JoinError(f"{path}: no \"{needed}\" column")
    launches = {}
    order = []

    def launch(row):
        key = row[col["ID"]]
        if key not in launches:
            launches[key] = {
                "name": row[col["Kernel Name"]],
                "grid": dims(row[col["Grid Size"]]) if "Grid Size" in col else (),
                "block": dims(row[col["Block Size"]]) if "Block Size" in col else (),
                "metrics": {},
                "source": os.path.basename(path),
            }
            order.append(key)
        return launches[key]

    if "Metric Name" in col and "Metric Value" in col:
        # The long layout: one row per metric.
        for row in rows[1:]:
            if len(row) < len(header) or not row[col["ID"]]:
                continue
            unit = row[col["Metric Unit"]] if "Metric Unit" in col else ""
            launch(row)["metrics"][row[col["Metric Name"]]] = number(
                row[col["Metric Value"]], unit)
    else:
        # The raw layout: one column per metric, a row of units under the header.
        units = {}
        body = rows[1:]
        if body and not body[0][col["ID"]].strip():
            units = dict(zip(header, body[0]))
            body = body[1:]
        for row in body:
            if len(row) < len(header) or not row[col["ID"]].strip():
                continue
            l = launch(row)
            for name, i in col.items():
                if "__" in name:
                    l["metrics"][name] = number(row[i], units.get(name, ""))
    for key in order:
        l = launches[key]
        m = l["metrics"]
        # Without the "Grid Size" columns, the launch__ metrics give the totals.
        if not l["grid"] and m.get("launch__grid_size") is not None:
            l["grid"] = (int(m["launch__grid_size"]),)
        if not l["block"] and m.get("launch__block_size") is not None:
            l["block"] = (int(m["launch__block_size"]),)
    return [launches[k] for k in order]


def measured_values(launch):
    m = launch["metrics"]
    return {key: m.get(metric) for _, key, metric, _ in COLUMNS}


# -- the join -----------------------------------------------------------------------------------


def full(t):
    t = tuple(t)
    return t + (1,) * (3 - len(t)) if len(t) > 1 else t


def total(t):
    return math.prod(t) if t else 0


def join(modelled, measured):
    """Pairs each measured launch with the next unused modelled record of the same name, grid
    and block (by the totals when ncu gave no dimensions). Returns (pairs, unmatched modelled)."""
    used = [False] * len(modelled)
    pairs = []
    for launch in measured:
        name = base_name(launch["name"])
        grid, block = full(launch["grid"]), full(launch["block"])
        exact = len(grid) == 3 and len(block) == 3
        found = None
        for i, rec in enumerate(modelled):
            if used[i] or base_name(rec["kernel"]) != name:
                continue
            rg, rb = full(rec.get("grid") or ()), full(rec.get("block") or ())
            if exact and (rg, rb) == (grid, block):
                found = i
                break
            if not exact and (total(rg), total(rb)) == (total(grid), total(block)):
                found = i
                break
        if found is not None:
            used[found] = True
        pairs.append((launch, modelled[found] if found is not None else None))
    return pairs, [r for i, r in enumerate(modelled) if not used[i]]


# -- the table ----------------------------------------------------------------------------------


def si(v):
    if v is None:
        return "-"
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}" if a and a < 1 else f"{v:.0f}"


def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "bytes":
        return si(v) + "B"
    if kind == "pct":
        return f"{v:.0f}%"
    if kind == "us":
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return si(v)


def ratio(model, meas):
    if model is None or meas is None:
        return ""
    if model == 0:
        return " (=)" if meas == 0 else " (model 0)"
    return f" ({meas / model:.2f})"


def shape(t):
    return "x".join(str(x) for x in t) if t else "-"


def table(pairs, unmatched, modelled_note):
    out = []
    out.append("Each cell: modelled / measured (measured / modelled). " + modelled_note)
    out.append("")
    out.append("| kernel | grid | block | " + " | ".join(c[0] for c in COLUMNS)
               + " | model limiter |")
    out.append("|" + "---|" * (len(COLUMNS) + 4))
    split = False
    for launch, rec in pairs:
        meas = measured_values(launch)
        model = modelled_values(rec) if rec else {}
        cells = []
        for _, key, _, kind in COLUMNS:
            cells.append(f"{fmt(model.get(key), kind)} / {fmt(meas.get(key), kind)}"
                         f"{ratio(model.get(key), meas.get(key))}")
        name = base_name(launch["name"])
        if rec and rec.get("sampled", 1.0) < 1.0:
            name += f" (sampled {100 * rec['sampled']:.0f}%)"
        limiter = ((rec or {}).get("model") or {}).get("limiter") or "-"
        out.append(f"| `{name}` | {shape(launch['grid'])} | {shape(launch['block'])} | "
                   + " | ".join(cells) + f" | {limiter} |")
        m = launch["metrics"]
        if m.get(CONFLICTS_LD) is not None or m.get(CONFLICTS_ST) is not None:
            split = True
    if split:
        out.append("")
        out.append("Measured shared-memory bank conflicts, loads / stores: "
                   + "; ".join(f"`{base_name(l['name'])}` {si(l['metrics'].get(CONFLICTS_LD))}"
                               f" / {si(l['metrics'].get(CONFLICTS_ST))}" for l, _ in pairs))
    missing = sum(1 for _, rec in pairs if rec is None)
    if missing:
        out.append("")
        out.append(f"{missing} measured launch(es) had no modelled record of the same kernel, "
                   "grid and block.")
    if unmatched:
        names = sorted({base_name(r["kernel"]) for r in unmatched})
        out.append("")
        out.append(f"{len(unmatched)} modelled launch(es) were not measured: "
                   + ", ".join(f"`{n}`" for n in names[:12])
                   + (", ..." if len(names) > 12 else "") + ".")
    return out


def plain(v):
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if v == 0 or abs(v) >= 0.01 else "<0.01"


def bench_table(paths):
    out = ["| bench | T | stage | us | GB/s | TFLOP/s |", "|---|---|---|---|---|---|"]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            # The JSON object is the output's last line; anything before it is the bench's talk.
            doc = json.loads(text.strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as e:
            raise JoinError(f"{path}: not the bench's --json output ({e})") from None
        # On the CPU emulator the bench reports modelled times (and the work under other names).
        modelled = bool(doc.get("modelled"))
        label = f"{doc.get('name', '?')} {doc.get('path', '')}/{doc.get('gemm', '')}"
        if modelled:
            label += f" (modelled, {doc.get('card', '?')})"
        for run in doc.get("runs", []):
            for st in run.get("stages", []):
                us = st.get("modelled_us" if modelled else "us") or 0.0
                work_b = st.get("ideal_bytes" if modelled else "bytes", 0)
                work_f = st.get("useful_flops" if modelled else "flops", 0)
                gbs = work_b / (us * 1e-6) / 1e9 if us else 0.0
                tf = work_f / (us * 1e-6) / 1e12 if us else 0.0
                out.append(f"| {label} | {run.get('tokens')} | {st.get('stage')} | {us:.1f} | "
                           f"{plain(gbs)} | {plain(tf)} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modelled", default="modelled.jsonl",
                    help="the emulator's JSON lines (default: modelled.jsonl)")
    ap.add_argument("--ncu", nargs="*", default=[], help="ncu CSV files (--page raw)")
    ap.add_argument("--bench", nargs="*", default=[], help="moe-kernels bench --json outputs")
    ap.add_argument("--out", help="the markdown file (default: stdout only)")
    args = ap.parse_args(argv)

    try:
        lines = ["### Profile: modelled (CPU emulator) beside measured (Nsight Compute)", ""]
        modelled = []
        if os.path.exists(args.modelled):
            modelled = read_modelled(args.modelled)
            cards = sorted({(r.get("model") or {}).get("card") or "?" for r in modelled})
            note = (f"Modelled: {os.path.basename(args.modelled)}, {len(modelled)} launch(es), "
                    f"card {', '.join(cards) or '?'}.")
        else:
            print(f"profile_join: no modelled file ({args.modelled}): measured figures only",
                  file=sys.stderr)
            note = "No modelled file: the modelled side reads -."
        measured = []
        for path in args.ncu:
            measured += read_ncu(path)
        if measured:
            pairs, unmatched = join(modelled, measured)
            lines += table(pairs, unmatched, note + " Measured: ncu --clock-control none, "
                           "caches flushed before each launch; occupancy measured is "
                           "achieved, modelled is the resources' theoretical.")
        else:
            lines.append("No ncu measurement. " + note)
        if args.bench:
            lines += ["", "CUDA-event timing per stage (moe-kernels bench --json):", ""]
            lines += bench_table(args.bench)
    except (OSError, JoinError) as e:
        print(f"profile_join: {e}", file=sys.stderr)
        return 1
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
