//! The CPU LoRA deltas, f64, written from the math: `scale · B (A v)`.

use crate::activation::GateLayout;
use crate::dtype::Float;

/// One (expert, adapter)'s pairs and scale, sliced out of [`super::LoraAdapters`].
#[derive(Clone, Copy, Debug)]
pub struct Pair<'a, S> {
    /// `[2r, H]`: the gate's A, then the up's.
    pub gate_up_a: &'a [S],
    /// `[2I, r]`, rows in the block's gate layout.
    pub gate_up_b: &'a [S],
    /// `[r, I]`.
    pub down_a: &'a [S],
    /// `[H, r]`.
    pub down_b: &'a [S],
    pub scale: f64,
}

impl<S: Float> super::LoraAdapters<S> {
    /// Adapter `adapter`'s pairs on expert `expert` of `experts`, or `None` for an id outside
    /// `[0, L)` (the token runs without an adapter).
    pub fn pair(
        &self,
        adapter: i32,
        expert: usize,
        experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Option<Pair<'_, S>> {
        let a = usize::try_from(adapter)
            .ok()
            .filter(|&a| a < self.adapters)?;
        let r = self.rank;
        let i = a * experts + expert;
        fn at<S>(v: &[S], i: usize, n: usize) -> &[S] {
            &v[i * n..(i + 1) * n]
        }
        Some(Pair {
            gate_up_a: at(&self.gate_up_a, i, 2 * r * hidden),
            gate_up_b: at(&self.gate_up_b, i, 2 * inter * r),
            down_a: at(&self.down_a, i, r * inter),
            down_b: at(&self.down_b, i, hidden * r),
            scale: f64::from(self.scales[a]),
        })
    }
}

/// `A v` for `a [rows, v.len()]`.
fn shrink<S: Float>(a: &[S], v: &[f64]) -> Vec<f64> {
    a.chunks(v.len())
        .map(|row| row.iter().zip(v).map(|(w, x)| w.to_f64() * x).sum())
        .collect()
}

/// `scale · B s` for `b [rows, s.len()]`.
fn expand<S: Float>(b: &[S], s: &[f64], scale: f64) -> Vec<f64> {
    b.chunks(s.len())
        .map(|row| scale * row.iter().zip(s).map(|(w, x)| w.to_f64() * x).sum::<f64>())
        .collect()
}

impl<S: Float> Pair<'_, S> {
    /// The gate/up delta `[2I]` on `x [H]`, in the columns of `layout`.
    pub fn gate_up(&self, x: &[f64], layout: GateLayout) -> Vec<f64> {
        let s = shrink(self.gate_up_a, x);
        let r = s.len() / 2;
        let two_i = self.gate_up_b.len() / r;
        let i = two_i / 2;
        let (gate, up) = (
            expand(self.gate_up_b, &s[..r], self.scale),
            expand(self.gate_up_b, &s[r..], self.scale),
        );
        (0..two_i)
            .map(|c| {
                let is_up = match layout {
                    GateLayout::GateFirst => c >= i,
                    GateLayout::UpFirst => c < i,
                    GateLayout::Interleaved => c % 2 == 1,
                };
                if is_up { up[c] } else { gate[c] }
            })
            .collect()
    }

    /// The down delta `[H]` on the activated `h [I]`.
    pub fn down(&self, h: &[f64]) -> Vec<f64> {
        expand(self.down_b, &shrink(self.down_a, h), self.scale)
    }
}
