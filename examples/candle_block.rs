//! A candle program runs one MoE block of a Hugging Face folder on its own candle tensors:
//! the block reads candle's memory and writes candle's output tensor in place, on candle's
//! stream, with no copy.
//!
//!   scripts/candle.sh test     (builds the feature, runs this after the tests)
//!   cargo run --release --features candle --example candle_block [MODEL_DIR]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use moe_kernels::candle::MoeBlock;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/fixtures/mixtral"));
    let cdev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            // Its device opens cuBLAS and cuRAND; on the CPU emulator that needs the stand-ins
            // scripts/candle.sh puts there.
            println!("candle has no CUDA device here ({e}); nothing to run");
            return Ok(());
        }
    };
    let layer = moe_kernels::model::Model::open(&dir)?.moe_layers()?[0];
    let block = MoeBlock::open(&cdev, &dir, layer, DType::BF16, 64)?;
    let h = block.hidden();

    let x: Vec<bf16> = (0..8 * h)
        .map(|i| bf16::from_f32(((i * 37 % 101) as f32 / 50.0) - 1.0))
        .collect();
    let x = Tensor::from_vec(x, (8, h), &cdev)?;
    let y = Tensor::zeros((8, h), DType::BF16, &cdev)?;
    let before = block.device().work_counts();
    block.forward_into(&y, &x)?;
    let n = block.device().work_counts() - before;
    let out: Vec<bf16> = y.flatten_all()?.to_vec1()?;
    let norm = out.iter().map(|v| v.to_f64().powi(2)).sum::<f64>().sqrt();
    println!(
        "{}: layer {layer}, 8 tokens of H={h} on candle tensors: {} launches, {} copies, {} \
         allocations; |y| = {}",
        dir.display(),
        n.launches,
        n.copies,
        n.allocations,
        norm
    );
    Ok(())
}
