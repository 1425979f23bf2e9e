//! moe-kernels' C ABI (`include/moe_kernels.h`): one MoE block of a Hugging Face checkpoint,
//! opened on a CUDA stream of the caller's and run on the caller's device buffers through
//! borrowed views, with no copy.
//!
//! Every function returns a [`Status`] and keeps the thread's last error message for
//! [`moe_last_error`]; a panic inside is caught and reported as `MOE_ERROR_PANIC`, never let
//! through the boundary.

#![allow(clippy::missing_safety_doc)] // the header states each function's contract

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use half::{bf16, f16};
use moe_kernels::device::{TensorView, TensorViewMut};
use moe_kernels::layer::{ForwardOptions, MoeConfig, MoeLayer, reference};
use moe_kernels::model::Model;
use moe_kernels::{Device, Error, Float};

/// `moe_status` in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Null = 1,
    Argument = 2,
    Checkpoint = 3,
    Unsupported = 4,
    NoDevice = 5,
    Cuda = 6,
    DeviceCheck = 7,
    Panic = 8,
}

/// `moe_dtype` in the header.
pub const DTYPE_BF16: i32 = 0;
pub const DTYPE_F16: i32 = 1;

thread_local! {
    static LAST: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = c);
}

fn status_of(e: &Error) -> Status {
    match e {
        Error::NoDriver | Error::NoDevice(_) | Error::KernelsNotBuilt { .. } => Status::NoDevice,
        Error::Shape { .. } => Status::Argument,
        Error::Unsupported { .. } => Status::Unsupported,
        Error::DeviceCheck { .. } => Status::DeviceCheck,
        Error::Checkpoint { .. } => Status::Checkpoint,
        Error::Driver { .. } => Status::Cuda,
    }
}

/// Runs `f`, turning its error or panic into a status and the thread's last message.
fn guard(f: impl FnOnce() -> Result<(), (Status, String)>) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last("");
            Status::Ok
        }
        Ok(Err((s, msg))) => {
            set_last(&msg);
            s
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            set_last(&format!("moe-kernels: internal error (panic): {what}"));
            Status::Panic
        }
    }
}

fn crate_err(e: Error) -> (Status, String) {
    (status_of(&e), e.to_string())
}

fn null(func: &str, arg: &str) -> (Status, String) {
    (
        Status::Null,
        format!("{func}: argument `{arg}`: expected a pointer, got NULL"),
    )
}

fn arg(
    func: &str,
    name: &str,
    expected: impl std::fmt::Display,
    got: impl std::fmt::Display,
) -> (Status, String) {
    (
        Status::Argument,
        format!("{func}: argument `{name}`: expected {expected}, got {got}"),
    )
}

/// The layer in its compute dtype.
enum Block {
    Bf16(MoeLayer<bf16>),
    F16(MoeLayer<f16>),
}

/// `moe_layer` in the header.
pub struct Layer {
    dev: Device,
    block: Block,
    model: Model,
    layer: usize,
    cfg: MoeConfig,
}

/// The thread's last error message, `""` when the last call succeeded.
#[unsafe(no_mangle)]
pub extern "C" fn moe_last_error() -> *const c_char {
    LAST.with(|l| l.borrow().as_ptr())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_open(
    model_dir: *const c_char,
    layer: i32,
    device: i32,
    stream: *mut c_void,
    dtype: i32,
    max_tokens: i64,
    out: *mut *mut Layer,
) -> Status {
    const F: &str = "moe_layer_open";
    guard(|| {
        if out.is_null() {
            return Err(null(F, "out"));
        }
        // SAFETY: non-null; cleared first so that a failed open leaves no stale pointer.
        unsafe { *out = std::ptr::null_mut() };
        if model_dir.is_null() {
            return Err(null(F, "model_dir"));
        }
        // SAFETY: a NUL-terminated string from the caller.
        let dir = unsafe { CStr::from_ptr(model_dir) }
            .to_string_lossy()
            .into_owned();
        let layer_i =
            usize::try_from(layer).map_err(|_| arg(F, "layer", "a layer index >= 0", layer))?;
        let ordinal = usize::try_from(device)
            .map_err(|_| arg(F, "device", "a device ordinal >= 0", device))?;
        let max_t = usize::try_from(max_tokens)
            .ok()
            .filter(|&t| t >= 1)
            .ok_or_else(|| arg(F, "max_tokens", ">= 1", max_tokens))?;
        if dtype != DTYPE_BF16 && dtype != DTYPE_F16 {
            return Err(arg(F, "dtype", "MOE_BF16 (0) or MOE_F16 (1)", dtype));
        }
        let dev = if stream.is_null() {
            Device::new(ordinal).map_err(crate_err)?
        } else {
            if !moe_kernels::device::driver_present() {
                return Err(crate_err(Error::NoDriver));
            }
            let ctx: Arc<CudaContext> = CudaContext::new(ordinal)
                .map_err(|source| crate_err(Error::Driver { op: F, source }))?;
            // SAFETY: this wrapper of the primary context is new and holds no buffer yet; the
            // caller keeps the stream alive while the layer lives (the header's contract).
            unsafe {
                ctx.disable_event_tracking();
                Device::from_raw_stream(&ctx, stream.cast())
            }
            .map_err(crate_err)?
        };
        let model = Model::open(Path::new(&dir)).map_err(crate_err)?;
        let (cfg, block) = if dtype == DTYPE_BF16 {
            let (cfg, w) = model.load_layer::<bf16>(layer_i).map_err(crate_err)?;
            let l = MoeLayer::new(&dev, &cfg, &w, max_t).map_err(crate_err)?;
            (cfg, Block::Bf16(l))
        } else {
            let (cfg, w) = model.load_layer::<f16>(layer_i).map_err(crate_err)?;
            let l = MoeLayer::new(&dev, &cfg, &w, max_t).map_err(crate_err)?;
            (cfg, Block::F16(l))
        };
        let l = Box::new(Layer {
            dev,
            block,
            model,
            layer: layer_i,
            cfg,
        });
        // SAFETY: non-null (checked above).
        unsafe { *out = Box::into_raw(l) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_dims(
    layer: *const Layer,
    hidden: *mut i64,
    top_k: *mut i64,
    max_tokens: *mut i64,
) -> Status {
    const F: &str = "moe_layer_dims";
    guard(|| {
        // SAFETY: a layer from moe_layer_open, or null.
        let l = unsafe { layer.as_ref() }.ok_or_else(|| null(F, "layer"))?;
        let max_t = match &l.block {
            Block::Bf16(b) => b.max_tokens(),
            Block::F16(b) => b.max_tokens(),
        };
        for (p, v, name) in [
            (hidden, l.cfg.hidden, "hidden"),
            (top_k, l.cfg.k(), "top_k"),
            (max_tokens, max_t, "max_tokens"),
        ] {
            if p.is_null() {
                return Err(null(F, name));
            }
            // SAFETY: non-null, the caller's int64.
            unsafe { *p = i64::try_from(v).unwrap_or(i64::MAX) };
        }
        Ok(())
    })
}

/// The routing controls of `moe_layer_forward_routed`: device pointers, 0 where absent.
#[derive(Clone, Copy, Default)]
struct Controls {
    given_ids: u64,
    given_weights: u64,
    mask_index: u64,
}

/// The forward in dtype `T` on raw device pointers.
fn forward<T: Float>(
    dev: &Device,
    block: &mut MoeLayer<T>,
    cfg: &MoeConfig,
    p: [u64; 4],
    t: usize,
) -> Result<(), (Status, String)> {
    forward_ex(
        "moe_layer_forward",
        dev,
        block,
        cfg,
        p,
        t,
        Controls::default(),
    )
}

/// [`forward`] with the routing controls.
fn forward_ex<T: Float>(
    func: &'static str,
    dev: &Device,
    block: &mut MoeLayer<T>,
    cfg: &MoeConfig,
    p: [u64; 4],
    t: usize,
    c: Controls,
) -> Result<(), (Status, String)> {
    let [x, y, ids, weights] = p;
    let (h, k) = (cfg.hidden, cfg.k());
    if x == 0 {
        return Err(null(func, "x"));
    }
    if y == 0 {
        return Err(null(func, "y"));
    }
    if t > block.max_tokens() {
        return Err(arg(
            func,
            "tokens",
            format!("at most {} (max_tokens)", block.max_tokens()),
            t,
        ));
    }
    if t == 0 {
        return Ok(());
    }
    // A view's refusal names the C argument it came from.
    let named = |name: &'static str| {
        move |e: Error| (status_of(&e), format!("{func}: argument `{name}`: {e}"))
    };
    // SAFETY (each view): the header's contract: the pointers address T * H (T * K) elements of
    // their dtype in the layer's device memory, live until the work on the stream is done; the
    // views check the pointer's alignment, context and allocation size before any use.
    let xv = unsafe { TensorView::<T>::from_raw(dev, x, t * h, &[t, h]) }.map_err(named("x"))?;
    let mut yv =
        unsafe { TensorViewMut::<T>::from_raw(dev, y, t * h, &[t, h]) }.map_err(named("y"))?;
    let mut idv = (ids != 0)
        .then(|| unsafe { TensorViewMut::<i32>::from_raw(dev, ids, t * k, &[t, k]) })
        .transpose()
        .map_err(named("topk_ids"))?;
    let mut wv = (weights != 0)
        .then(|| unsafe { TensorViewMut::<f32>::from_raw(dev, weights, t * k, &[t, k]) })
        .transpose()
        .map_err(named("topk_weights"))?;
    if (c.given_ids == 0) != (c.given_weights == 0) {
        return Err(arg(
            func,
            "given_ids, given_weights",
            "both device pointers, or both 0",
            format!("{:#x} and {:#x}", c.given_ids, c.given_weights),
        ));
    }
    // SAFETY (each view): as above; given ids and weights are int32 and float [T, K], the mask
    // index int32 [T].
    let giv = (c.given_ids != 0)
        .then(|| unsafe { TensorView::<i32>::from_raw(dev, c.given_ids, t * k, &[t, k]) })
        .transpose()
        .map_err(named("given_ids"))?;
    let gwv = (c.given_weights != 0)
        .then(|| unsafe { TensorView::<f32>::from_raw(dev, c.given_weights, t * k, &[t, k]) })
        .transpose()
        .map_err(named("given_weights"))?;
    let miv = (c.mask_index != 0)
        .then(|| unsafe { TensorView::<i32>::from_raw(dev, c.mask_index, t, &[t]) })
        .transpose()
        .map_err(named("mask_index"))?;
    let opts = ForwardOptions {
        routing: giv.as_deref().zip(gwv.as_deref()),
        mask_index: miv.as_deref(),
        adapter_ids: None,
    };
    block
        .forward_with(dev, &mut yv, &xv, opts)
        .map_err(crate_err)?;
    let (rid, rw) = block.routing();
    if let Some(v) = idv.as_mut() {
        dev.copy_into(v, rid).map_err(crate_err)?;
    }
    if let Some(v) = wv.as_mut() {
        dev.copy_into(v, rw).map_err(crate_err)?;
    }
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_forward(
    layer: *mut Layer,
    x: u64,
    y: u64,
    tokens: i64,
    topk_ids: u64,
    topk_weights: u64,
) -> Status {
    const F: &str = "moe_layer_forward";
    guard(|| {
        // SAFETY: a layer from moe_layer_open, or null; the caller does not share it between
        // threads during the call.
        let l = unsafe { layer.as_mut() }.ok_or_else(|| null(F, "layer"))?;
        let t = usize::try_from(tokens).map_err(|_| arg(F, "tokens", ">= 0", tokens))?;
        let p = [x, y, topk_ids, topk_weights];
        match &mut l.block {
            Block::Bf16(b) => forward(&l.dev, b, &l.cfg, p, t),
            Block::F16(b) => forward(&l.dev, b, &l.cfg, p, t),
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_forward_routed(
    layer: *mut Layer,
    x: u64,
    y: u64,
    tokens: i64,
    given_ids: u64,
    given_weights: u64,
    mask_index: u64,
) -> Status {
    const F: &str = "moe_layer_forward_routed";
    guard(|| {
        // SAFETY: a layer from moe_layer_open, or null; the caller does not share it between
        // threads during the call.
        let l = unsafe { layer.as_mut() }.ok_or_else(|| null(F, "layer"))?;
        let t = usize::try_from(tokens).map_err(|_| arg(F, "tokens", ">= 0", tokens))?;
        let p = [x, y, 0, 0];
        let c = Controls {
            given_ids,
            given_weights,
            mask_index,
        };
        match &mut l.block {
            Block::Bf16(b) => forward_ex(F, &l.dev, b, &l.cfg, p, t, c),
            Block::F16(b) => forward_ex(F, &l.dev, b, &l.cfg, p, t, c),
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_set_expert_masks(
    layer: *mut Layer,
    removed: *const i32,
    counts: *const i64,
    masks: i64,
) -> Status {
    const F: &str = "moe_layer_set_expert_masks";
    guard(|| {
        // SAFETY: a layer from moe_layer_open, or null; not shared during the call.
        let l = unsafe { layer.as_mut() }.ok_or_else(|| null(F, "layer"))?;
        let m = usize::try_from(masks).map_err(|_| arg(F, "masks", ">= 0", masks))?;
        if m > 0 && counts.is_null() {
            return Err(null(F, "counts"));
        }
        let counts: Vec<usize> = if m == 0 {
            Vec::new()
        } else {
            // SAFETY: the caller's array of `masks` int64 (non-null, checked).
            unsafe { std::slice::from_raw_parts(counts, m) }
                .iter()
                .map(|&n| usize::try_from(n).map_err(|_| arg(F, "counts", "counts >= 0", n)))
                .collect::<Result<_, _>>()?
        };
        let total: usize = counts.iter().sum();
        if total > 0 && removed.is_null() {
            return Err(null(F, "removed"));
        }
        let ids: Vec<usize> = if total == 0 {
            Vec::new()
        } else {
            let et = l.cfg.experts_total();
            // SAFETY: the caller's array of sum(counts) int32 (non-null, checked).
            unsafe { std::slice::from_raw_parts(removed, total) }
                .iter()
                .map(|&e| {
                    usize::try_from(e)
                        .ok()
                        .filter(|&v| v < et)
                        .ok_or_else(|| arg(F, "removed", format!("expert ids in [0, {et})"), e))
                })
                .collect::<Result<_, _>>()?
        };
        let mut lists: Vec<&[usize]> = Vec::with_capacity(m);
        let mut start = 0;
        for n in counts {
            lists.push(&ids[start..start + n]);
            start += n;
        }
        match &mut l.block {
            Block::Bf16(b) => b.set_expert_masks(&l.dev, &lists),
            Block::F16(b) => b.set_expert_masks(&l.dev, &lists),
        }
        .map_err(crate_err)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_check(layer: *mut Layer) -> Status {
    const F: &str = "moe_layer_check";
    guard(|| {
        // SAFETY: a layer from moe_layer_open, or null; not shared during the call.
        let l = unsafe { layer.as_mut() }.ok_or_else(|| null(F, "layer"))?;
        match &mut l.block {
            Block::Bf16(b) => b.check(&l.dev),
            Block::F16(b) => b.check(&l.dev),
        }
        .map_err(crate_err)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_forward_host(
    layer: *const Layer,
    x: *const f32,
    y: *mut f32,
    tokens: i64,
) -> Status {
    const F: &str = "moe_layer_forward_host";
    guard(|| {
        // SAFETY: a layer from moe_layer_open, or null.
        let l = unsafe { layer.as_ref() }.ok_or_else(|| null(F, "layer"))?;
        if x.is_null() {
            return Err(null(F, "x"));
        }
        if y.is_null() {
            return Err(null(F, "y"));
        }
        let t = usize::try_from(tokens).map_err(|_| arg(F, "tokens", ">= 0", tokens))?;
        let n = t
            .checked_mul(l.cfg.hidden)
            .ok_or_else(|| arg(F, "tokens", "T * H within memory", tokens))?;
        // SAFETY: the caller's arrays of T * H floats.
        let xs = unsafe { std::slice::from_raw_parts(x, n) };
        let xf: Vec<f64> = xs.iter().map(|&v| f64::from(v)).collect();
        // The block's weights as the device layer has them, rounded to its dtype.
        let f = match &l.block {
            Block::Bf16(_) => {
                let (cfg, w) = l.model.load_layer::<bf16>(l.layer).map_err(crate_err)?;
                reference::forward(&cfg, &w, &xf)
            }
            Block::F16(_) => {
                let (cfg, w) = l.model.load_layer::<f16>(l.layer).map_err(crate_err)?;
                reference::forward(&cfg, &w, &xf)
            }
        }
        .map_err(crate_err)?;
        // SAFETY: the caller's array of T * H floats.
        let ys = unsafe { std::slice::from_raw_parts_mut(y, n) };
        for (o, v) in ys.iter_mut().zip(&f.y) {
            *o = *v as f32;
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_destroy(layer: *mut Layer) {
    if layer.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a layer from moe_layer_open, destroyed once.
        let l = unsafe { Box::from_raw(layer) };
        let _ = l.dev.synchronize();
        drop(l);
    }));
}
