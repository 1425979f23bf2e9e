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
