//! The crate on candle tensors (the `candle` feature): the MoE block, routing, the plan and the
//! grouped GEMM run on tensors of a candle CUDA device, on that device's stream, with no copy.
//!
//! candle-core 0.11 and this crate share cudarc 0.19, so a candle `CudaStorage` holds the very
//! `CudaSlice` a [`TensorView`] borrows: the crate reads candle's memory where it is, and hands
//! its own outputs to candle by moving the buffer into a `CudaStorage`. [`device`] puts the
//! crate's work on the candle device's stream, so the two order without events or host waits.
//!
//! ```ignore
//! let cdev = candle_core::Device::new_cuda(0)?;
//! let block = moe_kernels::candle::MoeBlock::open(&cdev, dir, layer, DType::BF16, 256)?;
//! let y = block.forward(&x)?;                       // x, y: candle [T, H] bf16 tensors
//! ```
//!
//! Only contiguous tensors are taken (a strided one is refused by name; call `.contiguous()`).

use std::path::Path;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{self as cc, CudaStorage, Layout, Storage};
use cudarc::driver::CudaView;
use half::{bf16, f16};

use crate::device::{Tensor, TensorView, TensorViewMut};
use crate::gemm::{GemmOptions, GemmRows, GemmVersion};
use crate::layer::{LayerWeights, MoeConfig, MoeLayer};
use crate::permute::Plan;
use crate::routing::RouterConfig;
use crate::{Device, Elem, Error, Float, Result};

/// The element types candle and the crate share.
pub trait CandleElem: Elem + cc::cuda_backend::CudaDType + cc::WithDType {}
impl<T: Elem + cc::cuda_backend::CudaDType + cc::WithDType> CandleElem for T {}

/// The crate's device on `d`'s CUDA stream: the crate's work orders with candle's.
pub fn device(d: &cc::Device) -> Result<Device> {
    let cd = cuda_device("candle::device", "d", d)?;
    Device::from_stream(cd.cuda_stream())
}

fn cuda_device<'a>(
    op: &'static str,
    arg: &'static str,
    d: &'a cc::Device,
) -> Result<&'a cc::CudaDevice> {
    match d {
        cc::Device::Cuda(cd) => Ok(cd),
        other => Err(Error::shape(
            op,
            arg,
            "a candle CUDA device",
            format!("{:?}", other.location()),
        )),
    }
}

fn candle_err(op: &'static str, e: cc::Error) -> Error {
    Error::Unsupported {
        op,
        what: format!("candle: {e}"),
    }
}

/// The contiguous element range `[start, end)` of a tensor's storage, refusing a strided one.
fn range(op: &'static str, arg: &'static str, l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        Error::shape(
            op,
            arg,
            "a contiguous candle tensor (call .contiguous())",
            format!("strides {:?} for shape {:?}", l.stride(), l.dims()),
        )
    })
}

fn slice_of<'s, T: CandleElem>(
    op: &'static str,
    arg: &'static str,
    s: &'s CudaStorage,
    l: &Layout,
) -> Result<CudaView<'s, T>> {
    let (start, end) = range(op, arg, l)?;
    let all = s.as_cuda_slice::<T>().map_err(|_| {
        Error::shape(
            op,
            arg,
            format!("a {:?} tensor", <T as cc::WithDType>::DTYPE),
            format!("{:?}", s.dtype()),
        )
    })?;
    Ok(all.slice(start..end))
}

/// Runs `f` on a borrowed view of the candle tensor `t` (no copy): `t` must be contiguous, on a
/// CUDA device of `dev`'s context, of element type `T`.
pub fn with_view<T: CandleElem, R>(
    dev: &Device,
    op: &'static str,
    arg: &'static str,
    t: &cc::Tensor,
    f: impl FnOnce(&Tensor<T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::shape(
            op,
            arg,
            "a tensor on a candle CUDA device",
            format!("one on {:?}", t.device().location()),
        ));
    };
    let v = slice_of::<T>(op, arg, s, layout)?;
    let view = TensorView::from_cuda(dev, &v, layout.dims())?;
    f(&view)
}

/// Hands the crate's tensor to candle as a tensor of `d` without a copy: its buffer becomes
/// the candle tensor's storage.
pub fn into_candle<T: CandleElem>(t: Tensor<T>, d: &cc::CudaDevice) -> cc::Tensor {
    let shape = t.shape().to_vec();
    let storage = CudaStorage::wrap_cuda_slice(t.into_buf(), d.clone());
    cc::Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Routes candle `logits [T, E]` (bf16, f16 or f32) by `cfg`, with DeepSeek-V3's correction
/// `bias [E]` (f32) where the rule takes one. Returns candle `(ids [T, K] i32, weights [T, K]
/// f32)`, made by the routing kernel on the logits' memory.
pub fn route(
    dev: &Device,
    logits: &cc::Tensor,
    cfg: &RouterConfig,
    bias: Option<&cc::Tensor>,
) -> Result<(cc::Tensor, cc::Tensor)> {
    const OP: &str = "candle::route";
    let cd = cuda_device(OP, "logits", logits.device())?;
    fn go<T: CandleElem + Float>(
        dev: &Device,
        logits: &cc::Tensor,
        cfg: &RouterConfig,
        bias: Option<&cc::Tensor>,
    ) -> Result<(Tensor<i32>, Tensor<f32>)> {
        with_view::<T, _>(dev, OP, "logits", logits, |l| match bias {
            None => crate::routing::route(dev, l, cfg, None),
            Some(b) => with_view::<f32, _>(dev, OP, "bias", b, |b| {
                crate::routing::route(dev, l, cfg, Some(b))
            }),
        })
    }
    let (ids, weights) = match logits.dtype() {
        cc::DType::BF16 => go::<bf16>(dev, logits, cfg, bias)?,
        cc::DType::F16 => go::<f16>(dev, logits, cfg, bias)?,
        cc::DType::F32 => go::<f32>(dev, logits, cfg, bias)?,
        other => {
            return Err(Error::shape(
                OP,
                "logits",
                "bf16, f16 or f32",
                format!("{other:?}"),
            ));
        }
    };
    Ok((into_candle(ids, cd), into_candle(weights, cd)))
}

/// Builds `plan` from candle expert `ids [T, K]` (i32), on the device, with no copy.
pub fn build_plan(dev: &Device, plan: &mut Plan, ids: &cc::Tensor) -> Result<()> {
    with_view::<i32, _>(dev, "candle::build_plan", "ids", ids, |ids| {
        plan.build(dev, ids)
    })
}

/// The grouped GEMM of [`crate::gemm::grouped_gemm_version_into`] on candle tensors: `rows` is
/// the plan's padded rows `[P, Kd]` (`GemmRows::Gathered`) or, for v2, the layer input
/// `[T, Kd]` read through the plan (`indexed`); `w [E, N, Kd]`; optional `bias [E, N]` and
/// routing `weights [T, K]` (f32) where `opts` places them. Returns a new candle tensor
/// `[P, N_out]` in `T`.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm<T: CandleElem + Float>(
    dev: &Device,
    rows: &cc::Tensor,
    indexed: bool,
    w: &cc::Tensor,
    plan: &Plan,
    opts: CandleGemmOptions<'_>,
    n_out: usize,
    version: GemmVersion,
) -> Result<cc::Tensor> {
    const OP: &str = "candle::grouped_gemm";
    let cd = cuda_device(OP, "rows", rows.device())?;
    let p = plan.rows(crate::permute::Layout::Padded);
    let mut out = dev.zeros::<T>(&[p, n_out])?;
    with_view::<T, _>(dev, OP, "rows", rows, |a| {
        with_view::<T, _>(dev, OP, "w", w, |w| {
            let mut run = |bias: Option<&Tensor<T>>, rw: Option<&Tensor<f32>>| {
                let rows = if indexed {
                    GemmRows::Indexed(a)
                } else {
                    GemmRows::Gathered(a)
                };
                let o = GemmOptions {
                    bias,
                    epilogue: opts.epilogue,
                    row_weights: rw.map(|r| (r, opts.weights_at)),
                };
                crate::gemm::grouped_gemm_version_into(dev, &mut out, rows, w, plan, o, version)
            };
            match (opts.bias, opts.row_weights) {
                (None, None) => run(None, None),
                (Some(b), None) => with_view::<T, _>(dev, OP, "bias", b, |b| run(Some(b), None)),
                (None, Some(r)) => {
                    with_view::<f32, _>(dev, OP, "row_weights", r, |r| run(None, Some(r)))
                }
                (Some(b), Some(r)) => with_view::<T, _>(dev, OP, "bias", b, |b| {
                    with_view::<f32, _>(dev, OP, "row_weights", r, |r| run(Some(b), Some(r)))
                }),
            }
        })
    })?;
    Ok(into_candle(out, cd))
}

/// [`GemmOptions`] with candle tensors.
#[derive(Clone, Copy, Debug)]
pub struct CandleGemmOptions<'a> {
    pub bias: Option<&'a cc::Tensor>,
    pub epilogue: crate::gemm::Epilogue,
    pub row_weights: Option<&'a cc::Tensor>,
    pub weights_at: crate::gemm::ScaleAt,
}

impl Default for CandleGemmOptions<'_> {
    fn default() -> Self {
        CandleGemmOptions {
            bias: None,
            epilogue: crate::gemm::Epilogue::None,
            row_weights: None,
            weights_at: crate::gemm::ScaleAt::Output,
        }
    }
}

enum Block {
    Bf16(MoeLayer<bf16>),
    F16(MoeLayer<f16>),
}

/// The crate's MoE block on a candle CUDA device: weights uploaded once, then each forward on
/// candle tensors `[T, H]` of the block's dtype, on the device's stream.
pub struct MoeBlock {
    dev: Device,
    cdev: cc::CudaDevice,
    block: Mutex<Block>,
    hidden: usize,
}

impl MoeBlock {
    /// The block of `cfg` and `w` on `d`, computing in `dtype` (BF16 or F16), for up to
    /// `max_tokens` tokens per forward.
    pub fn new<S: Float>(
        d: &cc::Device,
        cfg: &MoeConfig,
        w: &LayerWeights<S>,
        dtype: cc::DType,
        max_tokens: usize,
    ) -> Result<Self> {
        const OP: &str = "candle::MoeBlock::new";
        let cdev = cuda_device(OP, "d", d)?.clone();
        let dev = device(d)?;
        let block = match dtype {
            cc::DType::BF16 => Block::Bf16(MoeLayer::new(&dev, cfg, w, max_tokens)?),
            cc::DType::F16 => Block::F16(MoeLayer::new(&dev, cfg, w, max_tokens)?),
            other => {
                return Err(Error::shape(
                    OP,
                    "dtype",
                    "BF16 or F16",
                    format!("{other:?}"),
                ));
            }
        };
        Ok(MoeBlock {
            dev,
            cdev,
            block: Mutex::new(block),
            hidden: cfg.hidden,
        })
    }

    /// Decoder layer `layer` of the Hugging Face folder `dir`.
    pub fn open(
        d: &cc::Device,
        dir: &Path,
        layer: usize,
        dtype: cc::DType,
        max_tokens: usize,
    ) -> Result<Self> {
        let model = crate::model::Model::open(dir)?;
        let (cfg, w) = model.load_layer::<f32>(layer)?;
        Self::new(d, &cfg, &w, dtype, max_tokens)
    }

    /// The crate's device the block runs on (its `work_counts` count the block's work).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// `y = block(x)` as a new candle tensor `[T, H]`: one output allocation, no copy.
    pub fn forward(&self, x: &cc::Tensor) -> Result<cc::Tensor> {
        let (t, h) = x.dims2().map_err(|_| {
            Error::shape(
                "candle::MoeBlock::forward",
                "x",
                "[T, H]",
                format!("{:?}", x.dims()),
            )
        })?;
        let mut block = self.block.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *block {
            Block::Bf16(l) => self.forward_as(l, x, t, h),
            Block::F16(l) => self.forward_as(l, x, t, h),
        }
    }

    fn forward_as<T: CandleElem + Float>(
        &self,
        l: &mut MoeLayer<T>,
        x: &cc::Tensor,
        t: usize,
        h: usize,
    ) -> Result<cc::Tensor> {
        let mut y = self.dev.zeros::<T>(&[t, h])?;
        with_view(&self.dev, "candle::MoeBlock::forward", "x", x, |xv| {
            l.forward_into(&self.dev, &mut y, xv)
        })?;
        Ok(into_candle(y, &self.cdev))
    }

    /// [`MoeBlock::forward`] with the routing given: candle `ids [T, K]` (i32, -1 for an unused
    /// slot) and `weights [T, K]` (f32) on this block's device, used instead of the block's
    /// router as [`crate::layer::ForwardOptions::routing`] describes. Waits for the stream and
    /// returns an `Err` naming `topk_ids` or `topk_weights` where the device check found ids
    /// out of range or repeated, or weights that are not finite.
    pub fn forward_routed(
        &self,
        x: &cc::Tensor,
        ids: &cc::Tensor,
        weights: &cc::Tensor,
    ) -> Result<cc::Tensor> {
        const OP: &str = "candle::MoeBlock::forward_routed";
        let (t, h) = x
            .dims2()
            .map_err(|_| Error::shape(OP, "x", "[T, H]", format!("{:?}", x.dims())))?;
        let mut block = self.block.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *block {
            Block::Bf16(l) => self.forward_routed_as(l, x, ids, weights, t, h),
            Block::F16(l) => self.forward_routed_as(l, x, ids, weights, t, h),
        }
    }

    fn forward_routed_as<T: CandleElem + Float>(
        &self,
        l: &mut MoeLayer<T>,
        x: &cc::Tensor,
        ids: &cc::Tensor,
        weights: &cc::Tensor,
        t: usize,
        h: usize,
    ) -> Result<cc::Tensor> {
        const OP: &str = "candle::MoeBlock::forward_routed";
        let mut y = self.dev.zeros::<T>(&[t, h])?;
        with_view(&self.dev, OP, "x", x, |xv| {
            with_view::<i32, _>(&self.dev, OP, "topk_ids", ids, |iv| {
                with_view::<f32, _>(&self.dev, OP, "topk_weights", weights, |wv| {
                    let opts = crate::layer::ForwardOptions {
                        routing: Some((iv, wv)),
                        mask_index: None,
                        adapter_ids: None,
                    };
                    l.forward_with(&self.dev, &mut y, xv, opts)
                })
            })
        })?;
        l.check(&self.dev)?;
        Ok(into_candle(y, &self.cdev))
    }

    /// Sets the block's expert masks ([`MoeLayer::set_expert_masks`]): mask 0 removes its
    /// experts from every token's routing in later forwards; none turns masking off.
    pub fn set_expert_masks(&self, masks: &[&[usize]]) -> Result<()> {
        let mut block = self.block.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *block {
            Block::Bf16(l) => l.set_expert_masks(&self.dev, masks),
            Block::F16(l) => l.set_expert_masks(&self.dev, masks),
        }
    }

    /// `y = block(x)` into the existing candle tensor `y [T, H]`, in place: no allocation and no
    /// copy (candle's in-place op hands over `y`'s storage for writing).
    pub fn forward_into(&self, y: &cc::Tensor, x: &cc::Tensor) -> Result<()> {
        const OP: &str = "candle::MoeBlock::forward_into";
        cuda_device(OP, "y", y.device())?;
        cuda_device(OP, "x", x.device())?;
        let op = ForwardInto {
            block: self,
            err: Mutex::new(None),
        };
        let r = y.inplace_op2(x, &op);
        if let Some(e) = op.err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        r.map_err(|e| candle_err(OP, e))
    }

    /// Hidden size H.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

/// The in-place op behind [`MoeBlock::forward_into`]: the crate's error is kept, so that the
/// caller gets it whole rather than as candle's message.
struct ForwardInto<'b> {
    block: &'b MoeBlock,
    err: Mutex<Option<Error>>,
}

impl ForwardInto<'_> {
    fn run<T: CandleElem + Float>(
        &self,
        l: &mut MoeLayer<T>,
        y: &mut CudaStorage,
        yl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<()> {
        const OP: &str = "candle::MoeBlock::forward_into";
        let dev = &self.block.dev;
        let xs = slice_of::<T>(OP, "x", x, xl)?;
        let xv = TensorView::from_cuda(dev, &xs, xl.dims())?;
        let (start, end) = range(OP, "y", yl)?;
        let all = y.as_cuda_slice_mut::<T>().map_err(|_| {
            Error::shape(
                OP,
                "y",
                format!("a {:?} tensor", <T as cc::WithDType>::DTYPE),
                format!("{:?}", x.dtype()),
            )
        })?;
        let mut ys = all.slice_mut(start..end);
        let mut yv = TensorViewMut::from_cuda(dev, &mut ys, yl.dims())?;
        l.forward_into(dev, &mut yv, &xv)
    }
}

impl cc::InplaceOp2 for ForwardInto<'_> {
    fn name(&self) -> &'static str {
        "moe_kernels::candle::MoeBlock::forward_into"
    }

    fn cpu_fwd(
        &self,
        _: &mut cc::CpuStorage,
        _: &Layout,
        _: &cc::CpuStorage,
        _: &Layout,
    ) -> cc::Result<()> {
        // Refused before candle is asked (MoeBlock::forward_into checks both devices).
        cc::bail!("{}: CPU tensors", self.name())
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        x: &CudaStorage,
        xl: &Layout,
    ) -> cc::Result<()> {
        let mut block = self.block.block.lock().unwrap_or_else(|p| p.into_inner());
        let r = match &mut *block {
            Block::Bf16(l) => self.run(l, dst, dst_l, x, xl),
            Block::F16(l) => self.run(l, dst, dst_l, x, xl),
        };
        r.map_err(|e| {
            let msg = e.to_string();
            *self.err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            cc::Error::Msg(msg)
        })
    }
}
