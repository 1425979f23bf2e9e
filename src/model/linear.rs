//! Linear weights as quantised checkpoints store them: `quantization_config` in config.json says
//! how, and each Linear `{base}.weight` is read plain or as its packed parts.
//!
//! | `quant_method` | parts of a Linear `[N, Kd]` | read by |
//! |---|---|---|
//! | (none) | `weight` in f32/bf16/f16 | [`ModelDir::read`] |
//! | `fp8` (DeepSeek-V3, Qwen3 FP8) | `weight` F8_E4M3, `weight_scale_inv [ceil(N/128), ceil(Kd/128)]` | [`Fp8Matrix::new`] |
//! | `gptq` (AutoGPTQ, gptqmodel) | `qweight`, `qzeros`, `scales`, optional `g_idx` | [`import_gptq`] |
//! | `awq` (AutoAWQ, GEMM layout) | `qweight`, `qzeros`, `scales` | [`import_awq`] |
//!
//! gpt-oss's MXFP4 experts are fused tensors of their own and are read by its family.

use half::f16;
use safetensors::Dtype;

use super::{Config, ModelDir};
use crate::error::{Error, Result};
use crate::quant::{Fp8Matrix, GptqVersion, HostTensor, QuantMatrix, import_awq, import_gptq};

/// Side of the square blocks of FP8 checkpoints' `weight_scale_inv`.
pub(crate) const FP8_BLOCK: usize = 128;

/// How the checkpoint's Linear weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// Plain floats (FP8 tensors are still recognised by their dtype).
    None,
    /// F8_E4M3 with 128 x 128 block scales.
    Fp8,
    /// GPTQ with `bits`, `group` (`None`: one group per row, `group_size: -1`).
    Gptq {
        bits: u32,
        group: Option<usize>,
        version: GptqVersion,
    },
    /// AWQ, 4-bit, GEMM layout.
    Awq { group: Option<usize> },
    /// gpt-oss's MXFP4 release (read by the family).
    Mxfp4,
}

impl Quantization {
    /// From `quantization_config`, refusing methods and settings the crate does not read.
    pub(crate) fn from_config(c: &Config) -> Result<Self> {
        let Some(q) = c.get("quantization_config") else {
            return Ok(Quantization::None);
        };
        if !q.is_object() {
            return Err(c.refuse("quantization_config", "an object", q));
        }
        let q = Config {
            file: format!("{} (quantization_config)", c.file),
            v: q,
        };
        let group = |q: &Config| -> Result<Option<usize>> {
            let Some(v) = q.get("group_size") else {
                return Ok(None);
            };
            match v.as_i64() {
                Some(-1) => Ok(None),
                Some(g) if g > 0 => Ok(Some(g as usize)),
                _ => Err(q.refuse("group_size", "a positive group size or -1", v)),
            }
        };
        Ok(match q.str_or("quant_method", "")? {
            "fp8" => {
                if let Some(b) = q.get("weight_block_size")
                    && b != &serde_json::json!([FP8_BLOCK, FP8_BLOCK])
                {
                    return Err(q.refuse("weight_block_size", "[128, 128]", b));
                }
                Quantization::Fp8
            }
            "gptq" => {
                let bits = q.usize_or("bits", 4)?;
                if bits != 4 && bits != 8 {
                    return Err(q.refuse("bits", "4 or 8", bits));
                }
                let version = match q.str_or("checkpoint_format", "gptq")? {
                    "gptq" => GptqVersion::V1,
                    "gptq_v2" => GptqVersion::V2,
                    other => return Err(q.refuse("checkpoint_format", "gptq or gptq_v2", other)),
                };
                Quantization::Gptq {
                    bits: bits as u32,
                    group: group(&q)?,
                    version,
                }
            }
            "awq" => {
                if q.usize_or("bits", 4)? != 4 {
                    return Err(q.refuse("bits", "4 (AWQ)", q.usize_or("bits", 4)?));
                }
                let version = q.str_or("version", "gemm")?;
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(q.refuse("version", "gemm (the GEMM packing)", version));
                }
                Quantization::Awq { group: group(&q)? }
            }
            "mxfp4" => Quantization::Mxfp4,
            other => {
                return Err(q.refuse(
                    "quant_method",
                    "fp8, gptq, awq or mxfp4 (or no quantization_config)",
                    other,
                ));
            }
        })
    }
}

/// Linear `name` (`{base}.weight`) of `[n, kd]` in its packed form, or `None` when it is
/// stored as plain floats. FP8 is recognised by the weight's dtype whatever the config says;
/// GPTQ and AWQ by their `qweight`.
pub(crate) fn read_packed(
    dir: &ModelDir,
    quant: Quantization,
    name: &str,
    n: usize,
    kd: usize,
) -> Result<Option<QuantMatrix>> {
    read_packed_parts(dir, quant, name, n, kd).map_err(|e| match e {
        // Errors of the format's own checks name an argument, not the tensor: add it.
        Error::Shape { .. } => Error::checkpoint(
            dir.dir().display(),
            format!("Linear `{name}` [{n}, {kd}]"),
            "a well-formed packed weight",
            e.to_string(),
        ),
        e => e,
    })
}

fn read_packed_parts(
    dir: &ModelDir,
    quant: Quantization,
    name: &str,
    n: usize,
    kd: usize,
) -> Result<Option<QuantMatrix>> {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    let qweight = format!("{base}.qweight");
    if let (Quantization::Gptq { .. } | Quantization::Awq { .. }, true) =
        (quant, dir.contains(&qweight))
    {
        let i32s = |part: &str| -> Result<(Vec<i32>, Vec<usize>)> {
            let t = dir.raw(&format!("{base}.{part}"))?;
            let v = t.to_i64()?;
            let v = v
                .into_iter()
                .map(|x| i32::try_from(x).map_err(|_| wrong(dir, base, part, "int32 values")))
                .collect::<Result<Vec<i32>>>()?;
            Ok((v, t.shape.clone()))
        };
        let (qw, qw_shape) = i32s("qweight")?;
        let (qz, qz_shape) = i32s("qzeros")?;
        let scales_t = dir.raw(&format!("{base}.scales"))?;
        let scales: Vec<f16> = scales_t.to_vec()?;
        let m = match quant {
            Quantization::Gptq {
                bits,
                group,
                version,
            } => {
                let g_idx = if dir.contains(&format!("{base}.g_idx")) {
                    Some(i32s("g_idx")?)
                } else {
                    None
                };
                import_gptq(
                    bits,
                    group.unwrap_or(kd),
                    kd,
                    n,
                    HostTensor::new(&qw, &qw_shape),
                    HostTensor::new(&qz, &qz_shape),
                    HostTensor::new(&scales, &scales_t.shape),
                    g_idx.as_ref().map(|(v, s)| HostTensor::new(v, s)),
                    version,
                )?
            }
            _ => {
                let Quantization::Awq { group } = quant else {
                    unreachable!("matched above")
                };
                import_awq(
                    group.unwrap_or(kd),
                    kd,
                    n,
                    HostTensor::new(&qw, &qw_shape),
                    HostTensor::new(&qz, &qz_shape),
                    HostTensor::new(&scales, &scales_t.shape),
                )?
            }
        };
        return Ok(Some(QuantMatrix::Int(m)));
    }
    let t = dir.raw(name)?;
    if t.dtype != Dtype::F8_E4M3 {
        return Ok(None);
    }
    t.expect_shape(&[n, kd])?;
    let scales = dir.read::<f32>(
        &format!("{name}_scale_inv"),
        &[n.div_ceil(FP8_BLOCK), kd.div_ceil(FP8_BLOCK)],
    )?;
    Ok(Some(QuantMatrix::Fp8(Fp8Matrix::new(
        n,
        kd,
        t.bytes.to_vec(),
        scales,
    )?)))
}

fn wrong(dir: &ModelDir, base: &str, part: &str, expected: &str) -> Error {
    Error::checkpoint(
        dir.dir().display(),
        format!("tensor `{base}.{part}`"),
        expected,
        "values outside int32",
    )
}
