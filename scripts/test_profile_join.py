#!/usr/bin/env python3
"""Tests of profile_join.py on hand-made files: ncu's raw and long CSV layouts (a units row,
scaled units, thousands separators, progress lines before the header), launches that share a
kernel name, grid and block, a measured launch with no modelled twin, a missing modelled file,
and the bench's --json fallback. Standard library only.

usage: python3 scripts/test_profile_join.py
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_join  # noqa: E402


def record(kernel, grid, block, ld_sectors, us, dram_read=1_000_000, blocks_per_sm=3):
    return {
        "kernel": kernel, "grid": grid, "block": block, "dyn_smem": 0, "sampled": 1.0,
        "resources": {"regs": 72, "static_smem": 384, "local": 0,
                      "blocks_per_sm": blocks_per_sm, "limiter": "registers"},
        "global": {"ld": {"requests": ld_sectors // 4, "sectors": ld_sectors, "bytes": 0},
                   "st": {"requests": 10, "sectors": 40, "bytes": 1280},
                   "atom": {"requests": 0, "sectors": 0, "bytes": 0}},
        "dram": {"unique_read_bytes": dram_read, "unique_write_bytes": 4096,
                 "l2_read_bytes": 0, "l2_write_bytes": 0},
        "shared": {"ld": {"requests": 8, "wavefronts": 12, "ideal": 8},
                   "st": {"requests": 4, "wavefronts": 6, "ideal": 4},
                   "atom": {"requests": 0, "wavefronts": 0, "ideal": 0},
                   "ldmatrix": {"requests": 0, "wavefronts": 0, "ideal": 0},
                   "cp_async": {"requests": 0, "wavefronts": 0, "ideal": 0}},
        "async": {"cp_async_bytes": 0, "bulk_bytes": 0, "tensor_bytes": 0},
        "tensor": [],
        "model": {"card": "h100", "us": us, "limiter": "dram"},
    }


METRICS = [m for _, _, m, _ in profile_join.COLUMNS] + [
    profile_join.CONFLICTS_LD, profile_join.CONFLICTS_ST]
HEAD = ['"ID"', '"Process ID"', '"Process Name"', '"Host Name"', '"Kernel Name"', '"Context"',
        '"Stream"', '"Block Size"', '"Grid Size"', '"Device"', '"CC"']


def raw_csv(rows):
    """ncu --csv --page raw: a header, a units row, one row per launch."""
    units = ["Mbyte", "byte", "sector", "request", "sector", "request", "", "%", "usecond",
             "", ""]
    lines = ["==PROF== Connected to process 4242 (./moe-kernels)",
             ",".join(HEAD + [f'"{m}"' for m in METRICS]),
             ",".join(['""'] * len(HEAD) + [f'"{u}"' for u in units])]
    for i, (name, block, grid, values) in enumerate(rows):
        lines.append(",".join(
            [f'"{i}"', '"4242"', '"moe-kernels"', '"127.0.0.1"', f'"{name}"', '"1"', '"7"',
             f'"{block}"', f'"{grid}"', '"0"', '"9.0"'] + [f'"{v}"' for v in values]))
    return "\n".join(lines) + "\n"


class JoinTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def path(self, name, text):
        p = os.path.join(self.dir.name, name)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        return p

    def run_join(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = profile_join.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def modelled(self):
        recs = [
            record("router_logits_bf16_bf16", [1, 1, 1], [128, 1, 1], 800, 3.0),
            record("decode_gate_up_bf16_bf16_e128", [96, 8, 1], [256, 1, 1], 100_000, 12.0),
            # A second launch of the same shape (the next token count's warm-up, say): joined
            # in order.
            record("decode_gate_up_bf16_bf16_e128", [96, 8, 1], [256, 1, 1], 200_000, 24.0),
            record("plan_count", [4, 1, 1], [256, 1, 1], 64, 1.0),
        ]
        return self.path("modelled.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")

    def test_raw_layout_joins_in_order_with_units_and_ratios(self):
        # values in METRICS order: DRAM read in Mbyte, thousands separators, time in us
        gate = ["1.5", "4,096", "110,000", "27,500", "40", "10", "6", "37.5", "13.2", "4", "2"]
        gate2 = ["3", "8,192", "200,000", "50,000", "40", "10", "0", "40", "24", "0", "0"]
        other = ["0.001", "0", "10", "5", "0", "0", "0", "10", "1", "0", "0"]
        ncu = self.path("profile-decode.csv", raw_csv([
            ("decode_gate_up_bf16_bf16_e128", "(256, 1, 1)", "(96, 8, 1)", gate),
            ("decode_gate_up_bf16_bf16_e128", "(256, 1, 1)", "(96, 8, 1)", gate2),
            ("void helper_kernel<int>(int*)", "(32, 1, 1)", "(1, 1, 1)", other),
        ]))
        out_md = os.path.join(self.dir.name, "profile.md")
        rc, out, err = self.run_join("--modelled", self.modelled(), "--ncu", ncu,
                                     "--out", out_md)
        self.assertEqual(rc, 0, err)
        with open(out_md, encoding="utf-8") as f:
            self.assertEqual(f.read(), out)
        rows = [l for l in out.splitlines() if l.startswith("| `")]
        self.assertEqual(len(rows), 3)
        first, second, third = rows
        # DRAM read 1.0 MB modelled, 1.5 Mbyte measured; ld sectors 100k / 110k.
        self.assertIn("1MB / 1.5MB (1.50)", first)
        self.assertIn("100k / 110k (1.10)", first)
        # bank conflicts: (12 - 8) + (6 - 4) = 6 modelled, 6 measured.
        self.assertIn("6 / 6 (1.00)", first)
        # occupancy: 3 blocks of 8 warps of 64 = 37.5%; time 12 us / 13.2 us.
        self.assertIn("38% / 38% (1.00)", first)
        self.assertIn("12 / 13.2 (1.10)", first)
        self.assertIn("| 96x8x1 | 256x1x1 |", first)
        # The second launch of the same shape pairs with the second record.
        self.assertIn("200k / 200k (1.00)", second)
        self.assertIn("6 / 0 (0.00)", second)
        # A kernel with no modelled twin: its name reduced to the function, the model side "-".
        self.assertIn("`helper_kernel`", third)
        self.assertIn("| - / 1kB |", third)
        self.assertIn("1 measured launch(es) had no modelled record", out)
        self.assertIn("2 modelled launch(es) were not measured: `plan_count`, "
                      "`router_logits_bf16_bf16`", out)
        self.assertIn("`decode_gate_up_bf16_bf16_e128` 4 / 2", out)

    def test_long_layout(self):
        head = ",".join(HEAD + ['"Section Name"', '"Metric Name"', '"Metric Unit"',
                                '"Metric Value"'])
        lines = [head]
        for metric, unit, value in [("dram__bytes_read.sum", "Kbyte", "1,000"),
                                    ("gpu__time_duration.sum", "nsecond", "2,500"),
                                    ("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
                                     "sector", "800")]:
            lines.append(",".join(['"0"', '"1"', '"p"', '"h"', '"router_logits_bf16_bf16"',
                                   '"1"', '"7"', '"(128, 1, 1)"', '"(1, 1, 1)"', '"0"',
                                   '"9.0"', '"Command line profiler metrics"',
                                   f'"{metric}"', f'"{unit}"', f'"{value}"']))
        ncu = self.path("long.csv", "\n".join(lines) + "\n")
        rc, out, err = self.run_join("--modelled", self.modelled(), "--ncu", ncu)
        self.assertEqual(rc, 0, err)
        row = [l for l in out.splitlines() if l.startswith("| `router_logits")][0]
        self.assertIn("1MB / 1MB (1.00)", row)
        self.assertIn("800 / 800 (1.00)", row)
        self.assertIn("3 / 2.5 (0.83)", row)
        # A metric not collected reads "-" with no ratio; 3 blocks of 4 warps: 19% modelled.
        self.assertIn("| 19% / - |", row)

    def test_no_modelled_file_and_bench_fallback(self):
        bench = {"name": "qwen3-30b-a3b", "path": "auto", "gemm": "v1", "runs": [
            {"tokens": 1, "stages": [{"stage": "gemm1", "us": 10.0, "flops": 2e9,
                                      "bytes": 2e7}]}]}
        bench_path = self.path("profile-decode-t1.json", "progress\n" + json.dumps(bench))
        rc, out, err = self.run_join("--modelled", os.path.join(self.dir.name, "absent.jsonl"),
                                     "--bench", bench_path)
        self.assertEqual(rc, 0, err)
        self.assertIn("no modelled file", err)
        self.assertIn("No ncu measurement. No modelled file", out)
        self.assertIn("| qwen3-30b-a3b auto/v1 | 1 | gemm1 | 10.0 | 2000 | 200 |", out)

    def test_bad_inputs_fail_with_the_file_named(self):
        bad = self.path("bad.csv", "not a csv from ncu\n")
        rc, _, err = self.run_join("--modelled", self.modelled(), "--ncu", bad)
        self.assertEqual(rc, 1)
        self.assertIn("bad.csv: no ncu CSV header", err)
        broken = self.path("broken.jsonl", '{"kernel": "k"}\n{oops\n')
        rc, _, err = self.run_join("--modelled", broken)
        self.assertEqual(rc, 1)
        self.assertIn("broken.jsonl:2: not JSON", err)


if __name__ == "__main__":
    unittest.main()
