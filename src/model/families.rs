//! The model families: which `config.json` keys configure the block, which layers are MoE, and
//! the tensor names of one block on disk, as the published Hub checkpoints store them.

use indicatif::ProgressBar;

use super::linear::{Quantization, read_packed};
use super::{Config, ModelDir};
use crate::activation::{GateLayout, GatedAct};
use crate::dtype::Float;
use crate::error::Result;
use crate::gemm::ScaleAt;
use crate::layer::{Experts as ExpertsW, LayerWeights, MoeConfig, SharedExpert};
use crate::quant::{Mxfp4Matrix, QuantMatrix};
use crate::routing::RouterConfig;

/// A model family, chosen by `model_type`.
///
/// | family | `model_type` | router | experts on disk | special |
/// |---|---|---|---|---|
/// | Mixtral | mixtral | softmax, top-k, renormalised | `w1`/`w3`/`w2` per expert | |
/// | Qwen2-MoE | qwen2_moe | softmax, top-k, `norm_topk_prob` | per expert | shared expert with sigmoid gate |
/// | Qwen3-MoE | qwen3_moe | as Qwen2-MoE | per expert | |
/// | OLMoE | olmoe | as Qwen2-MoE | per expert | |
/// | DeepSeek-V2 | deepseek_v2 | softmax, greedy or group-limited, × scaling | per expert | shared experts, dense first layers |
/// | DeepSeek-V3 | deepseek_v3, deepseek_v32, glm4_moe, glm4_moe_lite | sigmoid + correction bias, groups, f32 | per expert | shared experts, dense first layers (`mlp_layer_types` where given) |
/// | Qwen3-Next | qwen3_next | as Qwen2-MoE, renormalised by default | per expert | shared expert with sigmoid gate |
/// | Qwen3.5-MoE | qwen3_5_moe (text part) | softmax, top-k, always renormalised | per expert | shared expert with sigmoid gate |
/// | MiniMax-M2 | minimax_m2 | sigmoid + correction bias (on the block), renormalised; logits in the model dtype | `w1`/`w3`/`w2` per expert | |
/// | gpt-oss | gpt_oss | top-k on biased logits, softmax | fused `[E, H, 2I]`, interleaved | biases, clamped SwiGLU |
/// | Llama 4 | llama4_text, llama4 | top-k, sigmoid, scales the input | fused `[E, H, 2I]` | shared expert, interleaved MoE layers |
/// | GraniteMoE | granitemoe | top-k, softmax | fused `[E, 2I, H]` | |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
    Llama4,
    GraniteMoe,
    Qwen3Next,
    Qwen35Moe,
    MiniMaxM2,
}

impl Family {
    pub const MODEL_TYPES: &'static [&'static str] = &[
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe",
        "gpt_oss",
        "llama4_text",
        "llama4",
        "granitemoe",
        "deepseek_v32",
        "glm4_moe_lite",
        "qwen3_next",
        "qwen3_5_moe",
        "minimax_m2",
    ];

    pub fn from_model_type(t: &str) -> Option<Family> {
        Some(match t {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "olmoe" => Family::Olmoe,
            "deepseek_v2" => Family::DeepseekV2,
            "deepseek_v3" | "deepseek_v32" | "glm4_moe" | "glm4_moe_lite" => Family::DeepseekV3,
            "qwen3_next" => Family::Qwen3Next,
            "qwen3_5_moe" | "qwen3_5_moe_text" => Family::Qwen35Moe,
            "minimax_m2" => Family::MiniMaxM2,
            "gpt_oss" => Family::GptOss,
            "llama4_text" | "llama4" => Family::Llama4,
            "granitemoe" => Family::GraniteMoe,
            _ => return None,
        })
    }

    /// The configuration the decoder reads: Llama 4's and Qwen3.5's multimodal configs nest it.
    pub(crate) fn text_config<'a>(&self, top: &Config<'a>) -> Result<Config<'a>> {
        match (self, top.get("text_config")) {
            (Family::Llama4 | Family::Qwen35Moe, Some(v)) if v.is_object() => Ok(Config {
                file: format!("{} (text_config)", top.file),
                v,
            }),
            _ => Ok(Config {
                file: top.file.clone(),
                v: top.v,
            }),
        }
    }

    pub(crate) fn layer_prefix(&self, model_type: &str) -> &'static str {
        match model_type {
            "llama4" => "language_model.model.layers",
            "qwen3_5_moe" => "model.language_model.layers",
            _ => "model.layers",
        }
    }

    pub(crate) fn is_moe(&self, c: &Config, layer: usize) -> Result<bool> {
        Ok(match self {
            Family::Mixtral
            | Family::Olmoe
            | Family::GptOss
            | Family::GraniteMoe
            | Family::Qwen35Moe
            | Family::MiniMaxM2 => true,
            Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen3Next => {
                let step = c.usize_or("decoder_sparse_step", 1)?.max(1);
                !c.usizes("mlp_only_layers")?.contains(&layer)
                    && self.qwen_experts(c)? > 0
                    && (layer + 1).is_multiple_of(step)
            }
            // transformers reads neither `moe_layer_freq` nor `n_routed_experts` here.
            // DeepSeek-V3.2 and GLM-4.7-Flash list each layer in `mlp_layer_types`; without it,
            // GLM-4.7-Flash's layer 0 alone is dense.
            Family::DeepseekV2 | Family::DeepseekV3 => match c.get("mlp_layer_types") {
                Some(v) => {
                    let kind = v
                        .as_array()
                        .and_then(|a| a.get(layer))
                        .and_then(serde_json::Value::as_str)
                        .ok_or_else(|| {
                            c.refuse(
                                "mlp_layer_types",
                                "a list of \"dense\" or \"sparse\", one per layer",
                                v,
                            )
                        })?;
                    kind == "sparse"
                }
                // GLM-4.7-Flash's config class ignores `first_k_dense_replace`.
                None if c.str_or("model_type", "")? == "glm4_moe_lite" => layer >= 1,
                None => {
                    layer
                        >= c.usize_or("first_k_dense_replace", deepseek_defaults(c)?.first_dense)?
                }
            },
            Family::Llama4 => {
                let listed = c.usizes("moe_layers")?;
                if c.get("moe_layers").is_some() {
                    listed.contains(&layer)
                } else {
                    let step = c.usize_or("interleave_moe_layer_step", 1)?;
                    step > 0 && (layer + 1).is_multiple_of(step)
                }
            }
        })
    }

    pub(crate) fn moe_config(&self, c: &Config) -> Result<MoeConfig> {
        let hidden = c.usize("hidden_size")?;
        let k = c.usize("num_experts_per_tok")?;
        let act = match c.str_or("hidden_act", "silu")? {
            "silu" | "swish" => GatedAct::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => GatedAct::GeluTanh,
            "gelu" => GatedAct::GeluErf,
            other => return Err(c.refuse("hidden_act", "silu, gelu or gelu_pytorch_tanh", other)),
        };
        let base = |experts, intermediate, router| MoeConfig {
            act,
            ..MoeConfig::new(hidden, intermediate, experts, router)
        };
        Ok(match self {
            Family::Mixtral => base(
                c.usize_any(&["num_local_experts", "num_experts"])?,
                c.usize("intermediate_size")?,
                RouterConfig::mixtral(k),
            ),
            Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen3Next | Family::Qwen35Moe => {
                // Qwen3-Next renormalises unless told otherwise; Qwen3.5 always does.
                let renormalize = match self {
                    Family::Qwen35Moe => true,
                    Family::Qwen3Next => c.bool_or("norm_topk_prob", true)?,
                    _ => c.bool_or("norm_topk_prob", false)?,
                };
                let mut cfg = base(
                    self.qwen_experts(c)?,
                    c.usize("moe_intermediate_size")?,
                    RouterConfig::qwen(k, renormalize),
                );
                if *self != Family::Qwen3Moe {
                    cfg.shared = Some(SharedExpert {
                        intermediate: c.usize("shared_expert_intermediate_size")?,
                        gated: true,
                    });
                }
                cfg
            }
            Family::Olmoe => base(
                c.usize_any(&["num_experts", "num_local_experts"])?,
                c.usize("intermediate_size")?,
                RouterConfig::qwen(k, c.bool_or("norm_topk_prob", false)?),
            ),
            Family::DeepseekV2 | Family::DeepseekV3 => {
                let experts =
                    c.usize_any(&["n_routed_experts", "num_experts", "num_local_experts"])?;
                let inter = c.usize("moe_intermediate_size")?;
                // Absent keys take the defaults of the model's transformers config class.
                let d = deepseek_defaults(c)?;
                let scale = c.f64_or("routed_scaling_factor", d.scale)? as f32;
                let groups = (
                    c.usize_or("n_group", d.n_group)?,
                    c.usize_or("topk_group", d.topk_group)?,
                );
                let router = if *self == Family::DeepseekV3 {
                    RouterConfig::deepseek_v3(
                        k,
                        groups.0.max(1),
                        groups.1.max(1),
                        c.bool_or("norm_topk_prob", true)?,
                        scale,
                    )
                } else {
                    let method = c.str_or("topk_method", "greedy")?;
                    let limited = match method {
                        "greedy" => None,
                        "group_limited_greedy" => Some(groups),
                        other => {
                            return Err(c.refuse(
                                "topk_method",
                                "greedy or group_limited_greedy",
                                other,
                            ));
                        }
                    };
                    RouterConfig::deepseek_v2(k, limited, scale)
                };
                let mut cfg = base(experts, inter, router);
                // Both keep `gate.weight` in f32 and route from f32 logits.
                cfg.router_f32 = true;
                cfg.correction_bias = *self == Family::DeepseekV3;
                let shared = c.usize_or("n_shared_experts", d.shared)?;
                if c.bool_or("mlp_bias", false)? {
                    return Err(c.refuse(
                        "mlp_bias",
                        "false (shared-expert biases are not read)",
                        true,
                    ));
                }
                cfg.shared = (shared > 0).then_some(SharedExpert {
                    intermediate: shared * inter,
                    gated: false,
                });
                cfg
            }
            Family::GptOss => {
                let mut cfg = base(
                    c.usize_any(&["num_local_experts", "num_experts"])?,
                    c.usize("intermediate_size")?,
                    RouterConfig::gpt_oss(k),
                );
                cfg.router_bias = true;
                cfg.expert_bias = true;
                cfg.gate_layout = GateLayout::Interleaved;
                cfg.act = GatedAct::GptOss {
                    alpha: c.f64_or("swiglu_alpha", 1.702)? as f32,
                    limit: c.f64_or("swiglu_limit", 7.0)? as f32,
                };
                cfg
            }
            Family::Llama4 => {
                let inter = c.usize("intermediate_size")?;
                let mut cfg = base(
                    c.usize("num_local_experts")?,
                    inter,
                    RouterConfig::llama4(k),
                );
                cfg.weight_at = ScaleAt::Input;
                cfg.shared = Some(SharedExpert {
                    intermediate: inter,
                    gated: false,
                });
                cfg
            }
            Family::GraniteMoe => base(
                c.usize("num_local_experts")?,
                c.usize("intermediate_size")?,
                RouterConfig::gpt_oss(k),
            ),
            // One group: the grouped sigmoid rule reduces to the biased top-k, renormalised.
            Family::MiniMaxM2 => MoeConfig {
                correction_bias: true,
                ..base(
                    c.usize_any(&["num_local_experts", "num_experts"])?,
                    c.usize("intermediate_size")?,
                    RouterConfig::deepseek_v3(k, 1, 1, true, 1.0),
                )
            },
        })
    }

    /// The Qwen MoE families' expert count (`num_experts`, also spelled `num_local_experts`),
    /// with their config classes' defaults.
    fn qwen_experts(&self, c: &Config) -> Result<usize> {
        match c.usize_any(&["num_experts", "num_local_experts"]) {
            Ok(e) => Ok(e),
            Err(_) if c.get("num_experts").is_none() && c.get("num_local_experts").is_none() => {
                Ok(match self {
                    Family::Qwen2Moe => 60,
                    Family::Qwen3Next => 512,
                    Family::Qwen35Moe => 256,
                    _ => 128,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The tensor names of layer `layer`'s block.
    pub(crate) fn names(&self, prefix: &str, layer: usize, cfg: &MoeConfig) -> Names {
        let p = format!("{prefix}.{layer}");
        let per_expert = |block: &str, router: &str, gate: &str, up: &str, down: &str| {
            Experts::PerExpert {
                prefix: format!("{p}.{block}.experts"),
                names: [gate.into(), up.into(), down.into()],
                count: cfg.experts,
            }
            .with_router(format!("{p}.{block}.{router}"))
        };
        let mlp_names = |block: String| {
            Some([
                format!("{block}.gate_proj.weight"),
                format!("{block}.up_proj.weight"),
                format!("{block}.down_proj.weight"),
            ])
        };
        match self {
            Family::Mixtral => per_expert("block_sparse_moe", "gate", "w1", "w3", "w2"),
            Family::MiniMaxM2 => {
                let mut n = per_expert("block_sparse_moe", "gate", "w1", "w3", "w2");
                n.correction_bias = Some(format!("{p}.block_sparse_moe.e_score_correction_bias"));
                n
            }
            Family::Qwen2Moe
            | Family::Qwen3Moe
            | Family::Olmoe
            | Family::Qwen3Next
            | Family::Qwen35Moe => {
                let mut n = per_expert("mlp", "gate", "gate_proj", "up_proj", "down_proj");
                if cfg.shared.is_some() {
                    n.shared = mlp_names(format!("{p}.mlp.shared_expert"));
                    n.shared_gate = Some(format!("{p}.mlp.shared_expert_gate.weight"));
                }
                n
            }
            Family::DeepseekV2 | Family::DeepseekV3 => {
                let mut n = per_expert("mlp", "gate", "gate_proj", "up_proj", "down_proj");
                if cfg.correction_bias {
                    n.correction_bias = Some(format!("{p}.mlp.gate.e_score_correction_bias"));
                }
                if cfg.shared.is_some() {
                    n.shared = mlp_names(format!("{p}.mlp.shared_experts"));
                }
                n
            }
            Family::GptOss => {
                let e = format!("{p}.mlp.experts");
                let mut n = Experts::Transposed {
                    gate_up: format!("{e}.gate_up_proj"),
                    down: format!("{e}.down_proj"),
                }
                .with_router(format!("{p}.mlp.router"));
                n.router_bias = Some(format!("{p}.mlp.router.bias"));
                n.gate_up_bias = Some(format!("{e}.gate_up_proj_bias"));
                n.down_bias = Some(format!("{e}.down_proj_bias"));
                n
            }
            Family::Llama4 => {
                let f = format!("{p}.feed_forward");
                let mut n = Experts::Transposed {
                    gate_up: format!("{f}.experts.gate_up_proj"),
                    down: format!("{f}.experts.down_proj"),
                }
                .with_router(format!("{f}.router"));
                n.shared = mlp_names(format!("{f}.shared_expert"));
                n
            }
            Family::GraniteMoe => {
                let b = format!("{p}.block_sparse_moe");
                Experts::Stacked {
                    gate_up: format!("{b}.input_linear.weight"),
                    down: format!("{b}.output_linear.weight"),
                }
                .with_router(format!("{b}.router.layer"))
            }
        }
    }
}

/// Defaults of the DeepSeek-style config classes for keys a config.json may leave out.
struct DeepseekDefaults {
    first_dense: usize,
    n_group: usize,
    topk_group: usize,
    scale: f64,
    shared: usize,
}

/// transformers 5.24's defaults: DeepseekV3Config (and V3.2), Glm4MoeConfig, Glm4MoeLiteConfig,
/// DeepseekV2Config (whose `n_group` defaults to none; one group is the same rule).
fn deepseek_defaults(c: &Config) -> Result<DeepseekDefaults> {
    let (first_dense, n_group, topk_group, scale, shared) = match c.str_or("model_type", "")? {
        "deepseek_v3" | "deepseek_v32" => (3, 8, 4, 2.5, 1),
        "glm4_moe" => (1, 1, 1, 1.0, 1),
        "glm4_moe_lite" => (1, 1, 1, 1.8, 1),
        _ => (0, 1, 1, 1.0, 2),
    };
    Ok(DeepseekDefaults {
        first_dense,
        n_group,
        topk_group,
        scale,
        shared,
    })
}

/// How a checkpoint stores the routed experts.
pub(crate) enum Experts {
    /// One Linear per expert and projection: `{prefix}.{e}.{gate|up|down}.weight`, `[I, H]`,
    /// `[I, H]`, `[H, I]`.
    PerExpert {
        prefix: String,
        names: [String; 3],
        count: usize,
    },
    /// Fused and transposed (in × out): `gate_up [E, H, 2I]`, `down [E, I, H]`.
    Transposed { gate_up: String, down: String },
    /// Fused in Linear's order: `gate_up [E, 2I, H]`, `down [E, H, I]`.
    Stacked { gate_up: String, down: String },
}

impl Experts {
    fn with_router(self, router: String) -> Names {
        Names {
            router: format!("{router}.weight"),
            router_bias: None,
            correction_bias: None,
            experts: self,
            gate_up_bias: None,
            down_bias: None,
            shared: None,
            shared_gate: None,
        }
    }
}

/// Every tensor name of one block.
pub(crate) struct Names {
    router: String,
    router_bias: Option<String>,
    correction_bias: Option<String>,
    experts: Experts,
    gate_up_bias: Option<String>,
    down_bias: Option<String>,
    /// gate, up, down of the shared expert.
    shared: Option<[String; 3]>,
    shared_gate: Option<String>,
}

/// `[E, R, C]` → `[E, C, R]`.
fn transpose<S: Copy>(v: &[S], e: usize, r: usize, c: usize) -> Vec<S> {
    let mut out = Vec::with_capacity(v.len());
    for x in 0..e {
        let m = &v[x * r * c..(x + 1) * r * c];
        for j in 0..c {
            out.extend((0..r).map(|i| m[i * c + j]));
        }
    }
    out
}

impl Names {
    pub(crate) fn all(&self) -> Vec<String> {
        let mut v = vec![self.router.clone()];
        v.extend(self.router_bias.iter().cloned());
        v.extend(self.correction_bias.iter().cloned());
        match &self.experts {
            Experts::PerExpert {
                prefix,
                names,
                count,
            } => {
                for e in 0..*count {
                    v.extend(names.iter().map(|n| format!("{prefix}.{e}.{n}.weight")));
                }
            }
            Experts::Transposed { gate_up, down } | Experts::Stacked { gate_up, down } => {
                for base in [gate_up, down] {
                    v.extend(["", "_blocks", "_scales"].map(|s| format!("{base}{s}")));
                }
            }
        }
        v.extend(self.gate_up_bias.iter().cloned());
        v.extend(self.down_bias.iter().cloned());
        v.extend(self.shared.iter().flatten().cloned());
        v.extend(self.shared_gate.iter().cloned());
        v
    }

    /// Reads every tensor, checking its shape against `cfg`, into the crate's layout.
    pub(crate) fn read<S: Float>(
        &self,
        dir: &ModelDir,
        cfg: &MoeConfig,
        quant: Quantization,
        bar: Option<&ProgressBar>,
    ) -> Result<LayerWeights<S>> {
        let (h, i, e, et) = (
            cfg.hidden,
            cfg.intermediate,
            cfg.experts,
            cfg.experts_total(),
        );
        let tick = |bytes: usize| {
            if let Some(bar) = bar {
                bar.inc(bytes as u64);
            }
        };
        // A Linear weight of `shape`: stored plain, or packed (FP8 blocks, GPTQ, AWQ), which is
        // decoded exactly as the kernels decode it, then rounded to S.
        let read = |name: &str, shape: &[usize]| -> Result<Vec<S>> {
            let packed = match *shape {
                [n, kd] => read_packed(dir, quant, name, n, kd)?,
                _ => None, // fused expert tensors are plain, or gpt-oss's MXFP4 (below)
            };
            let v: Vec<S> = match packed {
                Some(m) => m.decode_to(),
                None => dir.read::<S>(name, shape)?,
            };
            tick(v.len() * std::mem::size_of::<S>());
            Ok(v)
        };
        let read_f32 = |name: &str, shape: &[usize]| dir.read::<f32>(name, shape);
        let experts = match &self.experts {
            Experts::PerExpert {
                prefix,
                names,
                count,
            } if read_packed(dir, quant, &format!("{prefix}.0.{}.weight", names[0]), i, h)?
                .is_some() =>
            {
                // Packed experts stay packed: gate and up rows stacked into one [2I, H] matrix
                // per expert (QuantMatrix::stack_rows says which formats and sizes allow it).
                let mut gate_up = Vec::with_capacity(*count);
                let mut down = Vec::with_capacity(*count);
                for x in 0..*count {
                    let name = |n: &String| format!("{prefix}.{x}.{n}.weight");
                    let packed = |n: &String, rows: usize, cols: usize| -> Result<QuantMatrix> {
                        let m =
                            read_packed(dir, quant, &name(n), rows, cols)?.ok_or_else(|| {
                                crate::Error::checkpoint(
                                    dir.dir().display(),
                                    format!("tensor `{}`", name(n)),
                                    "packed like the other experts",
                                    "plain floats",
                                )
                            })?;
                        tick(m.bytes());
                        Ok(m)
                    };
                    let (g, u) = (packed(&names[0], i, h)?, packed(&names[1], i, h)?);
                    gate_up.push(g.stack_rows(&u).map_err(|e| {
                        crate::Error::checkpoint(
                            dir.dir().display(),
                            format!("expert {x}'s `{}` and `{}`", names[0], names[1]),
                            "gate and up matrices that stack into one",
                            e.to_string(),
                        )
                    })?);
                    down.push(packed(&names[2], h, i)?);
                }
                ExpertsW::Packed { gate_up, down }
            }
            Experts::PerExpert {
                prefix,
                names,
                count,
            } => {
                // Grown as read: the first tensor's shape check refuses a config whose sizes
                // disagree with the files before anything large is allocated.
                let (mut gate_up, mut down) = (Vec::new(), Vec::new());
                for x in 0..*count {
                    let name = |n: &String| format!("{prefix}.{x}.{n}.weight");
                    gate_up.extend(read(&name(&names[0]), &[i, h])?);
                    gate_up.extend(read(&name(&names[1]), &[i, h])?);
                    down.extend(read(&name(&names[2]), &[h, i])?);
                }
                ExpertsW::Plain { gate_up, down }
            }
            // gpt-oss's MXFP4 release: `{name}_blocks [E, N, Kd/32, 16]` and `{name}_scales
            // [E, N, Kd/32]`, in Linear's out x in order (unlike its bf16 tensors).
            Experts::Transposed { gate_up, down } if dir.contains(&format!("{gate_up}_blocks")) => {
                let packed = |base: &str, n: usize, kd: usize| -> Result<Vec<QuantMatrix>> {
                    let blocks = dir.raw(&format!("{base}_blocks"))?;
                    blocks.expect_shape(&[e, n, kd / 32, 16])?;
                    let scales = dir.raw(&format!("{base}_scales"))?;
                    scales.expect_shape(&[e, n, kd / 32])?;
                    let m = Mxfp4Matrix::from_gpt_oss(
                        blocks.u8s()?,
                        &blocks.shape,
                        scales.u8s()?,
                        &scales.shape,
                    )?;
                    if let Some(bar) = bar {
                        bar.inc((blocks.bytes.len() + scales.bytes.len()) as u64);
                    }
                    Ok(m.into_iter().map(QuantMatrix::Mxfp4).collect())
                };
                for (what, kd) in [("hidden_size", h), ("intermediate_size", i)] {
                    if !kd.is_multiple_of(32) {
                        return Err(crate::Error::checkpoint(
                            dir.dir().display(),
                            format!("config `{what}`"),
                            "a multiple of 32 for MXFP4 experts",
                            format!("{kd}"),
                        ));
                    }
                }
                ExpertsW::Packed {
                    gate_up: packed(gate_up, 2 * i, h)?,
                    down: packed(down, h, i)?,
                }
            }
            Experts::Transposed { gate_up, down } => ExpertsW::Plain {
                gate_up: transpose(&read(gate_up, &[e, h, 2 * i])?, e, h, 2 * i),
                down: transpose(&read(down, &[e, i, h])?, e, i, h),
            },
            Experts::Stacked { gate_up, down } => ExpertsW::Plain {
                gate_up: read(gate_up, &[e, 2 * i, h])?,
                down: read(down, &[e, h, i])?,
            },
        };
        let (shared_gate_up, shared_down) = match (&self.shared, cfg.shared) {
            (Some([g, u, d]), Some(s)) => {
                let mut gu = read(g, &[s.intermediate, h])?;
                gu.extend(read(u, &[s.intermediate, h])?);
                (Some(gu), Some(read(d, &[h, s.intermediate])?))
            }
            _ => (None, None),
        };
        Ok(LayerWeights {
            router: read_f32(&self.router, &[et, h])?,
            router_bias: self
                .router_bias
                .as_ref()
                .map(|n| read_f32(n, &[et]))
                .transpose()?,
            correction_bias: self
                .correction_bias
                .as_ref()
                .map(|n| read_f32(n, &[et]))
                .transpose()?,
            experts,
            gate_up_bias: self
                .gate_up_bias
                .as_ref()
                .map(|n| read(n, &[e, 2 * i]))
                .transpose()?,
            down_bias: self
                .down_bias
                .as_ref()
                .map(|n| read(n, &[e, h]))
                .transpose()?,
            shared_gate_up,
            shared_down,
            shared_gate: self
                .shared_gate
                .as_ref()
                .map(|n| read(n, &[1, h]))
                .transpose()?,
            const_w: None,
            const_v: None,
        })
    }
}
