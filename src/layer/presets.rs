//! The MoE blocks of real models, as `moe-kernels bench` and the tests run them: each shape and
//! rule from the model's published config.json.

use super::{MoeConfig, SharedExpert};
use crate::activation::{GateLayout, GatedAct};
use crate::gemm::ScaleAt;
use crate::routing::RouterConfig;

/// Every preset's name.
pub const NAMES: [&str; 7] = [
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "qwen2-moe",
    "deepseek-v3",
    "gpt-oss-120b",
    "olmoe",
    "llama4-scout",
];

/// The block of preset `name`, or `None` for a name not in [`NAMES`].
pub fn preset(name: &str) -> Option<MoeConfig> {
    let base = MoeConfig::new;
    Some(match name {
        "mixtral-8x7b" => base(4096, 14336, 8, RouterConfig::mixtral(2)),
        "qwen3-30b-a3b" => base(2048, 768, 128, RouterConfig::qwen(8, true)),
        "qwen2-moe" => MoeConfig {
            shared: Some(SharedExpert {
                intermediate: 5632,
                gated: true,
            }),
            ..base(2048, 1408, 60, RouterConfig::qwen(4, false))
        },
        "olmoe" => base(2048, 1024, 64, RouterConfig::qwen(8, false)),
        "deepseek-v3" => MoeConfig {
            router_f32: true,
            correction_bias: true,
            shared: Some(SharedExpert {
                intermediate: 2048,
                gated: false,
            }),
            ..base(
                7168,
                2048,
                256,
                RouterConfig::deepseek_v3(8, 8, 4, true, 2.5),
            )
        },
        "gpt-oss-120b" => MoeConfig {
            router_bias: true,
            expert_bias: true,
            gate_layout: GateLayout::Interleaved,
            act: GatedAct::GPT_OSS,
            ..base(2880, 2880, 128, RouterConfig::gpt_oss(4))
        },
        "llama4-scout" => MoeConfig {
            weight_at: ScaleAt::Input,
            shared: Some(SharedExpert {
                intermediate: 8192,
                gated: false,
            }),
            ..base(5120, 8192, 16, RouterConfig::llama4(1))
        },
        _ => return None,
    })
}

/// Preset `name`'s block with the same experts, rule and features at a smaller width: hidden
/// `hidden`, every intermediate `intermediate` (the CPU emulator's tests; real widths are for
/// hardware).
pub fn narrowed(name: &str, hidden: usize, intermediate: usize) -> Option<MoeConfig> {
    let mut cfg = preset(name)?;
    cfg.hidden = hidden;
    cfg.intermediate = intermediate;
    if let Some(s) = cfg.shared.as_mut() {
        s.intermediate = intermediate;
    }
    Some(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_a_valid_block() {
        for name in NAMES {
            let cfg = preset(name).unwrap();
            cfg.validate("preset").unwrap();
            narrowed(name, 64, 32)
                .unwrap()
                .validate("narrowed")
                .unwrap();
        }
        assert!(preset("gpt-4").is_none());
    }
}
