//! Permutation: the plan, gather and combine references against hand-worked cases, and the
//! kernels against the references on random and adversarial routings.

mod common;

use half::{bf16, f16};
use moe_kernels::check::{self, Tolerance};
use moe_kernels::permute::reference::{self, CombineExtras};
use moe_kernels::permute::{self, CombineInputs, Layout, Plan};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Error, Float};

#[test]
fn plan_by_hand() {
    // T = 3, K = 2; E = 3 GEMM experts, expert 3 is a zero-computation expert; block_m = 4.
    // Slots: 0 -> 2, 1 -> 0, 2 -> 0, 3 -> -1, 4 -> 2, 5 -> 3.
    let p = reference::plan(&[2, 0, 0, -1, 2, 3], 3, 4, 4);
    assert_eq!(p.counts, [2, 0, 2]);
    assert_eq!(p.offsets, [0, 2, 2, 4]);
    assert_eq!(p.padded_offsets, [0, 4, 4, 8]);
    assert_eq!(p.sorted_slots, [1, 2, 0, 4, -1, -1]);
    assert_eq!(p.slot_rows, [2, 0, 1, -1, 3, -1]);
    assert_eq!(p.padded_slots.len(), 16); // 6 slots + 3 experts x 3 rows of slack, in blocks of 4
    assert_eq!(&p.padded_slots[..8], [1, 2, -1, -1, 0, 4, -1, -1]);
    assert!(p.padded_slots[8..].iter().all(|&s| s == -1));
    assert_eq!(p.slot_padded_rows, [4, 0, 1, -1, 5, -1]);
    assert_eq!(p.block_experts, [0, 2, -1, -1]);
    assert_eq!(p.bad_ids, 0);
    assert_eq!(reference::plan(&[5, -2, 0, 3], 3, 4, 1).bad_ids, 2);
}

#[test]
fn combine_by_hand() {
    // T = 2, K = 2, H = 2, E = 2 GEMM experts, expert 2 copies its input, expert 3 is zero.
    // Token 0: slot 0 -> row 1 (w 0.5), slot 1 -> copy (w 0.25). Token 1: row 0 (w 2), zero.
    let rows = [1.0, 2.0, 10.0, 20.0];
    let x = [4.0, 8.0, 100.0, 200.0];
    let y = reference::combine(
        &rows,
        2,
        &[1, -1, 0, -1],
        &[1, 2, 0, 3],
        Some(&[0.5, 0.25, 2.0, 1.0]),
        2,
        2,
        CombineExtras {
            x: Some(&x),
            zc_kinds: Some(&[1, 0]),
            shared: Some(&[1.0, 1.0, 3.0, 3.0]),
            shared_gate: Some(&[0.0, 0.0]),
            residual: Some(&[0.0, 0.5, 0.0, 0.0]),
            ..Default::default()
        },
    );
    // 0.5*[10,20] + 0.25*[4,8] + 0.5*[1,1] + [0,0.5] = [6.5, 13.0]; 2*[1,2] + 0.5*[3,3].
    assert_eq!(y, [6.5, 13.0, 3.5, 5.5]);
}

#[test]
fn constant_expert_by_hand() {
    // One token, x = [1, 2], K = 1 on constant expert 1 (E = 1 GEMM expert) with weight 0.5.
    // W = [[1, 0], [0, 0]]: logits (1, 0), so a1 = e/(e+1), a2 = 1/(e+1); v = [10, 20].
    let e = std::f64::consts::E;
    let (a1, a2) = (e / (e + 1.0), 1.0 / (e + 1.0));
    let y = reference::combine(
        &[],
        2,
        &[-1],
        &[1],
        Some(&[0.5]),
        1,
        1,
        CombineExtras {
            x: Some(&[1.0, 2.0]),
            zc_kinds: Some(&[2]),
            const_w: Some(&[1.0, 0.0, 0.0, 0.0]),
            const_v: Some(&[10.0, 20.0]),
            ..Default::default()
        },
    );
    let want = [0.5 * (a1 + 10.0 * a2), 0.5 * (2.0 * a1 + 20.0 * a2)];
    assert!(
        (y[0] - want[0]).abs() < 1e-14 && (y[1] - want[1]).abs() < 1e-14,
        "{y:?}"
    );
}

#[test]
fn gather_by_hand() {
    let rows = reference::gather(&[1.0, 2.0, 3.0, 4.0], 2, &[3, -1, 0], 2);
    assert_eq!(rows, [Some(vec![3.0, 4.0]), None, Some(vec![1.0, 2.0])]);
}

/// A routing of T tokens: ids in [0, e_total) with a few -1 and skew toward low experts.
fn routing_ids(rng: &mut Rng, t: usize, k: usize, e_total: usize, drop: bool) -> Vec<i32> {
    (0..t * k)
        .map(|_| {
            if drop && rng.below(10) == 0 {
                -1
            } else if rng.below(3) == 0 {
                rng.below(e_total.min(3) as u64) as i32
            } else {
                rng.below(e_total as u64) as i32
            }
        })
        .collect()
}

fn check_plan(dev: &Device, plan: &mut Plan, ids: &[i32], label: &str) -> reference::PlanRef {
    let (k, e, et, bm) = (
        plan.k(),
        plan.experts(),
        plan.experts_total(),
        plan.block_m(),
    );
    let t = ids.len() / k;
    let idt = dev.upload(ids, &[t, k]).unwrap();
    plan.build(dev, &idt).unwrap();
    let want = reference::plan(ids, e, et, bm);
    let s = t * k;
    let pcap = reference::padded_capacity(s, e, bm);
    let get = |x: &moe_kernels::Tensor<i32>, n: usize| dev.download(x).unwrap()[..n].to_vec();
    assert_eq!(get(&plan.counts, e), want.counts, "{label}: counts");
    assert_eq!(get(&plan.offsets, e + 1), want.offsets, "{label}: offsets");
    assert_eq!(
        get(&plan.padded_offsets, e + 1),
        want.padded_offsets,
        "{label}: padded_offsets"
    );
    assert_eq!(
        get(&plan.sorted_slots, s),
        want.sorted_slots,
        "{label}: sorted_slots"
    );
    assert_eq!(
        get(&plan.slot_rows, s),
        want.slot_rows,
        "{label}: slot_rows"
    );
    assert_eq!(
        get(&plan.padded_slots, pcap),
        want.padded_slots,
        "{label}: padded_slots"
    );
    assert_eq!(
        get(&plan.slot_padded_rows, s),
        want.slot_padded_rows,
        "{label}: slot_padded_rows"
    );
    assert_eq!(
        get(&plan.block_experts, pcap / bm),
        want.block_experts,
        "{label}: block_experts"
    );
    // The masked layout's overflowing slots count into the same status.
    let overflow = plan
        .masked
        .as_ref()
        .map_or(0, |m| reference::masked(&want, m.max_rows).3);
    let status = dev.download(&plan.status).unwrap()[0] as usize;
    assert_eq!(status, want.bad_ids + overflow, "{label}: status");
    want
}

#[test]
fn gpu_plan_matches_reference_bit_for_bit() {
    let Some(dev) = common::gpu("gpu_plan_matches_reference_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(0x91a);
    // (T, K, E, E_total, block_m)
    for &(t, k, e, et, bm) in &[
        (0usize, 2usize, 8usize, 8usize, 64usize),
        (1, 1, 1, 1, 1),
        (1, 8, 256, 256, 128),
        (37, 2, 8, 10, 16),
        (300, 4, 60, 64, 64),
        (1000, 8, 256, 256, 64),
        (4096, 8, 256, 258, 128),
        (513, 2, 1024, 1024, 32),
    ] {
        let mut plan = Plan::new(&dev, t.max(1), k, e, et, bm).unwrap();
        let ids = routing_ids(&mut rng, t, k, et, true);
        check_plan(
            &dev,
            &mut plan,
            &ids,
            &format!("T={t} K={k} E={e}/{et} bm={bm}"),
        );
        plan.check(&dev).unwrap();
    }
    // All tokens on one expert; then, with the same buffers, a smaller T.
    let mut plan = Plan::new(&dev, 2000, 8, 64, 64, 128).unwrap();
    check_plan(&dev, &mut plan, &vec![17; 2000 * 8], "all on expert 17");
    let ids = routing_ids(&mut rng, 5, 8, 64, false);
    check_plan(&dev, &mut plan, &ids, "rebuilt for T=5");
    // Bad ids are counted, skipped, and reported by check().
    let mut plan = Plan::new(&dev, 4, 2, 4, 6, 8).unwrap();
    let bad = [0, 9, -5, 5, 4, 1, 3, 6];
    check_plan(&dev, &mut plan, &bad, "bad ids");
    assert!(matches!(plan.check(&dev), Err(Error::DeviceCheck { .. })));
    // Ids 9, -5 and 6 are bad (E_total = 6). The combine skips the same three slots and counts
    // them again: status totals skip events.
    let ids = dev.upload(&bad, &[4, 2]).unwrap();
    let rows = dev
        .upload(
            &vec![1.0f32; plan.rows(Layout::Sorted) * 8],
            &[plan.rows(Layout::Sorted), 8],
        )
        .unwrap();
    let mut y = dev.zeros::<f32>(&[4, 8]).unwrap();
    permute::combine_into(
        &dev,
        &mut y,
        &rows,
        &mut plan,
        Layout::Sorted,
        &ids,
        CombineInputs::default(),
    )
    .unwrap();
    assert_eq!(dev.download(&plan.status).unwrap()[0], 6);
    // Token 0: slot 0 -> expert 0 (a row of ones), slot 1 -> bad id 9: skipped.
    assert_eq!(dev.download(&y).unwrap()[..8], [1.0; 8]);
}

fn gather_and_combine<T: Float>(
    dev: &Device,
    t: usize,
    k: usize,
    e: usize,
    et: usize,
    h: usize,
    bm: usize,
) {
    let label = format!("{} T={t} K={k} E={e}/{et} H={h}", T::DTYPE);
    let mut rng = Rng::new((t * 7 + h) as u64);
    let ids = routing_ids(&mut rng, t, k, et, true);
    // M = the largest expert's count: nothing overflows (overflow has its own test), and the
    // masked buffers stay E x M rather than E x T*K.
    let m = reference::plan(&ids, e, et, bm)
        .counts
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(1) as usize;
    let mut plan = Plan::new(dev, t, k, e, et, bm)
        .unwrap()
        .with_masked(dev, m)
        .unwrap();
    let want_plan = check_plan(dev, &mut plan, &ids, &label);
    let (masked_slots, masked_rows, _, overflow) = reference::masked(&want_plan, m);
    assert_eq!(overflow, 0);
    let x: Vec<T> = rng.normal_vec(t * h, 1.0);
    let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let xd = dev.upload(&x, &[t, h]).unwrap();
    let idd = dev.upload(&ids, &[t, k]).unwrap();

    for layout in [Layout::Sorted, Layout::Padded, Layout::Masked] {
        let rows = plan.rows(layout);
        let mut out = dev.filled_bytes::<T>(&[rows, h], 0xff).unwrap();
        permute::gather_into(dev, &mut out, &xd, &mut plan, layout).unwrap();
        let got = dev.download(&out).unwrap();
        let (row_slots, used) = match layout {
            Layout::Sorted => (&want_plan.sorted_slots, want_plan.offsets[e] as usize),
            Layout::Padded => (
                &want_plan.padded_slots,
                want_plan.padded_offsets[e] as usize,
            ),
            Layout::Masked => (&masked_slots, e * m),
        };
        for (r, want) in reference::gather(&x64, h, row_slots, k)
            .iter()
            .enumerate()
            .take(used)
        {
            let row: Vec<f64> = got[r * h..(r + 1) * h].iter().map(|v| v.to_f64()).collect();
            match want {
                Some(w) => assert_eq!(&row, w, "{label} {layout:?}: row {r}"),
                // Padding is zeroed; masked rows past an expert's count are left alone.
                None if layout == Layout::Padded => assert!(
                    row.iter().all(|&v| v == 0.0),
                    "{label} {layout:?}: padding row {r} not zeroed"
                ),
                None => {}
            }
        }

        // Expert outputs: any rows will do; combine must pick the right ones.
        let expert_out: Vec<T> = rng.normal_vec(rows * h, 1.0);
        let w: Vec<f32> = (0..t * k).map(|_| rng.uniform(0.0, 1.0) as f32).collect();
        let shared: Vec<T> = rng.normal_vec(t * h, 0.5);
        let gate: Vec<T> = rng.normal_vec(t, 2.0);
        let resid: Vec<T> = rng.normal_vec(t * h, 1.0);
        let kinds: Vec<i32> = (0..et - e).map(|z| (z % 3) as i32).collect();
        let const_w: Vec<T> = rng.normal_vec((et - e) * 2 * h, 0.02);
        let const_v: Vec<T> = rng.normal_vec((et - e) * h, 1.0);
        let d = |v: &[T], shape: &[usize]| dev.upload(v, shape).unwrap();
        let (eo, sh, g, rs) = (
            d(&expert_out, &[rows, h]),
            d(&shared, &[t, h]),
            d(&gate, &[t]),
            d(&resid, &[t, h]),
        );
        let wd = dev.upload(&w, &[t, k]).unwrap();
        let kd = dev.upload(&kinds, &[et - e]).unwrap();
        let (cw, cv) = (d(&const_w, &[et - e, 2, h]), d(&const_v, &[et - e, h]));
        let inputs = CombineInputs {
            weights: Some(&wd),
            x: Some(&xd),
            zc_kinds: Some(&kd),
            const_w: Some(&cw),
            const_v: Some(&cv),
            shared_out: Some(&sh),
            shared_gate: Some(&g),
            residual: Some(&rs),
        };
        let mut y = dev.filled_bytes::<T>(&[t, h], 0xff).unwrap();
        permute::combine_into(dev, &mut y, &eo, &mut plan, layout, &idd, inputs).unwrap();
        let got = dev.download(&y).unwrap();
        let f = |v: &[T]| v.iter().map(|a| a.to_f64()).collect::<Vec<f64>>();
        let slot_rows = match layout {
            Layout::Sorted => &want_plan.slot_rows,
            Layout::Padded => &want_plan.slot_padded_rows,
            Layout::Masked => &masked_rows,
        };
        let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
        let (sh64, g64, rs64) = (f(&shared), f(&gate), f(&resid));
        let want = reference::combine(
            &f(&expert_out),
            h,
            slot_rows,
            &ids,
            Some(&w64),
            k,
            e,
            CombineExtras {
                x: Some(&x64),
                zc_kinds: Some(&kinds),
                const_w: Some(&f(&const_w)),
                const_v: Some(&f(&const_v)),
                shared: Some(&sh64),
                shared_gate: Some(&g64),
                residual: Some(&rs64),
            },
        );
        // One rounding to T, plus f32 sums of K + 2 terms of size ~1.
        let tol = Tolerance::new(1e-5, T::EPSILON);
        let r = check::compare(&got, &want, tol);
        println!("combine {label} {layout:?}: {r}");
        assert!(r.passed(), "combine {label} {layout:?}: {r}");
        let mut y2 = dev.zeros::<T>(&[t, h]).unwrap();
        permute::combine_into(dev, &mut y2, &eo, &mut plan, layout, &idd, inputs).unwrap();
        let again = dev.download(&y2).unwrap();
        assert!(
            got.iter()
                .zip(&again)
                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits())
        );
    }
    plan.check(dev).unwrap();
}

#[test]
fn gpu_gather_and_combine_match_reference() {
    let Some(dev) = common::gpu("gpu_gather_and_combine_match_reference") else {
        return;
    };
    gather_and_combine::<f32>(&dev, 1, 1, 1, 1, 64, 1);
    gather_and_combine::<bf16>(&dev, 16, 2, 8, 10, 4096, 64);
    gather_and_combine::<f16>(&dev, 33, 8, 60, 62, 1000, 16); // H not a multiple of 8: scalar
    gather_and_combine::<bf16>(&dev, 512, 8, 256, 256, 7168, 128);
    gather_and_combine::<f32>(&dev, 100, 4, 16, 20, 2048, 32);
}

#[test]
fn gpu_permute_refuses_bad_shapes() {
    let Some(dev) = common::gpu("gpu_permute_refuses_bad_shapes") else {
        return;
    };
    assert!(matches!(
        Plan::new(&dev, 4, 2, 0, 0, 64),
        Err(Error::Shape { arg: "experts", .. })
    ));
    assert!(matches!(
        Plan::new(&dev, 4, 2, 8, 4, 64),
        Err(Error::Shape {
            arg: "experts_total",
            ..
        })
    ));
    assert!(matches!(
        Plan::new(&dev, 4, 2, 8, 8, 0),
        Err(Error::Shape { arg: "block_m", .. })
    ));
    let mut plan = Plan::new(&dev, 4, 2, 8, 8, 16).unwrap();
    let ids = dev.zeros::<i32>(&[5, 2]).unwrap();
    assert!(matches!(
        plan.build(&dev, &ids),
        Err(Error::Shape { arg: "ids", .. })
    ));
    let ids = dev.zeros::<i32>(&[4, 2]).unwrap();
    plan.build(&dev, &ids).unwrap();
    let x = dev.zeros::<bf16>(&[3, 64]).unwrap();
    let mut out = dev.zeros::<bf16>(&[8, 64]).unwrap();
    let e = permute::gather_into(&dev, &mut out, &x, &mut plan, Layout::Sorted).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
}

#[test]
fn masked_and_ep_by_hand() {
    // Slots 0 -> 2, 1 -> 0, 2 -> 0, 3 -> -1, 4 -> 2, 5 -> 0 over E = 3; M = 2: expert 0 overflows.
    let p = reference::plan(&[2, 0, 0, -1, 2, 0], 3, 3, 1);
    let (slots, rows, kept, overflow) = reference::masked(&p, 2);
    assert_eq!(slots, [1, 2, -1, -1, 0, 4]);
    assert_eq!(rows, [4, 0, 1, -1, 5, -1]);
    assert_eq!((kept, overflow), (vec![2, 0, 2], 1));
    // Experts 0 and 2 on rank 1, expert 1 on rank 0: rank 1 gets expert 0's slots, then 2's.
    let (counts, order, bad) = reference::ep_send(&p, &[1, 0, 1], 2);
    assert_eq!((counts, bad), (vec![0, 5], 0));
    assert_eq!(order, [1, 2, 5, 0, 4, -1]);
    assert_eq!(reference::ep_send(&p, &[1, 7, -1], 2).2, 2);
}

#[test]
fn gpu_masked_overflow_and_ep_send_match_reference() {
    let Some(dev) = common::gpu("gpu_masked_overflow_and_ep_send_match_reference") else {
        return;
    };
    let mut rng = Rng::new(0xe9);
    for &(t, k, e, m, ranks) in &[
        (1usize, 8usize, 256usize, 4usize, 8usize),
        (700, 2, 8, 150, 2),
        (333, 8, 60, 40, 7),
    ] {
        let ids = routing_ids(&mut rng, t, k, e, true);
        let mut plan = Plan::new(&dev, t, k, e, e, 64)
            .unwrap()
            .with_masked(&dev, m)
            .unwrap();
        let want = check_plan(&dev, &mut plan, &ids, "masked");
        let (slots, rows, kept, _) = reference::masked(&want, m);
        let mk = plan.masked.as_ref().unwrap();
        assert_eq!(dev.download(&mk.masked_slots).unwrap(), slots);
        assert_eq!(dev.download(&mk.slot_masked_rows).unwrap(), rows);
        assert_eq!(dev.download(&mk.masked_counts).unwrap(), kept);

        let rank_of: Vec<i32> = (0..e).map(|x| ((x * 7 + 3) % ranks) as i32).collect();
        let rank_d = dev.upload(&rank_of, &[e]).unwrap();
        let mut counts = dev.filled_bytes::<i32>(&[ranks], 0x7f).unwrap();
        let mut order = dev.filled_bytes::<i32>(&[t * k], 0x7f).unwrap();
        permute::ep_send_into(&dev, &mut counts, &mut order, &mut plan, &rank_d).unwrap();
        let (want_counts, want_order, _) = reference::ep_send(&want, &rank_of, ranks);
        assert_eq!(dev.download(&counts).unwrap(), want_counts);
        assert_eq!(dev.download(&order).unwrap(), want_order);

        // Expert 0 on a rank that does not exist: it sends nothing, and status counts it.
        let mut bad_rank = rank_of.clone();
        bad_rank[0] = ranks as i32;
        let before = dev.download(&plan.status).unwrap()[0];
        let rank_d = dev.upload(&bad_rank, &[e]).unwrap();
        permute::ep_send_into(&dev, &mut counts, &mut order, &mut plan, &rank_d).unwrap();
        let (want_counts, want_order, bad) = reference::ep_send(&want, &bad_rank, ranks);
        assert_eq!(bad, 1);
        assert_eq!(dev.download(&counts).unwrap(), want_counts);
        assert_eq!(dev.download(&order).unwrap(), want_order);
        assert_eq!(dev.download(&plan.status).unwrap()[0], before + 1);
    }
}

#[test]
fn gpu_identity_plan_equals_the_plan_of_zero_ids() {
    let Some(dev) = common::gpu("gpu_identity_plan_equals_the_plan_of_zero_ids") else {
        return;
    };
    for block_m in [64, 128] {
        let max_t = 300;
        let mut built = Plan::new(&dev, max_t, 1, 1, 1, block_m).unwrap();
        let mut ident = Plan::new(&dev, max_t, 1, 1, 1, block_m).unwrap();
        // Large T then small: every entry past T must be reset, as the full build resets it.
        for t in [300, 1, 0, 64, 65, 129, 7] {
            let ids = dev.zeros::<i32>(&[t, 1]).unwrap();
            built.build(&dev, &ids).unwrap();
            ident.build_identity(&dev, t).unwrap();
            let s = t;
            let p = reference::padded_capacity(s, 1, block_m);
            let get = |plan: &Plan| {
                let d = |x: &moe_kernels::Tensor<i32>| dev.download(x).unwrap();
                (
                    d(&plan.counts),
                    d(&plan.offsets),
                    d(&plan.padded_offsets),
                    d(&plan.sorted_slots),
                    d(&plan.padded_slots),
                    d(&plan.slot_rows)[..s].to_vec(),
                    d(&plan.slot_padded_rows)[..s].to_vec(),
                    d(&plan.block_experts)[..p / block_m].to_vec(),
                    d(&plan.status),
                )
            };
            assert_eq!(get(&ident), get(&built), "block_m {block_m}, T = {t}");
            assert_eq!(ident.tokens(), t);
            let want = reference::plan(&vec![0; t], 1, 1, block_m);
            assert_eq!(
                dev.download(&ident.padded_offsets).unwrap(),
                want.padded_offsets
            );
        }
        let mut wide = Plan::new(&dev, 8, 2, 1, 1, 64).unwrap();
        assert!(
            wide.build_identity(&dev, 4).is_err(),
            "K = 2 is not an identity"
        );
        assert!(ident.build_identity(&dev, max_t + 1).is_err());
    }
}
