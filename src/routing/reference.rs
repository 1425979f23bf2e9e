//! CPU reference for every routing rule: plain loops in f64, written from the rules in
//! [`RouterRule`]'s documentation.

use super::config::{RouterConfig, RouterRule};
use crate::error::Result;

/// The routing of T tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// `[T, K]` expert ids in descending order of the selection key; -1 in unused top-p slots.
    pub ids: Vec<i32>,
    /// `[T, K]` weights; 0 in unused slots.
    pub weights: Vec<f64>,
    /// `[T]` the smallest gap between two selection keys (or group scores, or a top-p cumulative
    /// sum and p) at which this token's choice was decided. A kernel that computes the keys in
    /// f32 may decide differently only where this gap is within f32 rounding.
    pub margin: Vec<f64>,
}

/// The routing margin (see [`Routing::margin`]) under which a router whose logits are rounded to
/// bf16 may choose otherwise than this f64 reference: half a bf16 ulp is 0.016 at |logit| = 6
/// and moves a gap by twice that; 0.06 leaves room.
pub const BF16_LOGIT_TIE: f64 = 0.06;

/// Whether two tokens' slots name the same experts, in any order.
pub fn same_experts(a: &[i32], b: &[i32]) -> bool {
    let sorted = |v: &[i32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    sorted(a) == sorted(b)
}

/// Routes `logits` (`[T, E]` row-major, `experts` = E) by `cfg`; `bias` is the `[E]` correction
/// bias of the grouped sigmoid rule.
pub fn route(
    logits: &[f64],
    experts: usize,
    cfg: &RouterConfig,
    bias: Option<&[f64]>,
) -> Result<Routing> {
    route_masked(logits, experts, cfg, bias, None)
}

/// [`route`] with experts removed before selection: `removed [T, E]` (token-major), true where a
/// token's mask removes the expert. The rule runs on the experts that remain: the softmax is
/// over them, a group's score is over its remaining members (-inf where fewer remain than the
/// score sums), and a token left with fewer than K candidates gets unused slots (id -1,
/// weight 0).
pub fn route_masked(
    logits: &[f64],
    experts: usize,
    cfg: &RouterConfig,
    bias: Option<&[f64]>,
    removed: Option<&[bool]>,
) -> Result<Routing> {
    const OP: &str = "routing reference";
    cfg.validate(OP, experts, bias.map(<[f64]>::len))?;
    if !logits.len().is_multiple_of(experts) {
        return Err(crate::Error::shape(
            OP,
            "logits",
            format!("a multiple of E={experts} values"),
            format!("{} values", logits.len()),
        ));
    }
    let k = cfg.k;
    let tokens = logits.len() / experts;
    if let Some(r) = removed
        && r.len() != logits.len()
    {
        return Err(crate::Error::shape(
            OP,
            "removed",
            format!("[T, E] = {} values", logits.len()),
            format!("{} values", r.len()),
        ));
    }
    let mut out = Routing {
        ids: vec![-1; tokens * k],
        weights: vec![0.0; tokens * k],
        margin: vec![f64::INFINITY; tokens],
    };
    let none = vec![false; experts];
    for t in 0..tokens {
        let row = &logits[t * experts..(t + 1) * experts];
        let gone = removed.map_or(&none[..], |r| &r[t * experts..(t + 1) * experts]);
        let (ids, weights, margin) = route_token(row, cfg, bias, gone);
        out.ids[t * k..t * k + ids.len()].copy_from_slice(&ids);
        out.weights[t * k..t * k + ids.len()].copy_from_slice(&weights);
        out.margin[t] = margin;
    }
    Ok(out)
}

/// NaN ranks last, as -inf: a NaN bias, or -inf + inf in a group score.
fn nan_last(x: f64) -> f64 {
    if x.is_nan() { f64::NEG_INFINITY } else { x }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Sorts `items` by descending key, ties toward the lower index; returns the order.
fn ranked(keys: &[f64], items: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut order: Vec<usize> = items.collect();
    // Keys are never NaN (nan_last); partial_cmp takes -0.0 == +0.0 as the kernel does.
    order.sort_by(|&a, &b| {
        keys[b]
            .partial_cmp(&keys[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order
}

/// The smallest gap between consecutive keys among the first `n + 1` of `order`: the decisions
/// that picked the first `n` and their order.
fn decision_gap(keys: &[f64], order: &[usize], n: usize) -> f64 {
    order
        .windows(2)
        .take(n)
        .map(|w| (keys[w[0]] - keys[w[1]]).abs())
        .fold(f64::INFINITY, f64::min)
}

fn route_token(
    row: &[f64],
    cfg: &RouterConfig,
    bias: Option<&[f64]>,
    removed: &[bool],
) -> (Vec<i32>, Vec<f64>, f64) {
    let e = row.len();
    // NaN counts as -inf; the softcap applies after that. A removed expert's logit is absent:
    // -inf, and it is no candidate below.
    let raw: Vec<f64> = row
        .iter()
        .zip(removed)
        .map(|(&v, &r)| if r { f64::NEG_INFINITY } else { nan_last(v) })
        .collect();
    let l: Vec<f64> = match cfg.softcap {
        Some(cap) => raw
            .iter()
            .map(|&v| f64::from(cap) * (v / f64::from(cap)).tanh())
            .collect(),
        None => raw.clone(),
    };
    let softmax = || {
        let m = l
            .iter()
            .zip(removed)
            .filter(|(_, r)| !**r)
            .map(|(&v, _)| v)
            .fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = l
            .iter()
            .zip(removed)
            .map(|(&v, &r)| if r { 0.0 } else { (v - m).exp() })
            .collect();
        let s: f64 = ex.iter().sum();
        ex.into_iter().map(|v| v / s).collect::<Vec<f64>>()
    };

    // score: what the weights come from; key: what selection ranks. Softmax and the softcap are
    // strictly increasing, so ranking the raw logits ranks the probabilities, exactly.
    let (score, key): (Vec<f64>, Vec<f64>) = match cfg.rule {
        RouterRule::SoftmaxTopK { .. }
        | RouterRule::SoftmaxGroupTopK { .. }
        | RouterRule::TopP { .. } => (softmax(), raw.clone()),
        RouterRule::TopKSoftmax | RouterRule::TopKSigmoid => (l.clone(), raw.clone()),
        RouterRule::SigmoidGroupTopK { .. } => {
            let s: Vec<f64> = l.iter().map(|&v| sigmoid(v)).collect();
            let b = bias.expect("validated: the grouped sigmoid rule has a bias");
            let key = s.iter().zip(b).map(|(s, b)| nan_last(s + b)).collect();
            (s, key)
        }
    };

    // Group-limited choice: keep the experts of the best `topk_group` groups.
    let mut margin = f64::INFINITY;
    let candidates: Vec<usize> = match cfg.rule.groups() {
        Some((n_group, topk_group)) => {
            let size = e / n_group;
            let top2 = matches!(cfg.rule, RouterRule::SigmoidGroupTopK { .. });
            let gscore: Vec<f64> = (0..n_group)
                .map(|g| {
                    let members = ranked(&key, (g * size..(g + 1) * size).filter(|&i| !removed[i]));
                    // A member the mask removed counts as absent: -inf in the score.
                    let nth = |n: usize| members.get(n).map_or(f64::NEG_INFINITY, |&i| key[i]);
                    nan_last(if top2 { nth(0) + nth(1) } else { nth(0) })
                })
                .collect();
            let gorder = ranked(&gscore, 0..n_group);
            margin = margin.min(decision_gap(&gscore, &gorder, topk_group));
            let mut keep: Vec<usize> = gorder[..topk_group]
                .iter()
                .flat_map(|&g| g * size..(g + 1) * size)
                .collect();
            keep.sort_unstable();
            keep
        }
        None => (0..e).collect(),
    };
    let candidates: Vec<usize> = candidates.into_iter().filter(|&i| !removed[i]).collect();

    let order = ranked(&key, candidates.into_iter());
    let chosen: Vec<usize> = match cfg.rule {
        RouterRule::TopP { p, .. } => {
            let p = f64::from(p);
            let mut cum = 0.0;
            let mut n = 0;
            for &i in order.iter().take(cfg.k) {
                cum += score[i];
                n += 1;
                margin = margin.min((cum - p).abs());
                if cum >= p {
                    break;
                }
            }
            order[..n].to_vec()
        }
        _ => order[..cfg.k.min(order.len())].to_vec(),
    };
    margin = margin.min(decision_gap(&key, &order, chosen.len()));

    let mut w: Vec<f64> = match cfg.rule {
        RouterRule::TopKSoftmax => {
            let m = chosen
                .iter()
                .map(|&i| l[i])
                .fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = chosen.iter().map(|&i| (l[i] - m).exp()).collect();
            let s: f64 = ex.iter().sum();
            ex.into_iter().map(|v| v / s).collect()
        }
        RouterRule::TopKSigmoid => chosen.iter().map(|&i| sigmoid(l[i])).collect(),
        _ => chosen.iter().map(|&i| score[i]).collect(),
    };
    let eps = match cfg.rule {
        RouterRule::SoftmaxTopK { renormalize: true }
        | RouterRule::TopP {
            renormalize: true, ..
        } => Some(0.0),
        RouterRule::SigmoidGroupTopK {
            renormalize: true, ..
        } => Some(1e-20),
        _ => None,
    };
    if let Some(eps) = eps {
        let s: f64 = w.iter().sum::<f64>() + eps;
        w.iter_mut().for_each(|v| *v /= s);
    }
    w.iter_mut().for_each(|v| *v *= f64::from(cfg.scale));
    let ids = chosen
        .iter()
        .map(|&i| i32::try_from(i).expect("E <= 1024"))
        .collect();
    (ids, w, margin)
}

/// Capacity limit: slot `i` (flat, token-major) keeps its expert while fewer than `capacity`
/// earlier slots chose that expert; later ones become id -1 with weight 0. Returns the new ids
/// and weights and, per slot, the expert a dropped slot wanted (-1 elsewhere). Ids outside
/// `[0, experts)` pass through untouched.
pub fn apply_capacity(
    ids: &[i32],
    weights: &[f64],
    experts: usize,
    capacity: usize,
) -> (Vec<i32>, Vec<f64>, Vec<i32>) {
    let mut seen = vec![0usize; experts];
    let (mut out_ids, mut out_w, mut dropped) =
        (ids.to_vec(), weights.to_vec(), vec![-1; ids.len()]);
    for (i, &id) in ids.iter().enumerate() {
        let Some(e) = usize::try_from(id).ok().filter(|&e| e < experts) else {
            continue;
        };
        if seen[e] >= capacity {
            out_ids[i] = -1;
            out_w[i] = 0.0;
            dropped[i] = id;
        }
        seen[e] += 1;
    }
    (out_ids, out_w, dropped)
}

/// Router statistics over `logits [T, E]` and the chosen `ids [T, K]`:
/// (fraction of tokens per expert = count / T, mean softmax probability per expert,
/// z-loss = mean over tokens of logsumexp(logits)^2).
pub fn router_stats(logits: &[f64], experts: usize, ids: &[i32]) -> (Vec<f64>, Vec<f64>, f64) {
    let tokens = logits.len() / experts;
    let mut fraction = vec![0.0; experts];
    for &id in ids {
        if let Some(f) = usize::try_from(id).ok().and_then(|e| fraction.get_mut(e)) {
            *f += 1.0;
        }
    }
    fraction.iter_mut().for_each(|f| *f /= tokens as f64);
    let mut mean_prob = vec![0.0; experts];
    let mut z = 0.0;
    for row in logits.chunks(experts) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // An all -inf row has lse = -inf, as torch.logsumexp gives.
        let lse = if m == f64::NEG_INFINITY {
            m
        } else {
            m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
        };
        z += lse * lse;
        for (p, &v) in mean_prob.iter_mut().zip(row) {
            *p += (v - lse).exp();
        }
    }
    mean_prob.iter_mut().for_each(|p| *p /= tokens as f64);
    (fraction, mean_prob, z / tokens as f64)
}

/// The router projection: `logits[t, e] = sum_h x[t, h] * w[e, h] + bias[e]`, x `[T, H]`,
/// w `[E, H]`.
pub fn router_logits(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    (tokens, experts, hidden): (usize, usize, usize),
) -> Vec<f64> {
    let mut out = Vec::with_capacity(tokens * experts);
    for t in 0..tokens {
        let xr = &x[t * hidden..(t + 1) * hidden];
        for e in 0..experts {
            let wr = &w[e * hidden..(e + 1) * hidden];
            let dot: f64 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            out.push(dot + bias.map_or(0.0, |b| b[e]));
        }
    }
    out
}

/// Caller-given routing as a layer takes it (`route_given` in kernels/routing.cu): `ids` and
/// `weights` `[T, K]`; a slot whose id is outside [-1, `experts`), repeats an earlier slot's id in
/// its row, or has a NaN or infinite weight becomes unused (id -1, weight 0); id -1 keeps weight
/// 0. Returns the routing (margins infinite: nothing was decided) and the counts of the three
/// kinds of bad slot, in that order (a repeat is counted only as a repeat).
pub fn given(ids: &[i32], weights: &[f32], k: usize, experts: usize) -> (Routing, [usize; 3]) {
    let mut bad = [0usize; 3];
    let mut out = Routing {
        ids: vec![-1; ids.len()],
        weights: vec![0.0; ids.len()],
        margin: vec![f64::INFINITY; ids.len() / k.max(1)],
    };
    for (row, (ids_row, w_row)) in ids.chunks(k).zip(weights.chunks(k)).enumerate() {
        for (j, (&id, &w)) in ids_row.iter().zip(w_row).enumerate() {
            let in_range = id >= -1 && usize::try_from(id).map_or(true, |e| e < experts);
            if !in_range {
                bad[0] += 1;
                continue;
            }
            if id < 0 {
                continue;
            }
            if ids_row[..j].contains(&id) {
                bad[1] += 1;
                continue;
            }
            if !w.is_finite() {
                bad[2] += 1;
                continue;
            }
            out.ids[row * k + j] = id;
            out.weights[row * k + j] = f64::from(w);
        }
    }
    (out, bad)
}
