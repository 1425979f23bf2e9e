//! A runtime built on plain cudarc runs one MoE block of a Hugging Face folder on its own
//! stream and its own buffers: no copy in or out, no second stream.
//!
//!   cargo run --release --example cudarc_runtime [MODEL_DIR]   (default: tests/fixtures/mixtral)
//!   scripts/emulate cargo run --release --example cudarc_runtime   (without a GPU)

use std::path::PathBuf;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::device::{TensorView, TensorViewMut};
use moe_kernels::layer::MoeLayer;
use moe_kernels::model::Model;
use moe_kernels::{Device, Result};

/// The runtime's side: its context, its stream, its activations.
struct Runtime {
    stream: std::sync::Arc<CudaStream>,
    x: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/fixtures/mixtral"));
    if !moe_kernels::device::driver_present() {
        println!("no CUDA driver: run it on a GPU or under scripts/emulate");
        return Ok(());
    }
    let (tokens, max_tokens) = (5, 16);
    let model = Model::open(&dir)?;
    let layer_index = model.moe_layers()?[0];
    let (cfg, weights) = model.load_layer::<bf16>(layer_index)?;
    let h = cfg.hidden;

    let ctx = CudaContext::new(0).expect("a CUDA context");
    let stream = ctx.new_stream().expect("a stream");
    let x: Vec<bf16> = (0..tokens * h)
        .map(|i| bf16::from_f32(((i * 37 % 101) as f32 / 50.0) - 1.0))
        .collect();
    let mut rt = Runtime {
        x: stream.clone_htod(&x).expect("upload"),
        y: stream.alloc_zeros::<bf16>(tokens * h).expect("alloc"),
        stream,
    };

    // The crate's device on the runtime's stream, and the block's weights on it (once).
    let dev = Device::from_stream(rt.stream.clone())?;
    let mut block = MoeLayer::<bf16>::new(&dev, &cfg, &weights, max_tokens)?;

    // Each forward: views of the runtime's buffers, work enqueued on its stream, no host wait.
    let before = dev.work_counts();
    {
        let xs = rt.x.slice(..);
        let mut ys = rt.y.slice_mut(..);
        let xv = TensorView::from_cuda(&dev, &xs, &[tokens, h])?;
        let mut yv = TensorViewMut::from_cuda(&dev, &mut ys, &[tokens, h])?;
        block.forward_into(&dev, &mut yv, &xv)?;
    }
    let n = dev.work_counts() - before;
    let y = rt.stream.clone_dtoh(&rt.y).expect("download");
    println!(
        "{}: layer {layer_index}, {tokens} tokens of H={h}: {} launches, {} copies, {} \
         allocations; y[0][..4] = {:?}",
        dir.display(),
        n.launches,
        n.copies,
        n.allocations,
        &y[..4.min(y.len())]
    );
    Ok(())
}
