//! Routing: the CPU reference against hand-worked cases for every rule, configuration errors,
//! and the kernels against the reference on random and adversarial logits.

mod common;

use approx::assert_relative_eq;
use half::{bf16, f16};
use moe_kernels::check::{self, Tolerance};
use moe_kernels::rng::Rng;
use moe_kernels::routing::{self, RouterConfig, RouterLogitsVersion, RouterRule, reference};
use moe_kernels::{Device, Error, Float};

fn ln(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.ln()).collect()
}

fn assert_weights(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_relative_eq!(*g, *w, max_relative = 1e-12, epsilon = 1e-15);
    }
}

#[test]
fn softmax_topk_mixtral_and_qwen() {
    let logits = ln(&[0.1, 0.2, 0.3, 0.4]);
    let r = reference::route(&logits, 4, &RouterConfig::mixtral(2), None).unwrap();
    assert_eq!(r.ids, [3, 2]);
    assert_weights(&r.weights, &[4.0 / 7.0, 3.0 / 7.0]);
    let r = reference::route(&logits, 4, &RouterConfig::qwen(2, false), None).unwrap();
    assert_weights(&r.weights, &[0.4, 0.3]);
}

#[test]
fn topk_then_softmax_gpt_oss_and_topk_sigmoid_llama4() {
    let r = reference::route(&[1.0, 3.0, 2.0, 0.0], 4, &RouterConfig::gpt_oss(2), None).unwrap();
    let e = std::f64::consts::E;
    assert_eq!(r.ids, [1, 2]);
    assert_weights(&r.weights, &[e / (e + 1.0), 1.0 / (e + 1.0)]);

    let r = reference::route(&[0.5, -1.0, 2.0], 3, &RouterConfig::llama4(1), None).unwrap();
    assert_eq!(r.ids, [2]);
    assert_weights(&r.weights, &[1.0 / (1.0 + (-2.0f64).exp())]);
}

#[test]
fn deepseek_v3_drops_the_best_expert_of_a_weak_group() {
    // Sigmoid(0) = 0.5 everywhere, so the keys are 0.5 + bias:
    // [0.6, 0.5 | 0.8, 0.7 | 0.0, 1.4 | 1.45, -0.5]; group sums of the top 2: 1.1, 1.5, 1.4, 0.95.
    // Groups 1 and 2 stay, so expert 6, the best key of all, is out; the top 2 of {2, 3, 4, 5}
    // are 5 and 2. Weights: 0.5 each, renormalised to 0.5, times 2.5.
    let bias = [0.1, 0.0, 0.3, 0.2, -0.5, 0.9, 0.95, -1.0];
    let cfg = RouterConfig::deepseek_v3(2, 4, 2, true, 2.5);
    let r = reference::route(&[0.0; 8], 8, &cfg, Some(&bias)).unwrap();
    assert_eq!(r.ids, [5, 2]);
    assert_weights(&r.weights, &[1.25, 1.25]);
    // Without renormalisation the weights are the unbiased sigmoids times the scale.
    let cfg = RouterConfig::deepseek_v3(2, 4, 2, false, 2.5);
    let r = reference::route(&[0.0; 8], 8, &cfg, Some(&bias)).unwrap();
    assert_weights(&r.weights, &[1.25, 1.25]);
    let cfg = RouterConfig::deepseek_v3(3, 4, 2, true, 1.0);
    let r = reference::route(&[0.0; 8], 8, &cfg, Some(&bias)).unwrap();
    assert_eq!(r.ids, [5, 2, 3]);
    assert_weights(&r.weights, &[1.0 / 3.0; 3]);
}

#[test]
fn deepseek_v2_group_limited_greedy_scores_groups_by_their_max() {
    // p over 6 experts in 3 groups of 2: group maxima 0.3, 0.25, 0.2 -> groups 0 and 1 stay.
    let p = [0.3, 0.05, 0.2, 0.25, 0.0, 0.2];
    let logits: Vec<f64> = p
        .iter()
        .map(|v: &f64| if *v == 0.0 { f64::NEG_INFINITY } else { v.ln() })
        .collect();
    let cfg = RouterConfig::deepseek_v2(2, Some((3, 2)), 16.0);
    let r = reference::route(&logits, 6, &cfg, None).unwrap();
    assert_eq!(r.ids, [0, 3]);
    assert_weights(&r.weights, &[0.3 * 16.0, 0.25 * 16.0]);
    // Greedy ignores the groups: at k = 4 it adds 2 and 5 (tied at 0.2, the lower index first).
    let r = reference::route(&logits, 6, &RouterConfig::deepseek_v2(4, None, 1.0), None).unwrap();
    assert_eq!(r.ids, [0, 3, 2, 5]);
}

#[test]
fn top_p_stops_once_the_mass_is_reached() {
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let cfg = RouterConfig::new(
        RouterRule::TopP {
            p: 0.7,
            renormalize: false,
        },
        3,
    );
    let r = reference::route(&logits, 4, &cfg, None).unwrap();
    assert_eq!(r.ids, [0, 1, -1]);
    assert_weights(&r.weights, &[0.5, 0.3, 0.0]);
    let cfg = RouterConfig::new(
        RouterRule::TopP {
            p: 0.7,
            renormalize: true,
        },
        3,
    );
    let r = reference::route(&logits, 4, &cfg, None).unwrap();
    assert_weights(&r.weights, &[0.625, 0.375, 0.0]);
    // p = 1 with a cap of k_max = 2 takes exactly two.
    let cfg = RouterConfig::new(
        RouterRule::TopP {
            p: 1.0,
            renormalize: false,
        },
        2,
    );
    assert_eq!(
        reference::route(&logits, 4, &cfg, None).unwrap().ids,
        [0, 1]
    );
}

#[test]
fn ties_go_to_the_lower_index_and_nan_ranks_last() {
    let r = reference::route(&[0.25; 6], 6, &RouterConfig::qwen(3, false), None).unwrap();
    assert_eq!(r.ids, [0, 1, 2]);
    assert_weights(&r.weights, &[1.0 / 6.0; 3]);
    let nan = f64::NAN;
    let r = reference::route(
        &[nan, 1.0, nan, 0.0],
        4,
        &RouterConfig::qwen(3, false),
        None,
    )
    .unwrap();
    assert_eq!(r.ids, [1, 3, 0]);
    let e = std::f64::consts::E;
    assert_weights(&r.weights, &[e / (e + 1.0), 1.0 / (e + 1.0), 0.0]);
    // All NaN: valid ids, NaN weights (0/0), as torch.softmax of an all -inf row.
    let r = reference::route(&[nan; 4], 4, &RouterConfig::mixtral(2), None).unwrap();
    assert_eq!(r.ids, [0, 1]);
    assert!(r.weights.iter().all(|w| w.is_nan()));
}

#[test]
fn softcap_bounds_the_logits() {
    let mut cfg = RouterConfig::llama4(1);
    cfg.softcap = Some(1.0);
    let r = reference::route(&[100.0, 50.0], 2, &cfg, None).unwrap();
    assert_eq!(r.ids, [0]);
    assert_weights(&r.weights, &[1.0 / (1.0 + (-(100f64).tanh()).exp())]);
}

#[test]
fn bad_configurations_are_refused_with_their_argument() {
    let v3 = |k, g, tg| RouterConfig::deepseek_v3(k, g, tg, true, 1.0);
    let cases: Vec<(RouterConfig, usize, Option<usize>, &str)> = vec![
        (RouterConfig::mixtral(9), 8, None, "k"),
        (RouterConfig::mixtral(0), 8, None, "k"),
        (RouterConfig::mixtral(2), 0, None, "logits"),
        (RouterConfig::mixtral(2), 2048, None, "logits"),
        (v3(2, 3, 1), 8, Some(8), "n_group"),
        (v3(2, 4, 5), 8, Some(8), "topk_group"),
        (v3(2, 8, 2), 8, Some(8), "n_group"), // one expert per group: no top-2
        (v3(5, 4, 2), 8, Some(8), "k"),       // only 4 experts in 2 groups of 2
        (v3(2, 4, 2), 8, Some(7), "bias"),
        (v3(2, 4, 2), 8, None, "bias"),
        (RouterConfig::mixtral(2), 8, Some(8), "bias"),
        (
            RouterConfig::new(
                RouterRule::TopP {
                    p: 0.0,
                    renormalize: false,
                },
                2,
            ),
            8,
            None,
            "p",
        ),
        (
            RouterConfig::new(
                RouterRule::TopP {
                    p: 1.5,
                    renormalize: false,
                },
                2,
            ),
            8,
            None,
            "p",
        ),
        (
            RouterConfig {
                scale: f32::NAN,
                ..RouterConfig::mixtral(2)
            },
            8,
            None,
            "scale",
        ),
        (
            RouterConfig {
                softcap: Some(-1.0),
                ..RouterConfig::mixtral(2)
            },
            8,
            None,
            "softcap",
        ),
    ];
    for (cfg, e, bias, arg) in cases {
        match cfg.validate("route", e, bias) {
            Err(Error::Shape {
                op: "route",
                arg: a,
                ..
            }) if a == arg => {}
            other => panic!("{cfg:?} with E={e}: expected an error on `{arg}`, got {other:?}"),
        }
    }
    let e = RouterConfig::mixtral(9)
        .validate("route", 8, None)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "route: argument `k`: expected 1..=8 (min(E=8, 32)), got 9"
    );
    assert!(reference::route(&[0.0; 7], 2, &RouterConfig::mixtral(1), None).is_err());
}

/// Every rule, with the shapes a model gives it.
fn rules(e: usize) -> Vec<(RouterConfig, bool)> {
    let k = e.min(8);
    let mut v = vec![
        (RouterConfig::mixtral(k.min(2)), false),
        (RouterConfig::qwen(k, false), false),
        (RouterConfig::qwen(k, true), false),
        (RouterConfig::gpt_oss(k.min(4)), false),
        (RouterConfig::llama4(1), false),
        (
            RouterConfig::new(
                RouterRule::TopP {
                    p: 0.6,
                    renormalize: true,
                },
                k,
            ),
            false,
        ),
        (
            RouterConfig {
                softcap: Some(2.0),
                ..RouterConfig::qwen(k, true)
            },
            false,
        ),
        (RouterConfig::deepseek_v2(k, None, 16.0), false),
    ];
    for groups in [2usize, 4, 8] {
        v.push((
            RouterConfig::deepseek_v3(k, groups, groups / 2, true, 2.5),
            true,
        ));
        v.push((
            RouterConfig::deepseek_v2(k, Some((groups, groups / 2)), 1.0),
            false,
        ));
    }
    // Only what fits E: groups must divide it, hold 2 experts each, and offer k.
    v.retain(|(cfg, needs_bias)| cfg.validate("rules", e, needs_bias.then_some(e)).is_ok());
    v
}

/// Checks the kernel's routing of `logits` against the reference: ids equal except where the
/// reference itself decided within f32 rounding (its margin), weights within f32 tolerance.
/// `near_tie_budget`: the fraction of tokens that may be decided on near-ties (random inputs);
/// `None` for adversarial rows built from ties.
fn check_case<T: Float>(
    dev: &Device,
    logits: &[T],
    e: usize,
    cfg: &RouterConfig,
    bias: Option<&[f32]>,
    near_tie_budget: Option<f64>,
) {
    check_masked_case(dev, logits, e, cfg, bias, near_tie_budget, None);
}

/// Expert masks for [`check_masked_case`]: `removed[m]` lists mask m's experts; `index [T]` is
/// each token's mask (-1 for none), or mask 0 for every token where `None`.
struct Masks {
    removed: Vec<Vec<usize>>,
    index: Option<Vec<i32>>,
}

impl Masks {
    /// `[T, E]`: whether token t's mask removes expert e.
    fn per_token(&self, t: usize, e: usize) -> Vec<bool> {
        (0..t)
            .flat_map(|tok| {
                let m = self.index.as_ref().map_or(0, |i| i[tok]);
                (0..e).map(move |x| m >= 0 && self.removed[m as usize].contains(&x))
            })
            .collect()
    }
}

/// [`check_case`] with expert masks.
fn check_masked_case<T: Float>(
    dev: &Device,
    logits: &[T],
    e: usize,
    cfg: &RouterConfig,
    bias: Option<&[f32]>,
    near_tie_budget: Option<f64>,
    masks: Option<&Masks>,
) {
    let t = logits.len() / e;
    let x = dev.upload(logits, &[t, e]).unwrap();
    let b = bias.map(|b| dev.upload(b, &[e]).unwrap());
    let mut ids = dev.filled_bytes::<i32>(&[t, cfg.k], 0x7f).unwrap();
    let mut w = dev.filled_bytes::<f32>(&[t, cfg.k], 0xff).unwrap();
    let mut counts = dev.filled_bytes::<i32>(&[e], 0x7f).unwrap();
    match masks {
        None => routing::route_into(
            dev,
            &mut ids,
            &mut w,
            Some(&mut counts),
            &x,
            cfg,
            b.as_ref(),
        )
        .unwrap(),
        Some(m) => {
            let words: Vec<u32> = m
                .removed
                .iter()
                .flat_map(|r| routing::mask_words("test", "masks", e, r).unwrap())
                .collect();
            let mt = dev
                .upload(&words, &[m.removed.len(), e.div_ceil(32)])
                .unwrap();
            let it = m.index.as_ref().map(|i| dev.upload(i, &[t]).unwrap());
            let mut status = dev.zeros::<i32>(&[4]).unwrap();
            routing::route_masked_into(
                dev,
                &mut ids,
                &mut w,
                Some(&mut counts),
                &x,
                cfg,
                b.as_ref(),
                routing::ExpertMasks {
                    masks: &mt,
                    index: it.as_ref(),
                },
                &mut status,
            )
            .unwrap();
            routing::check_status(dev, "test", &mut status).unwrap();
        }
    }
    let (got_ids, got_w, got_counts) = (
        dev.download(&ids).unwrap(),
        dev.download(&w).unwrap(),
        dev.download(&counts).unwrap(),
    );

    let l64: Vec<f64> = logits.iter().map(|v| v.to_f64()).collect();
    let b64: Option<Vec<f64>> = bias.map(|b| b.iter().map(|&v| f64::from(v)).collect());
    let removed = masks.map(|m| m.per_token(t, e));
    let want = reference::route_masked(&l64, e, cfg, b64.as_deref(), removed.as_deref()).unwrap();

    let k = cfg.k;
    // Rules that rank raw logits decide exactly, ties included; the grouped sigmoid rule and
    // top-p compute their keys in f32 and may part from the f64 reference where its own margin
    // is within f32 rounding.
    let computed_keys = matches!(
        cfg.rule,
        RouterRule::SigmoidGroupTopK { .. } | RouterRule::TopP { .. }
    );
    let (mut near_ties, mut got_hist, mut want_counts) = (0, vec![0i32; e], vec![0i32; e]);
    let (mut wg, mut ww) = (Vec::new(), Vec::new());
    for tok in 0..t {
        let s = tok * k..(tok + 1) * k;
        let row = &got_ids[s.clone()];
        for (j, &id) in row.iter().enumerate() {
            assert!(
                (-1..e as i32).contains(&id),
                "token {tok}: id {id} out of range"
            );
            assert!(
                id == -1 || !row[..j].contains(&id),
                "token {tok}: id {id} chosen twice: {row:?}"
            );
            if id >= 0 {
                got_hist[id as usize] += 1;
            }
        }
        if row != &want.ids[s.clone()] {
            assert!(
                computed_keys && want.margin[tok] < 1e-5,
                "{cfg:?} E={e} {}: token {tok}: ids {row:?}, reference {:?} (margin {:e})",
                T::DTYPE,
                &want.ids[s.clone()],
                want.margin[tok]
            );
            near_ties += 1;
            continue;
        }
        wg.extend_from_slice(&got_w[s.clone()]);
        ww.extend_from_slice(&want.weights[s]);
    }
    for &id in want.ids.iter().filter(|&&id| id >= 0) {
        want_counts[id as usize] += 1;
    }
    if let Some(budget) = near_tie_budget {
        assert!(
            near_ties as f64 <= budget * t as f64,
            "{near_ties} of {t} tokens decided on near-ties"
        );
    }
    assert_eq!(
        got_counts, got_hist,
        "{cfg:?} E={e}: counts disagree with the ids written"
    );
    if near_ties == 0 {
        assert_eq!(got_counts, want_counts, "{cfg:?} E={e}: per-expert counts");
    }
    let report = check::compare(&wg, &ww, Tolerance::new(1e-6, 3e-5));
    println!(
        "route {:?} E={e} T={t} {}: {report}, near-ties {near_ties}",
        cfg.rule,
        T::DTYPE
    );
    assert!(
        report.passed(),
        "{cfg:?} E={e} T={t} {}: weights {report}",
        T::DTYPE
    );
}

fn random_routing<T: Float>(dev: &Device) {
    let mut rng = Rng::new(0x20f7);
    for e in [1usize, 8, 60, 96, 128, 256, 400, 1024] {
        for (cfg, needs_bias) in rules(e) {
            for t in [0usize, 1, 77] {
                let logits: Vec<T> = rng.normal_vec(t * e, 2.0);
                let bias: Vec<f32> = (0..e).map(|_| rng.uniform(-0.1, 0.1) as f32).collect();
                check_case(
                    dev,
                    &logits,
                    e,
                    &cfg,
                    needs_bias.then_some(&bias[..]),
                    Some(0.01),
                );
            }
        }
    }
}

fn adversarial_routing<T: Float>(dev: &Device) {
    let e = 60;
    let huge = if T::DTYPE == moe_kernels::DType::F16 {
        6.0e4
    } else {
        1.0e30
    };
    let rows: Vec<Vec<f64>> = vec![
        vec![0.5; e], // all equal
        (0..e)
            .map(|i| if i % 7 == 3 { 2.0 } else { -1.0 })
            .collect(), // ties at the top
        (0..e)
            .map(|i| if i % 2 == 0 { huge } else { -huge })
            .collect(), // huge magnitudes
        (0..e)
            .map(|i| if i == 41 { f64::INFINITY } else { 0.0 })
            .collect(), // +inf
        (0..e)
            .map(|i| if i < 50 { f64::NEG_INFINITY } else { i as f64 })
            .collect(),
        (0..e)
            .map(|i| if i % 3 == 0 { f64::NAN } else { -(i as f64) })
            .collect(),
        vec![f64::NAN; e],
        vec![f64::NEG_INFINITY; e],
    ];
    let logits: Vec<T> = rows.iter().flatten().map(|&v| T::from_f64(v)).collect();
    let bias: Vec<f32> = (0..e).map(|i| (i % 5) as f32 * 0.01).collect();
    for (cfg, needs_bias) in rules(e) {
        check_case(dev, &logits, e, &cfg, needs_bias.then_some(&bias[..]), None);
    }
    // K = E.
    check_case(dev, &logits, e, &RouterConfig::qwen(32, true), None, None);
    let small: Vec<T> = logits[..8 * 8].to_vec();
    check_case(dev, &small, 8, &RouterConfig::mixtral(8), None, None);
}

#[test]
fn gpu_routing_matches_reference() {
    let Some(dev) = common::gpu("gpu_routing_matches_reference") else {
        return;
    };
    random_routing::<f32>(&dev);
    random_routing::<bf16>(&dev);
    random_routing::<f16>(&dev);
    adversarial_routing::<f32>(&dev);
    adversarial_routing::<bf16>(&dev);
    adversarial_routing::<f16>(&dev);
}

#[test]
fn masks_remove_experts_before_the_rule() {
    let logits = ln(&[0.1, 0.2, 0.3, 0.4]);
    let gone = |ids: &[usize]| (0..4).map(|e| ids.contains(&e)).collect::<Vec<bool>>();
    let route = |cfg: &RouterConfig, removed: &[usize]| {
        reference::route_masked(&logits, 4, cfg, None, Some(&gone(removed))).unwrap()
    };
    // Mixtral without expert 3: the top 2 of the rest, renormalised.
    let r = route(&RouterConfig::mixtral(2), &[3]);
    assert_eq!(r.ids, [2, 1]);
    assert_weights(&r.weights, &[0.6, 0.4]);
    // Qwen without renormalisation: the softmax runs over the remaining three.
    let r = route(&RouterConfig::qwen(2, false), &[3]);
    assert_weights(&r.weights, &[0.5, 1.0 / 3.0]);
    // One expert left for K = 2: the second slot is unused, never a masked expert.
    let r = route(&RouterConfig::mixtral(2), &[0, 1, 3]);
    assert_eq!(r.ids, [2, -1]);
    assert_weights(&r.weights, &[1.0, 0.0]);
    let r = route(&RouterConfig::mixtral(2), &[0, 1, 2, 3]);
    assert_eq!(r.ids, [-1, -1]);
    // DeepSeek-V3's groups score over their remaining members: the example of
    // deepseek_v3_drops_the_best_expert_of_a_weak_group without expert 2 leaves group 1 with
    // one member (score -inf), so groups 2 and 0 stay and the top 2 of {0, 1, 4, 5} are 5, 0.
    let bias = [0.1, 0.0, 0.3, 0.2, -0.5, 0.9, 0.95, -1.0];
    let cfg = RouterConfig::deepseek_v3(2, 4, 2, true, 2.5);
    let removed: Vec<bool> = (0..8).map(|e| e == 2).collect();
    let r = reference::route_masked(&[0.0; 8], 8, &cfg, Some(&bias), Some(&removed)).unwrap();
    assert_eq!(r.ids, [5, 0]);
    assert_weights(&r.weights, &[1.25, 1.25]);
}

#[test]
fn gpu_masked_routing_matches_reference() {
    let Some(dev) = common::gpu("gpu_masked_routing_matches_reference") else {
        return;
    };
    let mut rng = Rng::new(0x3a5c);
    for e in [8usize, 60, 256] {
        let t = 21;
        // Mask 0: a random third; mask 1: all but 3 (fewer than K for most rules); mask 2:
        // the first half (whole groups).
        let third: Vec<usize> = (0..e).filter(|_| rng.below(3) == 0).collect();
        let keep: Vec<usize> = (0..3).map(|_| rng.below(e as u64) as usize).collect();
        let masks = Masks {
            removed: vec![
                third,
                (0..e).filter(|x| !keep.contains(x)).collect(),
                (0..e / 2).collect(),
            ],
            index: Some((0..t).map(|_| rng.below(4) as i32 - 1).collect()),
        };
        let layer_wide = Masks {
            removed: masks.removed[..1].to_vec(),
            index: None,
        };
        for (cfg, needs_bias) in rules(e) {
            let logits: Vec<bf16> = rng.normal_vec(t * e, 2.0);
            let bias: Vec<f32> = (0..e).map(|_| rng.uniform(-0.1, 0.1) as f32).collect();
            let bias = needs_bias.then_some(&bias[..]);
            check_masked_case(&dev, &logits, e, &cfg, bias, Some(0.05), Some(&masks));
            check_masked_case(&dev, &logits, e, &cfg, bias, Some(0.05), Some(&layer_wide));
        }
    }
}

#[test]
fn gpu_masks_and_given_routing_refuse_bad_input() {
    let Some(dev) = common::gpu("gpu_masks_and_given_routing_refuse_bad_input") else {
        return;
    };
    let (t, e, k) = (5usize, 40usize, 3usize);
    let mut rng = Rng::new(11);
    let x = dev
        .upload(&rng.normal_vec::<f32>(t * e, 1.0), &[t, e])
        .unwrap();
    let cfg = RouterConfig::qwen(k, true);
    let mut ids = dev.zeros::<i32>(&[t, k]).unwrap();
    let mut w = dev.zeros::<f32>(&[t, k]).unwrap();
    let mut status = dev.zeros::<i32>(&[4]).unwrap();
    let words = routing::mask_words("test", "masks", e, &[1, 39]).unwrap();
    let masks = dev.upload(&words, &[1, 2]).unwrap();
    // A mask index out of range routes its token nowhere and is reported.
    let index = dev.upload(&[0i32, -1, 1, 0, -2], &[t]).unwrap();
    let m = routing::ExpertMasks {
        masks: &masks,
        index: Some(&index),
    };
    routing::route_masked_into(&dev, &mut ids, &mut w, None, &x, &cfg, None, m, &mut status)
        .unwrap();
    let got = dev.download(&ids).unwrap();
    assert_eq!(&got[2 * k..3 * k], &[-1; 3]);
    assert_eq!(&got[4 * k..5 * k], &[-1; 3]);
    assert!(got[..2 * k].iter().all(|&i| i >= 0));
    let err = routing::check_status(&dev, "test", &mut status).unwrap_err();
    assert!(err.to_string().contains("2 mask_index"), "{err}");
    routing::check_status(&dev, "test", &mut status).expect("reset by the check");
    // Masks of the wrong width, an index of the wrong length.
    let wide = dev.zeros::<u32>(&[1, 3]).unwrap();
    let m = routing::ExpertMasks {
        masks: &wide,
        index: None,
    };
    let r =
        routing::route_masked_into(&dev, &mut ids, &mut w, None, &x, &cfg, None, m, &mut status);
    assert!(matches!(r, Err(Error::Shape { arg: "masks", .. })), "{r:?}");
    let short = dev.zeros::<i32>(&[t - 1]).unwrap();
    let m = routing::ExpertMasks {
        masks: &masks,
        index: Some(&short),
    };
    let r =
        routing::route_masked_into(&dev, &mut ids, &mut w, None, &x, &cfg, None, m, &mut status);
    assert!(
        matches!(
            r,
            Err(Error::Shape {
                arg: "mask_index",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(routing::mask_words("test", "masks", e, &[40]).is_err());

    // Given routing: out of range, repeated, NaN and infinite weights, -1 with a weight.
    let gi: Vec<i32> = vec![0, 1, 2, 5, 40, -2, 7, 7, 3, 9, 8, -1, 39, 12, 39];
    let mut gw: Vec<f32> = (0..t * k).map(|i| 0.1 + i as f32 * 0.01).collect();
    gw[9] = f32::NAN;
    gw[10] = f32::INFINITY;
    gw[11] = 5.0;
    let (want, bad) = reference::given(&gi, &gw, k, e);
    assert_eq!(bad, [2, 2, 2]);
    let (ti, tw) = (
        dev.upload(&gi, &[t, k]).unwrap(),
        dev.upload(&gw, &[t, k]).unwrap(),
    );
    routing::route_given_into(&dev, &mut ids, &mut w, &ti, &tw, e, &mut status).unwrap();
    assert_eq!(dev.download(&ids).unwrap(), want.ids);
    let got_w: Vec<f64> = dev
        .download(&w)
        .unwrap()
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    assert_eq!(got_w, want.weights);
    let err = routing::check_status(&dev, "test", &mut status)
        .unwrap_err()
        .to_string();
    for what in [
        "2 topk_ids: ids outside",
        "2 topk_ids: ids repeated",
        "2 topk_weights",
    ] {
        assert!(err.contains(what), "{err}");
    }
    // Shapes.
    let tw2 = dev.zeros::<f32>(&[t, k - 1]).unwrap();
    let r = routing::route_given_into(&dev, &mut ids, &mut w, &ti, &tw2, e, &mut status);
    assert!(
        matches!(
            r,
            Err(Error::Shape {
                arg: "topk_weights",
                ..
            })
        ),
        "{r:?}"
    );
    let ti3 = dev.zeros::<i32>(&[t, k, 1]).unwrap();
    let r = routing::route_given_into(&dev, &mut ids, &mut w, &ti3, &tw, e, &mut status);
    assert!(
        matches!(
            r,
            Err(Error::Shape {
                arg: "topk_ids",
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn gpu_routing_is_deterministic_and_refuses_bad_input() {
    let Some(dev) = common::gpu("gpu_routing_is_deterministic_and_refuses_bad_input") else {
        return;
    };
    let mut rng = Rng::new(3);
    let x = dev
        .upload(&rng.normal_vec::<bf16>(4096 * 256, 1.0), &[4096, 256])
        .unwrap();
    let bias = dev.upload(&vec![0.01f32; 256], &[256]).unwrap();
    let cfg = RouterConfig::deepseek_v3(8, 8, 4, true, 2.5);
    let (i1, w1) = routing::route(&dev, &x, &cfg, Some(&bias)).unwrap();
    let (i2, w2) = routing::route(&dev, &x, &cfg, Some(&bias)).unwrap();
    assert_eq!(dev.download(&i1).unwrap(), dev.download(&i2).unwrap());
    let (w1, w2) = (dev.download(&w1).unwrap(), dev.download(&w2).unwrap());
    assert!(w1.iter().zip(&w2).all(|(a, b)| a.to_bits() == b.to_bits()));

    let e = routing::route(&dev, &x, &cfg, None).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "bias", .. }), "{e}");
    let x3 = dev.zeros::<f32>(&[2, 3, 4]).unwrap();
    let e = routing::route(&dev, &x3, &RouterConfig::mixtral(2), None).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "logits", .. }), "{e}");
    let x = dev.zeros::<f16>(&[5, 8]).unwrap();
    let (mut ids, mut w) = (
        dev.zeros::<i32>(&[5, 3]).unwrap(),
        dev.zeros::<f32>(&[5, 2]).unwrap(),
    );
    let e = routing::route_into(
        &dev,
        &mut ids,
        &mut w,
        None,
        &x,
        &RouterConfig::mixtral(2),
        None,
    );
    assert!(matches!(e, Err(Error::Shape { arg: "ids", .. })), "{e:?}");
}

#[test]
fn capacity_drops_later_slots_in_token_order() {
    // T = 4, K = 2, E = 3, C = 2. Expert 0 is chosen at flat slots 0, 2, 4, 7: 4 and 7 drop;
    // expert 1 at 1, 5, 6: 6 drops; expert 2 once.
    let ids = [0, 1, 0, 2, 0, 1, 1, 0];
    let w: Vec<f64> = (1..=8).map(f64::from).collect();
    let (out, ow, dropped) = reference::apply_capacity(&ids, &w, 3, 2);
    assert_eq!(out, [0, 1, 0, 2, -1, 1, -1, -1]);
    assert_eq!(ow, [1.0, 2.0, 3.0, 4.0, 0.0, 6.0, 0.0, 0.0]);
    assert_eq!(dropped, [-1, -1, -1, -1, 0, -1, 1, 0]);
    // -1 slots pass through and are never counted.
    let (out, _, dropped) = reference::apply_capacity(&[-1, 0, -1, 0], &[0.0; 4], 1, 1);
    assert_eq!((out, dropped), (vec![-1, 0, -1, -1], vec![-1, -1, -1, 0]));
    assert_eq!(routing::capacity_for(1.25, 10, 2, 4).unwrap(), 7);
    assert_eq!(routing::capacity_for(1.0, 0, 2, 4).unwrap(), 0);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(routing::capacity_for(bad, 10, 2, 4).is_err());
    }
}

#[test]
fn router_stats_by_hand() {
    let logits = [0.0, 0.0, 3f64.ln(), 0.0];
    let (fraction, mean_prob, z) = reference::router_stats(&logits, 2, &[0, 0]);
    assert_eq!(fraction, [1.0, 0.0]);
    assert_weights(&mean_prob, &[0.625, 0.375]);
    let (l2, l4) = (2f64.ln(), 4f64.ln());
    assert_relative_eq!(z, (l2 * l2 + l4 * l4) / 2.0, max_relative = 1e-14);
}

#[test]
fn router_projection_by_hand() {
    // x = [[1, 2], [0, -1]], w = [[1, 0], [2, 3], [-1, 1]], bias = [0.5, 0, 0].
    let out = reference::router_logits(
        &[1.0, 2.0, 0.0, -1.0],
        &[1.0, 0.0, 2.0, 3.0, -1.0, 1.0],
        Some(&[0.5, 0.0, 0.0]),
        (2, 3, 2),
    );
    assert_eq!(out, [1.5, 8.0, 1.0, 0.5, -3.0, -1.0]);
}

#[test]
fn gpu_capacity_and_stats_match_reference() {
    let Some(dev) = common::gpu("gpu_capacity_and_stats_match_reference") else {
        return;
    };
    let mut rng = Rng::new(0xca9);
    for (t, e, k, factor) in [
        (1usize, 8usize, 2usize, 1.0),
        (1000, 8, 2, 1.0),
        (777, 60, 4, 0.5),
        (300, 4, 1, 2.0),
    ] {
        // Skewed logits so some experts overflow.
        let logits: Vec<f32> = (0..t * e)
            .map(|i| (rng.normal() + if i % e == 0 { 1.5 } else { 0.0 }) as f32)
            .collect();
        let x = dev.upload(&logits, &[t, e]).unwrap();
        // Odd T: top-p, whose -1 slots capacity must pass through.
        let cfg = if t % 2 == 1 && k > 1 {
            RouterConfig::new(
                RouterRule::TopP {
                    p: 0.5,
                    renormalize: true,
                },
                k,
            )
        } else {
            RouterConfig::qwen(k, true)
        };
        let mut ids = dev.zeros::<i32>(&[t, k]).unwrap();
        let mut w = dev.zeros::<f32>(&[t, k]).unwrap();
        let mut counts = dev.zeros::<i32>(&[e]).unwrap();
        routing::route_into(&dev, &mut ids, &mut w, Some(&mut counts), &x, &cfg, None).unwrap();

        let c = routing::capacity_for(factor, t, k, e).unwrap();
        let mut ids2 = dev.filled_bytes::<i32>(&[t, k], 0x7f).unwrap();
        let mut w2 = dev.filled_bytes::<f32>(&[t, k], 0xff).unwrap();
        let mut dropped = dev.zeros::<i32>(&[t, k]).unwrap();
        routing::apply_capacity_into(&dev, &mut ids2, &mut w2, &mut dropped, &ids, &w, e, c)
            .unwrap();
        let (ids_h, w_h) = (dev.download(&ids).unwrap(), dev.download(&w).unwrap());
        let w64: Vec<f64> = w_h.iter().map(|&v| f64::from(v)).collect();
        let (want_ids, want_w, want_dropped) = reference::apply_capacity(&ids_h, &w64, e, c);
        assert_eq!(
            dev.download(&ids2).unwrap(),
            want_ids,
            "capacity ids T={t} E={e}"
        );
        let got_w: Vec<f64> = dev
            .download(&w2)
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        assert_eq!(got_w, want_w, "capacity weights T={t} E={e}");
        assert_eq!(
            dev.download(&dropped).unwrap(),
            want_dropped,
            "dropped T={t} E={e}"
        );

        let mut stats = routing::RouterStats::new(&dev, e).unwrap();
        let mut lse = dev.zeros::<f32>(&[t]).unwrap();
        routing::router_stats_into(&dev, &mut stats, &mut lse, &x, &counts).unwrap();
        let l64: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
        let (fraction, mean_prob, z) = reference::router_stats(&l64, e, &ids_h);
        let tol = Tolerance::new(1e-7, 1e-5);
        for (name, got, want) in [
            ("fraction", dev.download(&stats.fraction).unwrap(), fraction),
            (
                "mean_prob",
                dev.download(&stats.mean_prob).unwrap(),
                mean_prob,
            ),
            ("z_loss", dev.download(&stats.z_loss).unwrap(), vec![z]),
        ] {
            let r = check::compare(&got, &want, tol);
            println!("router_stats {name} T={t} E={e}: {r}");
            assert!(r.passed(), "router_stats {name} T={t} E={e}: {r}");
        }
    }
}

fn projection_case<X: Float, W: Float>(
    dev: &Device,
    t: usize,
    h: usize,
    e: usize,
    with_bias: bool,
) {
    let mut rng = Rng::new((t * 31 + h * 7 + e) as u64);
    let x: Vec<X> = rng.normal_vec(t * h, 1.0);
    let w: Vec<W> = rng.normal_vec(e * h, 0.05);
    let b: Vec<W> = rng.normal_vec(e, 0.5);
    let (xd, wd, bd) = (
        dev.upload(&x, &[t, h]).unwrap(),
        dev.upload(&w, &[e, h]).unwrap(),
        dev.upload(&b, &[e]).unwrap(),
    );
    let f = |v: &[X]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let g = |v: &[W]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let bias64 = with_bias.then(|| g(&b));
    let want = reference::router_logits(&f(&x), &g(&w), bias64.as_deref(), (t, e, h));
    // One rounding to W, plus f32 accumulation over H terms of size ~|x||w|.
    let tol = Tolerance::new(1e-5 * (h as f64).sqrt(), 2.0 * W::EPSILON);
    let bits = |v: &[W]| v.iter().map(|a| a.to_f64().to_bits()).collect::<Vec<_>>();
    let mut v2_bits = Vec::new();
    for version in [
        RouterLogitsVersion::V1,
        RouterLogitsVersion::V2,
        RouterLogitsVersion::V3,
    ] {
        let mut out = dev.filled_bytes::<W>(&[t, e], 0xff).unwrap();
        let bias = with_bias.then_some(&bd);
        routing::router_logits_version_into(dev, version, &mut out, &xd, &wd, bias).unwrap();
        let got = dev.download(&out).unwrap();
        let r = check::compare(&got, &want, tol);
        let what = format!(
            "router_logits {version:?} {}x{} T={t} H={h} E={e}",
            X::DTYPE,
            W::DTYPE
        );
        println!("{what}: {r}");
        assert!(r.passed(), "{what}: {r}");
        // The last token alone: the same bits as in the batch (the order does not depend on T).
        let last = dev.upload(&x[(t - 1) * h..], &[1, h]).unwrap();
        let mut one = dev.filled_bytes::<W>(&[1, e], 0xff).unwrap();
        routing::router_logits_version_into(dev, version, &mut one, &last, &wd, bias).unwrap();
        assert_eq!(
            bits(&dev.download(&one).unwrap()),
            bits(&got[(t - 1) * e..]),
            "{what}: the last token alone"
        );
        // v2 and v3 sum in one order, so the layer may switch between them by T.
        match version {
            RouterLogitsVersion::V2 => v2_bits = bits(&got),
            RouterLogitsVersion::V3 => assert_eq!(bits(&got), v2_bits, "{what}: v3 against v2"),
            RouterLogitsVersion::V1 => {}
        }
    }
}

#[test]
fn gpu_router_projection_and_two_launch_routing() {
    let Some(dev) = common::gpu("gpu_router_projection_and_two_launch_routing") else {
        return;
    };
    for (t, h, e) in [
        (1, 2048, 128),
        (33, 4096, 8),
        (5, 1000, 60),
        (9, 1001, 12),
        (64, 7168, 256),
    ] {
        projection_case::<f32, f32>(&dev, t, h, e, true);
        projection_case::<bf16, bf16>(&dev, t, h, e, t % 2 == 1);
        projection_case::<f16, f16>(&dev, t, h, e, false);
        projection_case::<bf16, f32>(&dev, t, h, e, false);
        projection_case::<f16, f32>(&dev, t, h, e, false);
    }
    // x -> ids in two launches, consistent with routing the logits it produced.
    let (t, h, e) = (300, 2048, 256);
    let mut rng = Rng::new(9);
    let x = dev
        .upload(&rng.normal_vec::<bf16>(t * h, 1.0), &[t, h])
        .unwrap();
    let w = dev
        .upload(&rng.normal_vec::<f32>(e * h, 0.03), &[e, h])
        .unwrap();
    let bias_h: Vec<f32> = (0..e).map(|_| rng.uniform(-0.05, 0.05) as f32).collect();
    let bias = dev.upload(&bias_h, &[e]).unwrap();
    let cfg = RouterConfig::deepseek_v3(8, 8, 4, true, 2.5);
    let mut logits = dev.zeros::<f32>(&[t, e]).unwrap();
    let mut ids = dev.zeros::<i32>(&[t, 8]).unwrap();
    let mut wts = dev.zeros::<f32>(&[t, 8]).unwrap();
    routing::route_hidden_into(
        &dev,
        &mut ids,
        &mut wts,
        &mut logits,
        &x,
        &w,
        None,
        &cfg,
        Some(&bias),
    )
    .unwrap();
    let l = dev.download(&logits).unwrap();
    check_case(&dev, &l, e, &cfg, Some(&bias_h), Some(0.01));
    let got = dev.download(&ids).unwrap();
    let again = routing::route(&dev, &logits, &cfg, Some(&bias)).unwrap().0;
    assert_eq!(got, dev.download(&again).unwrap());

    let wrong = dev.zeros::<bf16>(&[e, h + 1]).unwrap();
    let mut out = dev.zeros::<bf16>(&[t, e]).unwrap();
    let err = routing::router_logits_into(&dev, &mut out, &x, &wrong, None).unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "w", .. }), "{err}");
    let w16 = dev.zeros::<f16>(&[e, h]).unwrap();
    let mut out16 = dev.zeros::<f16>(&[t, e]).unwrap();
    let err = routing::router_logits_into(&dev, &mut out16, &x, &w16, None).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}

fn stats_case<T: Float>(dev: &Device) {
    let (t, e) = (50, 96);
    let mut rng = Rng::new(0x57a7);
    let mut logits: Vec<T> = rng.normal_vec(t * e, 3.0);
    // Row 3 all -inf (lse = -inf), row 7 holds a NaN, row 9 a +inf.
    for v in &mut logits[3 * e..4 * e] {
        *v = T::from_f64(f64::NEG_INFINITY);
    }
    logits[7 * e + 5] = T::from_f64(f64::NAN);
    logits[9 * e + 50] = T::from_f64(f64::INFINITY);
    let x = dev.upload(&logits, &[t, e]).unwrap();
    let cfg = RouterConfig::mixtral(2);
    let (mut ids, mut w) = (dev.zeros(&[t, 2]).unwrap(), dev.zeros(&[t, 2]).unwrap());
    let mut counts = dev.zeros::<i32>(&[e]).unwrap();
    routing::route_into(dev, &mut ids, &mut w, Some(&mut counts), &x, &cfg, None).unwrap();
    let mut stats = routing::RouterStats::new(dev, e).unwrap();
    let mut lse = dev.filled_bytes::<f32>(&[t], 0xff).unwrap();
    routing::router_stats_into(dev, &mut stats, &mut lse, &x, &counts).unwrap();
    let l64: Vec<f64> = logits.iter().map(|v| v.to_f64()).collect();
    let (fraction, mean_prob, z) = reference::router_stats(&l64, e, &dev.download(&ids).unwrap());
    let tol = Tolerance::new(1e-7, 1e-5);
    for (name, got, want) in [
        ("fraction", dev.download(&stats.fraction).unwrap(), fraction),
        (
            "mean_prob",
            dev.download(&stats.mean_prob).unwrap(),
            mean_prob,
        ),
        ("z_loss", dev.download(&stats.z_loss).unwrap(), vec![z]),
    ] {
        let r = check::compare(&got, &want, tol);
        println!("router_stats {name} {}: {r}", T::DTYPE);
        assert!(r.passed(), "router_stats {name} {}: {r}", T::DTYPE);
    }
    let lse = dev.download(&lse).unwrap();
    assert_eq!(lse[3], f32::NEG_INFINITY);
    assert!(lse[7].is_nan() && lse[9].is_nan() && lse[0].is_finite());
}

#[test]
fn gpu_router_stats_in_every_dtype_and_non_finite_rows() {
    let Some(dev) = common::gpu("gpu_router_stats_in_every_dtype_and_non_finite_rows") else {
        return;
    };
    stats_case::<f32>(&dev);
    stats_case::<bf16>(&dev);
    stats_case::<f16>(&dev);
}

#[test]
fn reference_lse_of_an_all_minus_inf_row_is_minus_inf() {
    let (_, mean_prob, z) = reference::router_stats(&[f64::NEG_INFINITY; 4], 4, &[0]);
    assert_eq!(z, f64::INFINITY);
    assert!(mean_prob.iter().all(|p| p.is_nan()));
}
