//! Activation family: row softmax, gated activations on a gate/up pair, elementwise activations.

mod gated;
pub mod reference;

pub use gated::{Act, GateLayout, GatedAct, act_into, gated_act_into};

use cudarc::driver::LaunchConfig;

use crate::check::Tolerance;
use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::SoftmaxParams;

/// The widest row [`softmax`] takes.
pub const MAX_COLS: i32 = 1 << 30;

/// Softmax over the last dimension of `x`, computed in f32 and stored in `T`.
///
/// NaN or +inf anywhere in a row makes the whole row NaN, and a row of only -inf is NaN, as
/// `torch.softmax` does.
pub fn softmax<T: Float>(dev: &Device, x: &Tensor<T>) -> Result<Tensor<T>> {
    let mut out = dev.zeros::<T>(x.shape())?;
    softmax_into(dev, &mut out, x)?;
    Ok(out)
}

/// [`softmax`] into a caller-owned `out` of the same shape as `x`.
pub fn softmax_into<T: Float>(dev: &Device, out: &mut Tensor<T>, x: &Tensor<T>) -> Result<()> {
    const OP: &str = "softmax";
    let (rows, cols) = x.rows_cols(OP, "x")?;
    if out.shape() != x.shape() {
        return Err(Error::shape(
            OP,
            "out",
            format!("shape {:?} (as x)", x.shape()),
            format!("{:?}", out.shape()),
        ));
    }
    x.check_device(OP, "x", dev)?;
    out.check_device(OP, "out", dev)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rows_i32: i32 = rows.try_into().map_err(|_| {
        Error::shape(
            OP,
            "x",
            format!("at most {} rows", i32::MAX),
            format!("{rows} rows"),
        )
    })?;
    // The kernel's column counters are 32-bit and step past cols by up to a block of vectors.
    let cols_i32: i32 = cols
        .try_into()
        .ok()
        .filter(|&c: &i32| c <= MAX_COLS)
        .ok_or_else(|| {
            Error::shape(
                OP,
                "x",
                format!("a last dimension of at most {MAX_COLS}"),
                format!("{cols}"),
            )
        })?;

    let elem = std::mem::size_of::<T>();
    let vec_elems = 16 / elem;
    let in_ptr = x.device_ptr(dev);
    let out_ptr = out.device_ptr_mut(dev);
    let aligned =
        in_ptr.is_multiple_of(16) && out_ptr.is_multiple_of(16) && (cols * elem).is_multiple_of(16);
    let vec = if aligned { vec_elems } else { 1 };
    let threads = cols.div_ceil(vec).next_multiple_of(32).clamp(32, 1024);

    let params = SoftmaxParams {
        out: out_ptr,
        inp: in_ptr,
        out_stride: cols_i32.into(),
        in_stride: cols_i32.into(),
        rows: rows_i32,
        cols: cols_i32,
        vec: vec.try_into().expect("vec is 1, 4 or 8"),
        pad_: 0,
    };
    let name = format!("softmax_{}", T::DTYPE.name());
    let func = dev.function(OP, Module::Activation, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (rows.try_into().expect("checked above"), 1, 1),
        block_dim: (threads.try_into().expect("clamped to 1024"), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `softmax_{dtype}` takes one SoftmaxParams by value, mirrored in src/params.rs. Both
    // pointers address rows*cols elements of T (shapes checked equal above) on this device's
    // context. Block r touches only row r < rows = grid.x; columns stay below cols; vector
    // access is chosen only when both base pointers and the row pitch are 16-byte aligned. The
    // grid (rows <= i32::MAX) and block (32..=1024 threads, a multiple of 32 as block_merge
    // needs) are within the limits of every supported architecture.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// The error the f32 kernel may show against the f64 reference rounded to `T`: one rounding to
/// `T`, plus the f32 sum over a row of `cols` (a few f32 ulps per doubling of the row, which a
/// sequential-then-tree reduction keeps), in units of `T`.
pub fn softmax_tolerance<T: Float>(cols: usize) -> Tolerance {
    let f32_err = 8.0 * f64::from(f32::EPSILON) * (cols.max(2) as f64).log2();
    Tolerance::ulps::<T>(1.0 + f32_err / T::EPSILON)
}
