//! CPU references for the activation family: plain loops, f64 arithmetic.

/// Softmax of each row of a row-major `[rows, cols]` matrix.
///
/// Written from the definition: m = max(x), e = exp(x - m), y = e / sum(e). NaN propagates the
/// way the IEEE operations take it: a NaN or +inf in the row makes every output NaN, and a row of
/// only -inf gives 0/0 = NaN, as torch.softmax does.
/// A trailing partial row is treated as a row of its own; `cols == 0` gives an empty result.
pub fn softmax(x: &[f64], cols: usize) -> Vec<f64> {
    if cols == 0 {
        return Vec::new();
    }
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        // f64::max ignores NaN; fold with a comparison that keeps it.
        let m = row.iter().fold(
            f64::NEG_INFINITY,
            |m, &v| if v > m || v.is_nan() { v } else { m },
        );
        let e: Vec<f64> = row.iter().map(|&v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        y.extend(e.iter().map(|&v| v / s));
    }
    y
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// GELU, exact: 0.5 x (1 + erf(x / sqrt(2))).
pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// gpt-oss's clamped SwiGLU: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),
/// g' = min(g, limit).
pub fn gpt_oss_swiglu(g: f64, u: f64, alpha: f64, limit: f64) -> f64 {
    // torch.clamp keeps NaN; f64::min would drop it.
    let g = if g > limit { limit } else { g };
    let u = u.clamp(-limit, limit);
    (u + 1.0) * g * sigmoid(alpha * g)
}

pub fn relu(x: f64) -> f64 {
    if x > 0.0 || x.is_nan() { x } else { 0.0 }
}
