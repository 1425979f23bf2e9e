//! The router projection `logits = x · W_rᵀ (+ b)`, and routing straight from hidden states.

use cudarc::driver::LaunchConfig;

use super::RouterConfig;
use crate::device::{Device, Tensor};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::RouterLogitsParams;

/// Warps per block of `router_logits_*`, as `kLogitsWarps` in routing.cu.
const LOGITS_WARPS: usize = 8;

/// Tokens and experts per block of `router_logits_v3_*`, as `kLogitsTileT` / `kLogitsTileE`.
const V3_TILE_T: usize = 8;
const V3_TILE_E: usize = 8;

/// [`router_logits_into`] runs [`RouterLogitsVersion::V3`] where its grid has at least this many
/// blocks (tiles of 8 × 8), and [`RouterLogitsVersion::V2`] below. Both give the same bits, so
/// the rule changes no logit: it trades v2's spread over T·E blocks, which keeps the SMs
/// streaming at decode sizes, for v3's reading of the router weight once per 8 tokens. With
/// fewer tiles the model puts v3 behind, bound by DRAM latency on too few SMs (BENCHMARKS.md,
/// "Prefill plumbing"): Qwen3's router (E = 128) switches at T = 16, Mixtral's (E = 8) at
/// T = 256.
pub const ROUTER_V3_MIN_BLOCKS: usize = 32;

/// The version [`router_logits_into`] runs for `tokens` × `experts`.
pub fn router_logits_version_for(tokens: usize, experts: usize) -> RouterLogitsVersion {
    if tokens.div_ceil(V3_TILE_T) * experts.div_ceil(V3_TILE_E) >= ROUTER_V3_MIN_BLOCKS {
        RouterLogitsVersion::V3
    } else {
        RouterLogitsVersion::V2
    }
}

/// The kernels of [`router_logits_version_into`]; each stays selectable. All sum in an order
/// that does not depend on T, so a token's logits are the same bits in every batch; v2 and v3
/// share one order (the same bits), v1's differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RouterLogitsVersion {
    /// One warp per (token, expert): T·E/8 blocks, so E/8 SMs at T = 1.
    V1,
    /// One block of 8 warps per (token, expert), splitting H, the warps' sums added in a fixed
    /// order: T·E blocks, so at T = 1 the router's rows stream from E SMs at once.
    #[default]
    V2,
    /// v2's sums, one block per tile of 8 tokens × 8 experts: each row of x and of the router
    /// weight is read once per tile, so the weight T/8 times instead of T times.
    V3,
}

/// `out [T, E] = x [T, H] · w [E, H]ᵀ (+ bias [E])`, accumulated in f32 and rounded once to
/// `W`'s dtype: bf16 logits for a bf16 router (Mixtral, Qwen, gpt-oss), f32 for DeepSeek's f32
/// router on bf16 activations. `W` is `X` or f32. Runs the version
/// [`router_logits_version_for`] picks (v2 or v3, the same bits), as every layer path does.
pub fn router_logits_into<X: Float, W: Float>(
    dev: &Device,
    out: &mut Tensor<W>,
    x: &Tensor<X>,
    w: &Tensor<W>,
    bias: Option<&Tensor<W>>,
) -> Result<()> {
    // Shapes are checked by the call below; a wrong one only picks the version it refuses.
    let (tokens, experts) = (x.shape().first(), w.shape().first());
    let version =
        router_logits_version_for(tokens.copied().unwrap_or(0), experts.copied().unwrap_or(0));
    router_logits_version_into(dev, version, out, x, w, bias)
}

/// [`router_logits_into`] with the kernel chosen.
pub fn router_logits_version_into<X: Float, W: Float>(
    dev: &Device,
    version: RouterLogitsVersion,
    out: &mut Tensor<W>,
    x: &Tensor<X>,
    w: &Tensor<W>,
    bias: Option<&Tensor<W>>,
) -> Result<()> {
    const OP: &str = "router_logits";
    if X::DTYPE != W::DTYPE && W::DTYPE != DType::F32 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "x in {} with a router weight in {} (use {} or f32)",
                X::DTYPE,
                W::DTYPE,
                X::DTYPE
            ),
        });
    }
    let (tokens, hidden) = x.dims2(OP, "x", "[T, H]")?;
    let (experts, _) = w.dims2(OP, "w", "[E, H]")?;
    if w.shape()[1] != hidden {
        return Err(Error::shape(
            OP,
            "w",
            format!("[E, H] with H = {hidden} (x's width)"),
            format!("{:?}", w.shape()),
        ));
    }
    if out.shape() != [tokens, experts] {
        return Err(Error::shape(
            OP,
            "out",
            format!("[T, E] = [{tokens}, {experts}]"),
            format!("{:?}", out.shape()),
        ));
    }
    if let Some(b) = bias
        && b.shape() != [experts]
    {
        return Err(Error::shape(
            OP,
            "bias",
            format!("[E] = [{experts}]"),
            format!("{:?}", b.shape()),
        ));
    }
    x.check_device(OP, "x", dev)?;
    w.check_device(OP, "w", dev)?;
    out.check_device(OP, "out", dev)?;
    if let Some(b) = bias {
        b.check_device(OP, "bias", dev)?;
    }
    if tokens == 0 || experts == 0 {
        return Ok(());
    }
    // v1: a warp per pair; v2: a block per pair; v3: a block per tile of 8 x 8 pairs.
    let blocks = match version {
        RouterLogitsVersion::V1 => tokens
            .checked_mul(experts)
            .map(|p| p.div_ceil(LOGITS_WARPS)),
        RouterLogitsVersion::V2 => tokens.checked_mul(experts),
        RouterLogitsVersion::V3 => tokens
            .div_ceil(V3_TILE_T)
            .checked_mul(experts.div_ceil(V3_TILE_E)),
    };
    let blocks: u32 = blocks
        .and_then(|b| u32::try_from(b).ok())
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::shape(
                OP,
                "x",
                format!("{version:?}'s block count below 2^31"),
                format!("T={tokens}, E={experts}"),
            )
        })?;
    let as_i32 = |arg, v: usize| {
        i32::try_from(v).map_err(|_| Error::shape(OP, arg, "below 2^31", format!("{v}")))
    };
    // The kernel's column counter is 32-bit and steps past H by up to 2048.
    if hidden > 1 << 30 {
        return Err(Error::shape(OP, "x", "H at most 2^30", format!("{hidden}")));
    }
    let (x_ptr, w_ptr) = (x.device_ptr(dev), w.device_ptr(dev));
    let vec = hidden.is_multiple_of(8) && x_ptr.is_multiple_of(16) && w_ptr.is_multiple_of(16);
    let params = RouterLogitsParams {
        out: out.device_ptr_mut(dev),
        x: x_ptr,
        w: w_ptr,
        bias: bias.map_or(0, |b| b.device_ptr(dev)),
        tokens: as_i32("x", tokens)?,
        experts: as_i32("w", experts)?,
        hidden: as_i32("x", hidden)?,
        vec: i32::from(vec),
    };
    let v = match version {
        RouterLogitsVersion::V1 => "",
        RouterLogitsVersion::V2 => "v2_",
        RouterLogitsVersion::V3 => "v3_",
    };
    let name = format!("router_logits_{v}{}_{}", X::DTYPE, W::DTYPE);
    let func = dev.function(OP, Module::Routing, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * LOGITS_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `router_logits_{,v2_,v3_}{x}_{w}` takes one RouterLogitsParams (mirrored in
    // src/params.rs), instantiated for exactly the dtype pairs let through above. x is [T, H], w
    // is [E, H], out is [T, E], bias is [E] or null (all checked). v1: warp p handles pair
    // p < T * E; v2: block p (the grid is exactly T * E); pair p is row t = p / E of x and row
    // e = p % E of w, writing out[t, e]. v3: block b handles tokens 8 (b / ceil(E/8)) .. + 8
    // and experts 8 (b % ceil(E/8)) .. + 8, loading and storing only rows below T and E.
    // Vector loads of 8 elements are chosen only when H % 8 == 0 and both base pointers are
    // 16-byte aligned, so every row start is too.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// Routes from hidden states in two launches: the projection into `logits` (workspace `[T, E]`,
/// in `W`'s dtype) and the fused top-k into `ids` and `weights`.
#[allow(clippy::too_many_arguments)] // destination first, then inputs, then the configuration
pub fn route_hidden_into<X: Float, W: Float>(
    dev: &Device,
    ids: &mut Tensor<i32>,
    weights: &mut Tensor<f32>,
    logits: &mut Tensor<W>,
    x: &Tensor<X>,
    router_weight: &Tensor<W>,
    router_bias: Option<&Tensor<W>>,
    cfg: &RouterConfig,
    correction_bias: Option<&Tensor<f32>>,
) -> Result<()> {
    router_logits_into(dev, logits, x, router_weight, router_bias)?;
    super::route_into(dev, ids, weights, None, logits, cfg, correction_bias)
}
