//! The `candle` feature: the MoE block, routing, the plan and the grouped GEMM on candle
//! tensors equal the crate's own ops bit for bit, with no copy. Run with scripts/candle.sh test.
//!
//! candle's CUDA device creates a cuBLAS handle and a cuRAND generator as it starts. On the CPU
//! emulator scripts/candle.sh puts stand-ins for those few calls beside it (emu/shims), so these
//! tests run there; without them candle cannot start and the tests print SKIPPED with candle's
//! reason. Only the driver is used after that: no candle op here needs cuBLAS or a candle kernel.

mod common;

use std::io::Write;

use candle_core as cc;
use half::bf16;
use moe_kernels::activation::{GateLayout, GatedAct};
use moe_kernels::candle::{self as mc, CandleGemmOptions, MoeBlock};
use moe_kernels::gemm::{Epilogue, GemmOptions, GemmRows, GemmVersion};
use moe_kernels::layer::MoeLayer;
use moe_kernels::model::Model;
use moe_kernels::permute::{Layout, Plan};
use moe_kernels::rng::Rng;
use moe_kernels::routing::{self, RouterConfig, RouterRule};
use moe_kernels::{Device, routing::MAX_K};

/// The crate's device and a candle CUDA device on the same GPU, or None (SKIPPED) without a GPU
/// or on the emulator.
fn devices(test: &str) -> Option<(Device, cc::Device)> {
    let dev = common::gpu(test)?;
    match cc::Device::new_cuda(0) {
        Ok(c) => Some((dev, c)),
        Err(e) if dev.info().emulated => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: {test}: candle's CUDA device starts cuBLAS and cuRAND, which the CPU \
                 emulator runs only with scripts/candle.sh's stand-ins ({})",
                e.to_string().lines().next().unwrap_or("")
            );
            None
        }
        Err(e) => panic!("{test}: candle could not open CUDA device 0: {e}"),
    }
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gpu_candle_block_equals_the_owned_forward_with_no_copy() {
    let Some((dev, cdev)) = devices("gpu_candle_block_equals_the_owned_forward_with_no_copy")
    else {
        return;
    };
    let fixtures = common::fixtures_dir();
    for (family, t) in [("mixtral", 5), ("qwen2_moe", 3), ("deepseek_v3", 16)] {
        let dir = fixtures.join(family);
        let model = Model::open(&dir).unwrap();
        let layer = model.moe_layers().unwrap()[0];
        let (cfg, w) = model.load_layer::<f32>(layer).unwrap();
        let h = cfg.hidden;
        let mut rng = Rng::new(t as u64 + 3);
        let x: Vec<bf16> = (0..t * h)
            .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
            .collect();
        let mut owned = MoeLayer::<bf16>::new(&dev, &cfg, &w, 16).unwrap();
        let mut y = dev.zeros::<bf16>(&[t, h]).unwrap();
        owned
            .forward_into(&dev, &mut y, &dev.upload(&x, &[t, h]).unwrap())
            .unwrap();
        let want = bits(&dev.download(&y).unwrap());

        let block = MoeBlock::new(&cdev, &cfg, &w, cc::DType::BF16, 16).unwrap();
        let xc = cc::Tensor::from_vec(x.clone(), (t, h), &cdev).unwrap();
        let got = block.forward(&xc).unwrap();
        assert_eq!(got.dims(), [t, h]);
        let got: Vec<bf16> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bits(&got), want, "{family}: forward on candle tensors");

        // A narrowed tensor starts inside its storage: the view starts there too.
        let mut padded: Vec<bf16> = (0..h).map(|i| bf16::from_f32(i as f32)).collect();
        padded.extend_from_slice(&x);
        padded.extend((0..h).map(|i| bf16::from_f32(-(i as f32))));
        let inner = cc::Tensor::from_vec(padded, (t + 2, h), &cdev)
            .unwrap()
            .narrow(0, 1, t)
            .unwrap();
        let got: Vec<bf16> = block
            .forward(&inner)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(bits(&got), want, "{family}: forward on a narrowed tensor");

        // In place into candle's own output tensor: no copy, no allocation.
        let yc = cc::Tensor::zeros((t, h), cc::DType::BF16, &cdev).unwrap();
        let before = block.device().work_counts();
        block.forward_into(&yc, &xc).unwrap();
        let n = block.device().work_counts() - before;
        assert_eq!((n.copies, n.allocations), (0, 0), "{family}: {n:?}");
        let got: Vec<bf16> = yc.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bits(&got), want, "{family}: forward_into on candle tensors");
    }
}

#[test]
fn gpu_candle_block_takes_given_routing_and_masks() {
    let Some((dev, cdev)) = devices("gpu_candle_block_takes_given_routing_and_masks") else {
        return;
    };
    let dir = common::fixtures_dir().join("qwen2_moe");
    let model = Model::open(&dir).unwrap();
    let layer = model.moe_layers().unwrap()[0];
    let (cfg, w) = model.load_layer::<f32>(layer).unwrap();
    let (t, h, k) = (3, cfg.hidden, cfg.k());
    let mut rng = Rng::new(7);
    let x: Vec<bf16> = (0..t * h)
        .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
        .collect();
    // The owned layer's routing, given back through candle tensors: the same bits.
    let mut owned = MoeLayer::<bf16>::new(&dev, &cfg, &w, 16).unwrap();
    let mut y = dev.zeros::<bf16>(&[t, h]).unwrap();
    owned
        .forward_into(&dev, &mut y, &dev.upload(&x, &[t, h]).unwrap())
        .unwrap();
    let want = bits(&dev.download(&y).unwrap());
    let ids = dev.download(owned.routing().0).unwrap();
    let weights = dev.download(owned.routing().1).unwrap();
    let block = MoeBlock::new(&cdev, &cfg, &w, cc::DType::BF16, 16).unwrap();
    let xc = cc::Tensor::from_vec(x, (t, h), &cdev).unwrap();
    let ic = cc::Tensor::from_vec(ids.clone(), (t, k), &cdev).unwrap();
    let wc = cc::Tensor::from_vec(weights.clone(), (t, k), &cdev).unwrap();
    let got: Vec<bf16> = block
        .forward_routed(&xc, &ic, &wc)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(bits(&got), want, "given routing through candle");
    // Weights of another dtype, ids of another shape, a repeated id (made on the host: the
    // emulator runs none of candle's own kernels).
    let wb: Vec<bf16> = weights.iter().map(|&v| bf16::from_f32(v)).collect();
    let wb = cc::Tensor::from_vec(wb, (t, k), &cdev).unwrap();
    let e = block.forward_routed(&xc, &ic, &wb).unwrap_err();
    assert!(e.to_string().contains("topk_weights"), "{e}");
    let narrow: Vec<i32> = ids.chunks(k).flat_map(|r| r[..k - 1].to_vec()).collect();
    let i2 = cc::Tensor::from_vec(narrow, (t, k - 1), &cdev).unwrap();
    let e = block.forward_routed(&xc, &i2, &wc).unwrap_err();
    assert!(e.to_string().contains("topk_ids"), "{e}");
    let mut rep = ids.clone();
    rep[1] = rep[0];
    let ir = cc::Tensor::from_vec(rep, (t, k), &cdev).unwrap();
    let e = block.forward_routed(&xc, &ir, &wc).unwrap_err();
    assert!(e.to_string().contains("repeated"), "{e}");
    // A mask on the first chosen expert: the block's output changes.
    block.set_expert_masks(&[&[ids[0] as usize]]).unwrap();
    let masked: Vec<bf16> = block
        .forward(&xc)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(bits(&masked), want, "the mask changed nothing");
}

#[test]
fn gpu_candle_routing_plan_and_grouped_gemm_equal_the_crates_ops() {
    let Some((dev, cdev)) =
        devices("gpu_candle_routing_plan_and_grouped_gemm_equal_the_crates_ops")
    else {
        return;
    };
    let cd = mc::device(&cdev).unwrap();
    let (t, e, k, kd, n) = (37, 16, 4, 64, 96);
    assert!(k <= MAX_K);
    let mut rng = Rng::new(11);
    let logits: Vec<f32> = (0..t * e).map(|_| rng.uniform(-3.0, 3.0) as f32).collect();
    let cfg = RouterConfig::new(RouterRule::SoftmaxTopK { renormalize: true }, k);

    let (ids, weights) =
        routing::route(&dev, &dev.upload(&logits, &[t, e]).unwrap(), &cfg, None).unwrap();
    let lc = cc::Tensor::from_vec(logits.clone(), (t, e), &cdev).unwrap();
    let (cids, cweights) = mc::route(&cd, &lc, &cfg, None).unwrap();
    assert_eq!(cids.dtype(), cc::DType::I32);
    let cids_v: Vec<i32> = cids.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(cids_v, dev.download(&ids).unwrap());
    let cw: Vec<f32> = cweights.flatten_all().unwrap().to_vec1().unwrap();
    let ow = dev.download(&weights).unwrap();
    assert!(cw.iter().zip(&ow).all(|(a, b)| a.to_bits() == b.to_bits()));

    // The plan from candle's ids, and the gather-free v2 GEMM with SwiGLU and the routing weight
    // on the output, against the crate's own.
    let x: Vec<bf16> = (0..t * kd)
        .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
        .collect();
    let w: Vec<bf16> = (0..e * n * kd)
        .map(|_| bf16::from_f64(rng.uniform(-0.2, 0.2)))
        .collect();
    let epilogue = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };
    let bm = GemmVersion::V2.block_m();
    let mut plan = Plan::new(&dev, t, k, e, e, bm).unwrap();
    plan.build(&dev, &ids).unwrap();
    let p = plan.rows(Layout::Padded);
    let mut out = dev.zeros::<bf16>(&[p, n / 2]).unwrap();
    let xd = dev.upload(&x, &[t, kd]).unwrap();
    let wd = dev.upload(&w, &[e, n, kd]).unwrap();
    let opts = GemmOptions {
        bias: None,
        epilogue,
        row_weights: Some((&weights, moe_kernels::gemm::ScaleAt::Output)),
    };
    moe_kernels::gemm::grouped_gemm_version_into(
        &dev,
        &mut out,
        GemmRows::Indexed(&xd),
        &wd,
        &plan,
        opts,
        GemmVersion::V2,
    )
    .unwrap();
    let want = bits(&dev.download(&out).unwrap());

    let mut cplan = Plan::new(&cd, t, k, e, e, bm).unwrap();
    mc::build_plan(&cd, &mut cplan, &cids).unwrap();
    let xc = cc::Tensor::from_vec(x, (t, kd), &cdev).unwrap();
    let wc = cc::Tensor::from_vec(w, (e, n, kd), &cdev).unwrap();
    let copts = CandleGemmOptions {
        epilogue,
        row_weights: Some(&cweights),
        ..Default::default()
    };
    let before = cd.work_counts();
    let got = mc::grouped_gemm::<bf16>(&cd, &xc, true, &wc, &cplan, copts, n / 2, GemmVersion::V2)
        .unwrap();
    let c = cd.work_counts() - before;
    assert_eq!((c.copies, c.allocations), (0, 1), "only the output: {c:?}");
    assert_eq!(got.dims(), [p, n / 2]);
    let got: Vec<bf16> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(bits(&got), want);
}

#[test]
fn gpu_candle_refuses_what_it_cannot_borrow() {
    let Some((_, cdev)) = devices("gpu_candle_refuses_what_it_cannot_borrow") else {
        return;
    };
    let dir = common::fixtures_dir().join("mixtral");
    let block = MoeBlock::open(&cdev, &dir, 0, cc::DType::BF16, 4).unwrap();
    let h = block.hidden();
    let err = |r: moe_kernels::Result<cc::Tensor>, words: &[&str]| {
        let e = r.unwrap_err().to_string();
        for w in words {
            assert!(e.contains(w), "`{w}` not in: {e}");
        }
    };
    let host = cc::Tensor::zeros((2, h), cc::DType::BF16, &cc::Device::Cpu).unwrap();
    err(block.forward(&host), &["`x`", "candle CUDA device"]);
    let wide = cc::Tensor::zeros((h, 2), cc::DType::BF16, &cdev).unwrap();
    err(block.forward(&wide.t().unwrap()), &["`x`", "contiguous"]);
    let f32x = cc::Tensor::zeros((2, h), cc::DType::F32, &cdev).unwrap();
    err(block.forward(&f32x), &["`x`", "BF16"]);
    let big = cc::Tensor::zeros((5, h), cc::DType::BF16, &cdev).unwrap();
    err(block.forward(&big), &["`x`", "T <= 4"]);
    let y = cc::Tensor::zeros((2, h), cc::DType::BF16, &cdev).unwrap();
    let x = cc::Tensor::zeros((3, h), cc::DType::BF16, &cdev).unwrap();
    let e = block.forward_into(&y, &x).unwrap_err().to_string();
    assert!(e.contains("`y`"), "{e}");
    let e = block.forward_into(&host, &x).unwrap_err().to_string();
    assert!(e.contains("`y`") && e.contains("candle CUDA device"), "{e}");
    let e = MoeBlock::open(&cdev, &dir, 0, cc::DType::F32, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`dtype`") && e.contains("BF16 or F16"), "{e}");
}
