//! activation/softmax, beside the card's device-to-device copy bandwidth (ceiling/copy).
//!
//! Throughput is the fewest bytes the op must move: read the input once, write the output once.

mod common;

use criterion::{Criterion, Throughput};
use half::bf16;
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Float, Tensor, activation};

fn ceiling_copy(c: &mut Criterion, dev: &Device) {
    let bytes = 1usize << 30;
    let src = dev.zeros::<u8>(&[bytes]).unwrap();
    let mut dst = dev.zeros::<u8>(&[bytes]).unwrap();
    let mut g = c.benchmark_group("ceiling/copy");
    g.throughput(Throughput::Bytes(2 * bytes as u64));
    g.bench_function("dtod/1GiB", |b| {
        b.iter_custom(|iters| {
            common::time_iters(dev, iters, |_| {
                dev.stream()
                    .memcpy_dtod(src.buf(), dst.buf_mut())
                    .map_err(|e| moe_kernels::Error::Driver {
                        op: "memcpy_dtod",
                        source: e,
                    })
            })
        })
    });
    g.finish();
}

fn softmax<T: Float>(c: &mut Criterion, dev: &Device) {
    let mut g = c.benchmark_group("activation/softmax");
    // Router widths (E = 8, 60, 128, 256) at many tokens, a hidden-sized row, a vocabulary row.
    let all = [
        (16384, 8),
        (16384, 60),
        (16384, 128),
        (16384, 256),
        (4096, 4096),
        (256, 151_936),
    ];
    for (rows, cols) in common::sizes(dev, &all, |&(r, c)| r * c <= 1 << 20) {
        let bytes = rows * cols * std::mem::size_of::<T>();
        let copies = common::rotation(dev, 2 * bytes);
        let mut rng = Rng::new(1);
        let xs: Vec<Tensor<T>> = (0..copies)
            .map(|_| {
                dev.upload(&rng.normal_vec::<T>(rows * cols, 2.0), &[rows, cols])
                    .unwrap()
            })
            .collect();
        let mut outs: Vec<Tensor<T>> = (0..copies)
            .map(|_| dev.zeros(&[rows, cols]).unwrap())
            .collect();
        g.throughput(Throughput::Bytes(2 * bytes as u64));
        g.bench_function(format!("{}/{rows}x{cols}", T::DTYPE), |b| {
            b.iter_custom(|iters| {
                common::time_iters(dev, iters, |i| {
                    let k = i % copies;
                    activation::softmax_into(dev, &mut outs[k], &xs[k])
                })
            })
        });
    }
    g.finish();
}

fn main() {
    let Some(dev) = common::gpu("activation") else {
        return;
    };
    let mut c = common::criterion(&dev);
    ceiling_copy(&mut c, &dev);
    softmax::<f32>(&mut c, &dev);
    softmax::<bf16>(&mut c, &dev);
    c.final_summary();
}
