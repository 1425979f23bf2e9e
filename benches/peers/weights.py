"""The block shapes of the benchmarked models and the random weights `moe-kernels bench` draws,
rebuilt bit for bit in torch so that every peer runs on exactly the same numbers.

The rule (src/layer/gpu.rs, `MoeLayer::random`; src/device/fill.rs, `uniform_at`):

- tensor j of TENSORS is filled with seed_j = seed + (j + 1) * 2^32 (u64, wrapping);
- element i (flat row-major index) is fma(hi - lo, u, lo) in f32, then rounded to bf16
  (round to nearest even), with lo = -a, hi = a, a = sqrt(3 / fan_in) rounded to f32;
- u = (z >> 40) * 2^-24, z the splitmix64 finaliser of seed_j + i * 0x9e3779b97f4a7c15;
- the router is kept in f32 for DeepSeek-V3; router biases and correction biases are zero;
- the input x [T, H] is drawn with seed 2^40 + T over [-1, 1).

Run this file to check the torch version against the pinned values and a pure-Python version.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction

import torch

TENSORS = ["router", "gate_up", "down", "gate_up_bias", "down_bias",
           "shared_gate_up", "shared_down", "shared_gate", "const_w", "const_v"]

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

# (seed, index) -> uniform over [-1, 1) as f32; pinned by the crate's tests as well.
PINNED = [((1, 0), -0.3236668), ((1, 1), 0.13312304),
          ((2**32 + 1, 12345), 0.8739642), ((2**64 - 1, 7), 0.88522863)]


@dataclass(frozen=True)
class Spec:
    """One MoE block: what `moe-kernels bench --preset NAME` builds (src/bench.rs `preset`)."""
    name: str
    family: str             # mixtral | qwen3 | deepseek-v3 | gpt-oss: routing rule and extras
    hidden: int             # H
    inter: int              # I, per routed expert
    experts: int            # E
    k: int                  # K
    shared: int = 0         # Is, the shared expert's intermediate size (0: none)
    n_group: int = 1        # DeepSeek-V3 group-limited routing
    topk_group: int = 1
    scale: float = 1.0      # routed_scaling_factor
    preset: bool = True     # False for a custom --shape: `moe-kernels bench` cannot build it

    @property
    def router_f32(self) -> bool:
        return self.family == "deepseek-v3"

    @property
    def biases(self) -> bool:       # router bias and expert biases (gpt-oss)
        return self.family == "gpt-oss"

    def describe(self) -> str:
        s = f"H={self.hidden} I={self.inter} E={self.experts} K={self.k}"
        return s + (f" shared Is={self.shared}" if self.shared else "")


PRESETS = {
    "mixtral-8x7b": Spec("mixtral-8x7b", "mixtral", 4096, 14336, 8, 2),
    "qwen3-30b-a3b": Spec("qwen3-30b-a3b", "qwen3", 2048, 768, 128, 8),
    "deepseek-v3": Spec("deepseek-v3", "deepseek-v3", 7168, 2048, 256, 8, shared=2048,
                        n_group=8, topk_group=4, scale=2.5),
    "gpt-oss-120b": Spec("gpt-oss-120b", "gpt-oss", 2880, 2880, 128, 4),
}


def custom(base: Spec, h: int, i: int, e: int, k: int) -> Spec:
    """The family of `base` at another shape (for smoke tests); DeepSeek keeps its grouping
    rule with up to 8 groups of at least 2 experts and half of them kept."""
    groups = max(g for g in (1, 2, 4, 8) if e % g == 0 and e // g >= 2) if base.n_group > 1 else 1
    return Spec(f"{base.family}@{h},{i},{e},{k}", base.family, h, i, e, k,
                shared=i if base.shared else 0, n_group=groups,
                topk_group=max(1, groups // 2), scale=base.scale, preset=False)


# ---------------------------------------------------------------------------------------------
# The generator, vectorised in torch (int64 arithmetic wraps like u64; >> is arithmetic on
# int64, so logical shifts mask off the sign copies).
# ---------------------------------------------------------------------------------------------

def _i64(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def uniform(seed: int, start: int, count: int, lo: float, hi: float, dtype: torch.dtype,
            device) -> torch.Tensor:
    """Elements start .. start+count of a fill, in `dtype` (bf16 or f32).

    fma(hi - lo, u, lo) is evaluated in f64 and rounded once to f32. With lo = -hi (every
    tensor here) that is exact, hence bit-identical to the device's fmaf: (hi - lo) u + lo =
    a (2u - 1) is a 24-bit mantissa times a 24-bit integer, which f64 holds exactly. For other
    bounds the f64 sum may round first, a 1-ulp difference from fmaf on rare elements.
    """
    z = torch.arange(start, start + count, device=device, dtype=torch.int64)
    z.mul_(_i64(GOLDEN)).add_(_i64(seed))
    z.bitwise_xor_(_srl(z, 30)).mul_(_i64(MIX1))
    z.bitwise_xor_(_srl(z, 27)).mul_(_i64(MIX2))
    z.bitwise_xor_(_srl(z, 31))
    u = _srl(z, 40).to(torch.float64).mul_(2.0 ** -24)
    del z
    v = u.mul_(_f32(hi - lo)).add_(lo).to(torch.float32)
    return v if dtype == torch.float32 else v.to(dtype)


def fill(shape, seed: int, lo: float, hi: float, dtype=torch.bfloat16, device="cpu",
         chunk: int = 1 << 26) -> torch.Tensor:
    """A whole tensor, drawn in chunks so that the int64 temporaries stay small."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    for s in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - s)
        flat[s:s + n] = uniform(seed, s, n, lo, hi, dtype, device)
    return out


def tensor_seed(seed: int, name: str) -> int:
    return (seed + (TENSORS.index(name) + 1) * 2**32) & MASK64


def bound(fan_in: int) -> float:
    return _f32(math.sqrt(3.0 / fan_in))


def make(spec: Spec, seed: int, device) -> dict[str, torch.Tensor]:
    """Every tensor of the block in the crate's layout: router [E, H] (f32 for DeepSeek-V3),
    gate_up [E, 2I, H] (gate rows first; gpt-oss: row 2j gate, 2j+1 up), down [E, H, I],
    gpt-oss biases gate_up_bias [E, 2I], down_bias [E, H], router_bias [E] (zero),
    DeepSeek-V3 correction_bias [E] (zero), shared_gate_up [1, 2Is, H], shared_down [1, H, Is]."""
    h, i, e = spec.hidden, spec.inter, spec.experts

    def draw(name, shape, fan_in, dtype=torch.bfloat16):
        a = bound(fan_in)
        return fill(shape, tensor_seed(seed, name), -a, a, dtype, device)

    w = {
        "router": draw("router", (e, h), h, torch.float32 if spec.router_f32 else torch.bfloat16),
        "gate_up": draw("gate_up", (e, 2 * i, h), h),
        "down": draw("down", (e, h, i), i),
    }
    if spec.biases:
        w["gate_up_bias"] = draw("gate_up_bias", (e, 2 * i), h)
        w["down_bias"] = draw("down_bias", (e, h), i)
        w["router_bias"] = torch.zeros(e, dtype=torch.bfloat16, device=device)
    if spec.router_f32:
        w["correction_bias"] = torch.zeros(e, dtype=torch.float32, device=device)
    if spec.shared:
        w["shared_gate_up"] = draw("shared_gate_up", (1, 2 * spec.shared, h), h)
        w["shared_down"] = draw("shared_down", (1, h, spec.shared), spec.shared)
    return w


def make_input(spec: Spec, tokens: int, device) -> torch.Tensor:
    return fill((tokens, spec.hidden), 2**40 + tokens, -1.0, 1.0, torch.bfloat16, device)


# ---------------------------------------------------------------------------------------------
# A pure-Python version (exact rational arithmetic, own rounding), for the self-test.
# ---------------------------------------------------------------------------------------------

def _round_f32(q: Fraction) -> float:
    """q rounded to the nearest f32 (ties to even); normal range only, which suffices here."""
    if q == 0:
        return 0.0
    sign, q = (-1.0, -q) if q < 0 else (1.0, q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    scaled = q / Fraction(2) ** (e - 23)            # in [2^23, 2^24)
    m, rest = divmod(scaled.numerator, scaled.denominator)
    if 2 * rest > scaled.denominator or (2 * rest == scaled.denominator and m & 1):
        m += 1
    return sign * math.ldexp(m, e - 23)


def _round_bf16(x: float) -> float:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def uniform_at(seed: int, i: int, lo: float, hi: float) -> float:
    z = (seed + i * GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    z ^= z >> 31
    u = Fraction(z >> 40, 1 << 24)
    return _round_f32(Fraction(_f32(hi - lo)) * u + Fraction(lo))


def self_test(device="cpu", count: int = 2048) -> None:
    """Pinned values, then `count` elements of several fills against the pure-Python version."""
    for (seed, i), want in PINNED:
        got = uniform(seed, i, 1, -1.0, 1.0, torch.float32, device).item()
        assert got == _f32(want) and uniform_at(seed, i, -1.0, 1.0) == got, (seed, i, got, want)
    cases = [(tensor_seed(1, "gate_up"), 0, 2048, torch.bfloat16),
             (tensor_seed(7, "router"), 7168, 7168, torch.float32),
             (tensor_seed(MASK64, "down"), 3 << 31, 768, torch.bfloat16),
             (2**40 + 16, 5, 1, torch.bfloat16)]
    per = max(1, count // len(cases))
    for seed, start, fan_in, dtype in cases:
        a = bound(fan_in)
        got = uniform(seed, start, per, -a, a, dtype, device).float().cpu().tolist()
        for j, g in enumerate(got):
            want = uniform_at(seed, start + j, -a, a)
            if dtype == torch.bfloat16:
                want = _round_bf16(want)
            assert g == want, (seed, start + j, g, want)


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    self_test(dev, count=8192)
    print(f"weights: pinned values and 8192 elements match the pure-Python generator on {dev}")
