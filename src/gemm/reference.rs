//! CPU reference for the grouped GEMM: plain loops, f64 accumulation.

use super::{Epilogue, ScaleAt};
use crate::activation::GateLayout;

/// The operands and options of one grouped GEMM, in f64.
pub struct GroupedGemmRef<'a> {
    /// `[P, Kd]` rows.
    pub a: &'a [f64],
    /// `[E, N, Kd]`.
    pub w: &'a [f64],
    /// `[E, N]`.
    pub bias: Option<&'a [f64]>,
    pub n: usize,
    pub kdim: usize,
    /// `[P]` expert of each row, -1 for a row no block computes.
    pub row_experts: &'a [i32],
    /// `[P]` routing weight of each row (0 for padding) and where it applies.
    pub row_scale: Option<(&'a [f64], ScaleAt)>,
    pub epilogue: Epilogue,
}

/// The output row of every computed row (`None` where the row's expert is -1).
pub fn grouped_gemm(g: &GroupedGemmRef) -> Vec<Option<Vec<f64>>> {
    let (n, kd) = (g.n, g.kdim);
    let gated = match g.epilogue {
        Epilogue::Gated { layout, .. } => Some(layout),
        _ => None,
    };
    let n_out = if gated.is_some() { n / 2 } else { n };
    g.row_experts
        .iter()
        .enumerate()
        .map(|(r, &e)| {
            let e = usize::try_from(e).ok()?;
            let a = &g.a[r * kd..(r + 1) * kd];
            let (s, at) = g
                .row_scale
                .map_or((1.0, ScaleAt::Output), |(s, at)| (s[r], at));
            let s_in = if at == ScaleAt::Input { s } else { 1.0 };
            // The pre-activation value of weight row j.
            let z = |j: usize| -> f64 {
                let w = &g.w[(e * n + j) * kd..(e * n + j + 1) * kd];
                let dot: f64 = a.iter().zip(w).map(|(x, y)| x * y).sum();
                s_in * dot + g.bias.map_or(0.0, |b| b[e * n + j])
            };
            let row = (0..n_out)
                .map(|j| {
                    let v = match (g.epilogue, gated) {
                        (Epilogue::Gated { act, .. }, Some(layout)) => {
                            let (gate, up) = match layout {
                                GateLayout::GateFirst => (j, n_out + j),
                                GateLayout::UpFirst => (n_out + j, j),
                                GateLayout::Interleaved => (2 * j, 2 * j + 1),
                            };
                            act.eval(z(gate), z(up))
                        }
                        (Epilogue::Act(act), _) => act.eval(z(j)),
                        _ => z(j),
                    };
                    if at == ScaleAt::Output { v * s } else { v }
                })
                .collect();
            Some(row)
        })
        .collect()
}
