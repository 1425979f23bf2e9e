"""The systems moe-kernels is compared with, and the float32 reference that checks them.

Every system is a callable x [T, H] bf16 -> y [T, H] bf16 computing the whole block (router,
routed experts, shared expert), built from the tensors of weights.make (the crate's layout):

- transformers' own MoE block of the family (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock,
  DeepseekV3MoE, GptOssMLP), its experts run by the "eager", "batched_mm" or "grouped_mm"
  experts implementation;
- a plain PyTorch block: routing in torch, tokens sorted by expert, one grouped GEMM for gate/up,
  the activation, one for down, weighted combine; its GEMMs come from a backend:
  bf16 torch._grouped_mm, FP8 torch._scaled_grouped_mm (rowwise scales) or int4
  torch._weight_int4pack_mm (tinygemm, one call per expert).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from weights import Spec

# ---------------------------------------------------------------------------------------------
# Routing and activation, as each family's transformers code computes them
# ---------------------------------------------------------------------------------------------


def router_logits(spec: Spec, w, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 projects in f32 from its f32 router; the others in the model dtype."""
    if spec.router_f32:
        return F.linear(x.float(), w["router"])
    return F.linear(x, w["router"], w.get("router_bias"))


def route(spec: Spec, w, logits: torch.Tensor):
    """Top-k ids [T, K] (int64) and their weights [T, K] (f32) from router logits."""
    k = spec.k
    if spec.family in ("mixtral", "qwen3"):             # softmax, top-k, renormalise
        wts, ids = torch.topk(torch.softmax(logits.float(), -1), k, -1)
        return ids, wts / wts.sum(-1, keepdim=True)
    if spec.family == "gpt-oss":                        # top-k of the logits, softmax over k
        top, ids = torch.topk(logits, k, -1)
        return ids, torch.softmax(top.float(), -1)
    # DeepSeek-V3: sigmoid; choice on score + correction bias within the topk_group groups of
    # best top-2 sum; weights the unbiased scores, renormalised, times routed_scaling_factor.
    t, e, g = logits.shape[0], spec.experts, spec.n_group
    scores = logits.float().sigmoid()
    choice = scores + w["correction_bias"]
    group = choice.view(t, g, e // g).topk(2, -1).values.sum(-1)
    keep = torch.zeros(t, g, dtype=torch.bool, device=logits.device)
    keep.scatter_(1, group.topk(spec.topk_group, -1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(e // g, 1), float("-inf"))
    ids = choice.topk(k, -1).indices
    wts = scores.gather(1, ids)
    return ids, wts / (wts.sum(-1, keepdim=True) + 1e-20) * spec.scale


def near_tie(spec: Spec, w, logits32: torch.Tensor) -> torch.Tensor:
    """Tokens [T] whose choice the rounding of the logits may flip: the last chosen and the first
    rejected key (or group score) are closer than a bf16 rounding of each (f32 routers: 1e-4)."""
    k = spec.k
    if spec.family != "deepseek-v3":
        top = logits32.topk(min(k + 1, spec.experts), -1).values
        if top.shape[1] <= k:
            return torch.zeros(top.shape[0], dtype=torch.bool, device=top.device)
        a, b = top[:, k - 1], top[:, k]
        return (a - b) < 2.0**-6 * torch.maximum(a.abs(), b.abs()) + 1e-3
    t, e, g, tg = logits32.shape[0], spec.experts, spec.n_group, spec.topk_group
    choice = logits32.sigmoid() + w["correction_bias"]
    group = choice.view(t, g, e // g).topk(2, -1).values.sum(-1)
    close = torch.zeros(t, dtype=torch.bool, device=choice.device)
    if tg < g:
        gs = group.topk(tg + 1, -1).values
        close |= (gs[:, tg - 1] - gs[:, tg]) < 1e-4
    keep = torch.zeros(t, g, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, group.topk(tg, -1).indices, True)
    masked = choice.masked_fill(~keep.repeat_interleave(e // g, 1), float("-inf"))
    if tg * (e // g) > k:
        top = masked.topk(k + 1, -1).values
        close |= (top[:, k - 1] - top[:, k]) < 1e-4
    return close


def activation(spec: Spec, h: torch.Tensor) -> torch.Tensor:
    """[S, 2I] -> [S, I]: SwiGLU with gate rows first, or gpt-oss's clamped SwiGLU over
    interleaved rows (row 2j gate, 2j+1 up)."""
    if spec.family == "gpt-oss":
        gate, up = h[..., ::2].clamp(max=7.0), h[..., 1::2].clamp(-7.0, 7.0)
        return (up + 1) * gate * torch.sigmoid(1.702 * gate)
    gate, up = h.chunk(2, -1)
    return F.silu(gate) * up


def reference(spec: Spec, w, x: torch.Tensor):
    """The block in f32 from the same bf16 weights, one expert at a time; also returns the
    near-tie mask, tokens that the checks leave out."""
    xf = x.float()
    logits = F.linear(xf, w["router"].float(),
                      w["router_bias"].float() if "router_bias" in w else None)
    ids, wts = route(spec, w, logits)
    out = torch.zeros_like(xf)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = F.linear(xf[tok], w["gate_up"][e].float(),
                     w["gate_up_bias"][e].float() if spec.biases else None)
        y = F.linear(activation(spec, h), w["down"][e].float(),
                     w["down_bias"][e].float() if spec.biases else None)
        out.index_add_(0, tok, y * wts[tok, slot, None])
    if spec.shared:
        h = F.linear(xf, w["shared_gate_up"][0].float())
        out += F.linear(activation(spec, h), w["shared_down"][0].float())
    return out, near_tie(spec, w, logits), ids


# ---------------------------------------------------------------------------------------------
# transformers' blocks
# ---------------------------------------------------------------------------------------------


def hf_block(spec: Spec, w):
    """transformers' MoE block of the family holding the same weights (shared storage where the
    layouts agree), and a function x [T, H] -> y [T, H]. Built on the meta device, then every
    parameter is replaced, so nothing is initialised twice."""
    h, i, e, k = spec.hidden, spec.inter, spec.experts, spec.k
    experts = {"experts.gate_up_proj": w["gate_up"], "experts.down_proj": w["down"]}
    if spec.family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls

        cfg = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e,
                            num_experts_per_tok=k, hidden_act="silu")
        params = {"gate.weight": w["router"]}
    elif spec.family == "qwen3":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls

        cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e,
                             num_experts_per_tok=k, norm_topk_prob=True, hidden_act="silu")
        params = {"gate.weight": w["router"]}
    elif spec.family == "deepseek-v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as cls

        cfg = DeepseekV3Config(hidden_size=h, moe_intermediate_size=i, n_routed_experts=e,
                               num_experts_per_tok=k, n_group=spec.n_group,
                               topk_group=spec.topk_group, norm_topk_prob=True,
                               routed_scaling_factor=spec.scale,
                               n_shared_experts=spec.shared // i, hidden_act="silu")
        s = spec.shared
        params = {"gate.weight": w["router"], "gate.e_score_correction_bias": w["correction_bias"],
                  "shared_experts.gate_proj.weight": w["shared_gate_up"][0, :s],
                  "shared_experts.up_proj.weight": w["shared_gate_up"][0, s:],
                  "shared_experts.down_proj.weight": w["shared_down"][0]}
    elif spec.family == "gpt-oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as cls

        cfg = GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e,
                           num_experts_per_tok=k, swiglu_limit=7.0)
        # gpt-oss stores x @ W: gate_up [E, H, 2I] (columns interleaved), down [E, I, H].
        experts = {"experts.gate_up_proj": w["gate_up"].transpose(1, 2).contiguous(),
                   "experts.down_proj": w["down"].transpose(1, 2).contiguous()}
        params = {"router.weight": w["router"], "router.bias": w["router_bias"],
                  "experts.gate_up_proj_bias": w["gate_up_bias"],
                  "experts.down_proj_bias": w["down_bias"]}
    else:
        raise ValueError(spec.family)
    with torch.device("meta"):
        block = cls(cfg)
    for name, t in {**params, **experts}.items():
        parent, _, leaf = name.rpartition(".")
        mod = block.get_submodule(parent)
        if leaf in mod._parameters:
            setattr(mod, leaf, torch.nn.Parameter(t, requires_grad=False))
        else:
            mod._buffers[leaf] = t
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers block has tensors this script does not set: {left}")
    block.eval()
    router = block.router if spec.family == "gpt-oss" else block.gate

    def forward(x):
        y = block(x[None])
        return (y[0] if isinstance(y, tuple) else y)[0]

    return cfg, forward, lambda x: router(x)[2]


class HF:
    """transformers' block with one experts implementation."""

    def __init__(self, cfg, forward, impl: str, spec: Spec):
        self.name, self.fmt = f"hf {impl}", "bf16"
        self.cfg, self.forward, self.impl, self.spec = cfg, forward, impl, spec

    def prepare(self):
        self.cfg._experts_implementation = self.impl

    def skip(self, tokens: int, free_bytes: int):
        if self.impl != "batched_mm":
            return None
        # batched_mm gathers one copy of the expert weights per (token, expert) pair.
        s = self.spec
        need = tokens * s.k * 3 * s.inter * s.hidden * 2
        if need > free_bytes // 2:
            return ("gathers a copy of gate_up and down per token-expert pair "
                    "(T*K*3*I*H*2 bytes), more than half the free memory")
        return None

    def __call__(self, x):
        return self.forward(x)


# ---------------------------------------------------------------------------------------------
# The plain PyTorch block and its GEMM backends
# ---------------------------------------------------------------------------------------------


class Plan:
    """The routed (token, expert) pairs sorted by expert: order[j] is the flat [T*K] slot of
    sorted row j, token[j] its token; offs the running end of each expert's rows."""

    def __init__(self, ids: torch.Tensor, experts: int):
        flat = ids.reshape(-1)
        self.expert, self.order = torch.sort(flat, stable=True)
        self.token = self.order // ids.shape[1]
        self.counts = torch.zeros(experts, dtype=torch.int64, device=ids.device)
        self.counts.scatter_add_(0, flat, torch.ones_like(flat))   # no host sync
        self.offs = self.counts.cumsum(0).to(torch.int32)
        self.cache = {}


class TorchMoE:
    """Routing in torch, sort by expert, grouped GEMM gate/up, activation, grouped GEMM down,
    weighted combine in slot order (deterministic, no atomics), shared expert dense."""

    def __init__(self, spec: Spec, w, backend):
        self.spec, self.w, self.lin = spec, w, backend
        self.name, self.fmt = backend.name, backend.fmt

    def prepare(self):
        pass

    def skip(self, tokens, free_bytes):
        return None

    def __call__(self, x):
        s, w = self.spec, self.w
        ids, wts = route(s, w, router_logits(s, w, x))
        plan = Plan(ids, s.experts)
        h = self.lin.grouped(x[plan.token], plan, "gate_up")
        if s.biases:
            h = h + w["gate_up_bias"][plan.expert]
        y = self.lin.grouped(activation(s, h), plan, "down")
        if s.biases:
            y = y + w["down_bias"][plan.expert]
        y = y * wts.reshape(-1)[plan.order, None].to(y.dtype)
        slots = torch.empty_like(y)
        slots[plan.order] = y
        out = slots.view(x.shape[0], s.k, -1).sum(1)
        if s.shared:
            out = out + self.lin.dense(activation(s, self.lin.dense(x, "shared_gate_up")),
                                       "shared_down")
        return out


class Bf16GroupedMM:
    name, fmt = "torch grouped_mm", "bf16"

    def __init__(self, w):
        self.w = w

    def grouped(self, a, plan, which):
        return torch._grouped_mm(a, self.w[which].transpose(-2, -1), offs=plan.offs)

    def dense(self, a, which):
        return F.linear(a, self.w[which][0])


E4M3_MAX = 448.0


def _quant_rows(a: torch.Tensor):
    """Rowwise FP8 e4m3: values and f32 dequantisation scales (value * scale ~ a)."""
    scale = a.abs().amax(-1).float().clamp(min=1e-12) / E4M3_MAX
    return (a.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


class Fp8ScaledGroupedMM:
    """FP8 e4m3 weights with one scale per output row, activations quantised per row on the fly,
    GEMMs by torch._scaled_grouped_mm (Hopper or newer) with each expert's rows padded to a
    multiple of 16, as that kernel wants. On a CPU the GEMM is emulated (for smoke tests)."""

    name, fmt = "torch grouped_mm", "fp8"

    def __init__(self, w, device):
        self.cuda = device.type == "cuda"
        self.q = {}
        for name in ("gate_up", "down", "shared_gate_up", "shared_down"):
            if name in w:
                e, n, k = w[name].shape
                q = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=device)
                scale = torch.empty(e, n, dtype=torch.float32, device=device)
                for j in range(e):      # one expert at a time: small f32 temporaries
                    q[j], scale[j] = _quant_rows(w[name][j])
                self.q[name] = (q, scale)

    def _padded(self, plan):
        if "dest" not in plan.cache:
            padded = (plan.counts + 15) // 16 * 16
            start = plan.counts.cumsum(0) - plan.counts
            pstart = padded.cumsum(0) - padded
            rank = torch.arange(plan.expert.numel(), device=plan.expert.device) - start[plan.expert]
            plan.cache["dest"] = pstart[plan.expert] + rank
            plan.cache["offs"] = padded.cumsum(0).to(torch.int32)
            plan.cache["rows"] = plan.expert.numel() + 16 * plan.counts.numel()  # no host sync
        return plan.cache["dest"], plan.cache["offs"], plan.cache["rows"]

    def grouped(self, a, plan, which):
        wq, ws = self.q[which]
        dest, offs, rows = self._padded(plan)
        aq, sa = _quant_rows(a)
        # Rows move as bytes: uint8 indexing is supported everywhere, float8 not always.
        big_a = torch.zeros(rows, a.shape[1], dtype=torch.uint8, device=a.device)
        big_a[dest] = aq.view(torch.uint8)
        big_a = big_a.view(torch.float8_e4m3fn)
        big_s = torch.zeros(rows, dtype=torch.float32, device=a.device)
        big_s[dest] = sa
        if self.cuda:
            out = torch._scaled_grouped_mm(big_a, wq.transpose(-2, -1), big_s, ws, offs=offs,
                                           out_dtype=torch.bfloat16)
        else:
            out = _emulated_scaled_grouped_mm(big_a, wq.transpose(-2, -1), big_s, ws, offs)
        return out[dest]

    def dense(self, a, which):
        wq, ws = self.q[which]
        aq, sa = _quant_rows(a)
        if self.cuda:
            return torch._scaled_mm(aq, wq[0].t(), sa[:, None], ws[0][None, :],
                                    out_dtype=torch.bfloat16)
        return ((aq.float() * sa[:, None]) @ (wq[0].float() * ws[0][:, None]).t()).bfloat16()


def _emulated_scaled_grouped_mm(a, b, sa, sb, offs):
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.bfloat16, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = ((a[start:end].float() * sa[start:end, None])
                              @ (b[g].float() * sb[g][None, :])).bfloat16()
        start = end
    return out


def fp8_layout_check():
    """Runs the FP8 calls on meta tensors: the argument layouts pass torch's checks."""
    meta = dict(device="meta")
    a = torch.empty(64, 256, dtype=torch.float8_e4m3fn, **meta)
    b = torch.empty(3, 128, 256, dtype=torch.float8_e4m3fn, **meta).transpose(-2, -1)
    torch._scaled_grouped_mm(a, b, torch.empty(64, **meta), torch.empty(3, 128, **meta),
                             offs=torch.empty(3, dtype=torch.int32, **meta),
                             out_dtype=torch.bfloat16)
    torch._scaled_mm(a, b[0], torch.empty(64, 1, **meta), torch.empty(1, 128, **meta),
                     out_dtype=torch.bfloat16)


class Int4Tinygemm:
    """int4 weights, asymmetric, one bf16 scale and zero per group of 32-128 along the input,
    through torch's tinygemm kernel (torch._weight_int4pack_mm), one call per expert with
    tokens, as an eager per-expert loop does (one host sync for the counts)."""

    name, fmt = "torch int4 loop", "int4"

    def __init__(self, w, device):
        self.cuda = device.type == "cuda"
        self.q = {}
        for name in ("gate_up", "down", "shared_gate_up", "shared_down"):
            if name in w:
                self.q[name] = [self._pack(w[name][e]) for e in range(w[name].shape[0])]

    def _pack(self, wt):
        n, k = wt.shape
        group = next((g for g in (128, 64, 32) if k % g == 0), None)
        tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
        if group is None or tiles is None or n % 8:
            raise ValueError(f"tinygemm needs K % 32 == 0 and N % 8 == 0, not {n}x{k}")
        wg = wt.float().view(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        # tinygemm dequantises (q - 8) * scale + zero; scales and zeros as [K/group, N, 2].
        sz = torch.stack([scale[..., 0], (lo + 8 * scale)[..., 0]], -1)
        sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
        if self.cuda:
            packed = torch._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, tiles)
        return packed, group, sz

    def _mm(self, a, packed, group, sz):
        mm = torch._weight_int4pack_mm if self.cuda else torch._weight_int4pack_mm_for_cpu
        return mm(a.contiguous(), packed, group, sz)

    def grouped(self, a, plan, which):
        if "counts" not in plan.cache:
            plan.cache["counts"] = plan.counts.tolist()
        out, start = None, 0
        for e, c in enumerate(plan.cache["counts"]):
            if c:
                y = self._mm(a[start:start + c], *self.q[which][e])
                if out is None:
                    out = a.new_empty(a.shape[0], y.shape[1])
                out[start:start + c] = y
                start += c
        return out

    def dense(self, a, which):
        return self._mm(a, *self.q[which][0])


def mxfp4_unavailable() -> str:
    """Why no MXFP4 peer runs (none is wired: see README)."""
    if importlib.util.find_spec("triton_kernels") is not None:
        return ("triton_kernels is installed, but this script has no MXFP4 peer wired to its "
                "matmul_ogs (the API changes between releases)")
    return ("no MXFP4 MoE kernel here: transformers' MXFP4 experts fetch "
            "kernels-community/gpt-oss-triton-kernels from the Hub, and triton_kernels is "
            "not installed")
