//! CPU reference for the permutation family, written from the definitions in `mod.rs`.

/// The routing plan of `ids [T, K]` (flat, S = T*K slots) over E GEMM experts.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanRef {
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
    pub padded_offsets: Vec<i32>,
    /// `[S]`: slots of the GEMM rows, then -1.
    pub sorted_slots: Vec<i32>,
    pub slot_rows: Vec<i32>,
    /// `[P]`: slot of each padded row, -1 for padding and past the end.
    pub padded_slots: Vec<i32>,
    pub slot_padded_rows: Vec<i32>,
    /// `[P / block_m]`.
    pub block_experts: Vec<i32>,
    /// Slots whose id is outside `[-1, E_total)`.
    pub bad_ids: usize,
}

/// P, the padded rows reserved for S slots: every segment may waste up to block_m - 1 rows.
pub fn padded_capacity(slots: usize, experts: usize, block_m: usize) -> usize {
    (slots + experts * (block_m - 1)).div_ceil(block_m) * block_m
}

pub fn plan(ids: &[i32], experts: usize, experts_total: usize, block_m: usize) -> PlanRef {
    let s = ids.len();
    let gemm_id = |id: i32| usize::try_from(id).ok().filter(|&e| e < experts);
    let bad_ids = ids
        .iter()
        .filter(|&&id| id < -1 || usize::try_from(id).is_ok_and(|e| e >= experts_total))
        .count();
    let mut counts = vec![0i32; experts];
    for &id in ids {
        if let Some(e) = gemm_id(id) {
            counts[e] += 1;
        }
    }
    let (mut offsets, mut padded_offsets) = (vec![0i32; experts + 1], vec![0i32; experts + 1]);
    for e in 0..experts {
        let padded = (counts[e] as usize).div_ceil(block_m) * block_m;
        offsets[e + 1] = offsets[e] + counts[e];
        padded_offsets[e + 1] = padded_offsets[e] + padded as i32;
    }
    let p = padded_capacity(s, experts, block_m);
    let mut plan = PlanRef {
        counts,
        offsets: offsets.clone(),
        padded_offsets: padded_offsets.clone(),
        sorted_slots: vec![-1; s],
        slot_rows: vec![-1; s],
        padded_slots: vec![-1; p],
        slot_padded_rows: vec![-1; s],
        block_experts: vec![-1; p / block_m],
        bad_ids,
    };
    // Stable: visiting slots in order appends each to its expert's segment in token order.
    let mut fill = vec![0i32; experts];
    for (slot, &id) in ids.iter().enumerate() {
        let Some(e) = gemm_id(id) else { continue };
        let (row, prow) = (offsets[e] + fill[e], padded_offsets[e] + fill[e]);
        fill[e] += 1;
        plan.sorted_slots[row as usize] = slot as i32;
        plan.slot_rows[slot] = row;
        plan.padded_slots[prow as usize] = slot as i32;
        plan.slot_padded_rows[slot] = prow;
    }
    for (b, owner) in plan.block_experts.iter_mut().enumerate() {
        let row = (b * block_m) as i32;
        if let Some(e) =
            (0..experts).find(|&e| padded_offsets[e] <= row && row < padded_offsets[e + 1])
        {
            *owner = e as i32;
        }
    }
    plan
}

/// Rows `out[r] = x[row_slots[r] / K]`; rows without a slot are `None`.
pub fn gather(x: &[f64], hidden: usize, row_slots: &[i32], k: usize) -> Vec<Option<Vec<f64>>> {
    row_slots
        .iter()
        .map(|&s| {
            let t = usize::try_from(s).ok()? / k;
            Some(x[t * hidden..(t + 1) * hidden].to_vec())
        })
        .collect()
}

/// What the combine adds besides the routed experts.
#[derive(Clone, Copy, Debug, Default)]
pub struct CombineExtras<'a> {
    /// `[T, H]` the layer input, read by copy experts.
    pub x: Option<&'a [f64]>,
    /// `[E_total - E]`: 0 zero expert, 1 copy expert, 2 constant expert.
    pub zc_kinds: Option<&'a [i32]>,
    /// `[E_total - E, 2, H]` constant experts' mixing weights W_z.
    pub const_w: Option<&'a [f64]>,
    /// `[E_total - E, H]` constant experts' vectors v_z.
    pub const_v: Option<&'a [f64]>,
    /// `[T, H]` shared-expert output.
    pub shared: Option<&'a [f64]>,
    /// `[T]` shared-expert gate logits; the combine applies the sigmoid.
    pub shared_gate: Option<&'a [f64]>,
    /// `[T, H]`.
    pub residual: Option<&'a [f64]>,
}

/// `y[t] = sum_k w[t,k] * c(t,k) + sigmoid(gate[t]) * shared[t] + residual[t]` where c is the
/// expert output row `expert_out[slot_rows[t*K+k]]`, `x[t]` for a copy expert,
/// `a1 x[t] + a2 v_z` with `(a1, a2) = softmax(W_z x[t])` for constant expert z, 0 otherwise.
/// `weights = None` means 1 (already folded into the rows).
#[allow(clippy::too_many_arguments)] // mirrors the op's arguments one for one
pub fn combine(
    expert_out: &[f64],
    hidden: usize,
    slot_rows: &[i32],
    ids: &[i32],
    weights: Option<&[f64]>,
    k: usize,
    experts: usize,
    extras: CombineExtras,
) -> Vec<f64> {
    let tokens = ids.len() / k;
    let mut y = vec![0.0; tokens * hidden];
    for t in 0..tokens {
        let yt = &mut y[t * hidden..(t + 1) * hidden];
        for slot in t * k..(t + 1) * k {
            let w = weights.map_or(1.0, |w| w[slot]);
            let src: Option<&[f64]> = if let Ok(r) = usize::try_from(slot_rows[slot]) {
                Some(&expert_out[r * hidden..(r + 1) * hidden])
            } else {
                let zc = usize::try_from(ids[slot])
                    .ok()
                    .and_then(|e| e.checked_sub(experts));
                let kind = zc.and_then(|z| extras.zc_kinds.and_then(|kinds| kinds.get(z)));
                match (kind, extras.x, extras.const_w, extras.const_v) {
                    (Some(1), Some(x), _, _) => Some(&x[t * hidden..(t + 1) * hidden]),
                    (Some(2), Some(x), Some(cw), Some(cv)) => {
                        let z = zc.expect("a kind was found for it");
                        let xt = &x[t * hidden..(t + 1) * hidden];
                        let dot = |r: usize| -> f64 {
                            let wr = &cw[(2 * z + r) * hidden..(2 * z + r + 1) * hidden];
                            xt.iter().zip(wr).map(|(a, b)| a * b).sum()
                        };
                        let (d0, d1) = (dot(0), dot(1));
                        let m = d0.max(d1);
                        let (e0, e1) = ((d0 - m).exp(), (d1 - m).exp());
                        let (a1, a2) = (e0 / (e0 + e1), e1 / (e0 + e1));
                        let v = &cv[z * hidden..(z + 1) * hidden];
                        for ((y, xv), vv) in yt.iter_mut().zip(xt).zip(v) {
                            *y += w * (a1 * xv + a2 * vv);
                        }
                        None
                    }
                    _ => None,
                }
            };
            if let Some(src) = src {
                yt.iter_mut().zip(src).for_each(|(a, b)| *a += w * b);
            }
        }
        if let Some(sh) = extras.shared {
            let g = extras
                .shared_gate
                .map_or(1.0, |g| 1.0 / (1.0 + (-g[t]).exp()));
            yt.iter_mut()
                .zip(&sh[t * hidden..])
                .for_each(|(a, b)| *a += g * b);
        }
        if let Some(r) = extras.residual {
            yt.iter_mut()
                .zip(&r[t * hidden..])
                .for_each(|(a, b)| *a += b);
        }
    }
    y
}

/// The masked layout with `max_rows` (M) rows per expert: (`masked_slots [E*M]`,
/// `slot_masked_rows [S]`, `masked_counts [E]`, overflowing slots).
pub fn masked(plan: &PlanRef, max_rows: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>, usize) {
    let experts = plan.counts.len();
    let mut slots = vec![-1; experts * max_rows];
    let mut rows = vec![-1; plan.slot_rows.len()];
    let mut kept = vec![0; experts];
    let mut overflow = 0;
    for e in 0..experts {
        let seg = &plan.sorted_slots[plan.offsets[e] as usize..plan.offsets[e + 1] as usize];
        kept[e] = seg.len().min(max_rows) as i32;
        overflow += seg.len().saturating_sub(max_rows);
        for (j, &s) in seg.iter().take(max_rows).enumerate() {
            slots[e * max_rows + j] = s;
            rows[s as usize] = (e * max_rows + j) as i32;
        }
    }
    (slots, rows, kept, overflow)
}

/// Expert parallelism: (`send_counts [R]`, `send_slots [S]` rank-major then expert then token, -1
/// past the total, experts with a rank outside [0, R)).
pub fn ep_send(plan: &PlanRef, expert_rank: &[i32], ranks: usize) -> (Vec<i32>, Vec<i32>, usize) {
    let mut counts = vec![0; ranks];
    let mut order = Vec::new();
    for (r, count) in counts.iter_mut().enumerate() {
        for (e, _) in expert_rank
            .iter()
            .enumerate()
            .filter(|(_, rr)| **rr == r as i32)
        {
            let seg = &plan.sorted_slots[plan.offsets[e] as usize..plan.offsets[e + 1] as usize];
            *count += seg.len() as i32;
            order.extend_from_slice(seg);
        }
    }
    order.resize(plan.sorted_slots.len(), -1);
    let bad = expert_rank
        .iter()
        .filter(|&&r| r < 0 || r as usize >= ranks)
        .count();
    (counts, order, bad)
}
