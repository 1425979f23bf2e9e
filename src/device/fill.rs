//! Seeded uniform fills on the device, for weights of real model shapes in benches.

use cudarc::driver::LaunchConfig;

use super::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::FillParams;

/// The value `fill_uniform` writes at index `i`, before rounding to the dtype: the host twin of
/// the kernel, for tests and for host copies of device-filled weights.
pub fn uniform_at(seed: u64, i: u64, lo: f32, hi: f32) -> f32 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
    // One rounding, as the kernel's fmaf.
    (hi - lo).mul_add(u, lo)
}

impl Device {
    /// Fills `t` with `lo + (hi - lo) u`, u uniform in [0, 1) from a hash of (seed, index), on the
    /// stream. Element i equals [`uniform_at`] rounded to `T`.
    pub fn fill_uniform<T: Float>(
        &self,
        t: &mut Tensor<T>,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        const OP: &str = "fill_uniform";
        t.check_device(OP, "t", self)?;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(Error::shape(
                OP,
                "lo, hi",
                "finite bounds with lo <= hi",
                format!("{lo}, {hi}"),
            ));
        }
        let n = t.numel();
        if n == 0 {
            return Ok(());
        }
        let func = self.function(OP, Module::Fill, &format!("fill_uniform_{}", T::DTYPE))?;
        let params = FillParams {
            out: t.device_ptr_mut(self),
            n: n as i64,
            seed,
            lo,
            hi,
        };
        let blocks = n.div_ceil(256).min(65_535 * 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `fill_uniform_{dtype}` takes one FillParams (mirrored in src/params.rs) and
        // writes out[i] for i < n only (grid-stride loop); out holds n elements of T, the dtype
        // named by the kernel.
        unsafe { self.launch(OP, &func, cfg, &params) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::uniform_at;

    /// Pinned values: other programs (benches/peers) rebuild the bench weights from these rules.
    #[test]
    fn uniform_at_is_pinned() {
        let got: Vec<f32> = [(1u64, 0u64), (1, 1), (1 << 32 | 1, 12_345), (u64::MAX, 7)]
            .iter()
            .map(|&(s, i)| uniform_at(s, i, -1.0, 1.0))
            .collect();
        assert_eq!(got, [-0.323_666_8, 0.133_123_04, 0.873_964_2, 0.885_228_63]);
    }
}
