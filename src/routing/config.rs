//! Router configurations: which rule turns gating logits into expert ids and weights, and the
//! presets that reproduce each model's transformers implementation.

use crate::error::{Error, Result};

/// How a router turns one token's logits `l[0..E]` into K ids and weights.
///
/// Selection is always a top-k with ties broken toward the lower expert index. NaN logits are
/// treated as -inf (before any softcap): they are chosen only after every other expert.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterRule {
    /// p = softmax(l) over all E in f32; the k largest p; optionally w = p / sum(p_k).
    /// Mixtral (always renormalises), Qwen2-MoE / Qwen3-MoE / OLMoE (`norm_topk_prob`),
    /// DeepSeek-V2 `greedy` (no renormalisation, `scale` = routed_scaling_factor).
    SoftmaxTopK { renormalize: bool },
    /// The k largest logits, then w = softmax over those k. gpt-oss (router bias folded into
    /// the logits), GraniteMoE.
    TopKSoftmax,
    /// The k largest logits, w = sigmoid(logit). Llama 4 (the weight scales the expert input).
    TopKSigmoid,
    /// DeepSeek-V3 / GLM-4.5 / Kimi-K2 (`noaux_tc`): s = sigmoid(l); the choice key is
    /// s + correction bias; the E experts form `n_group` contiguous groups, a group scores the sum
    /// of its top-2 keys, the best `topk_group` groups stay, and the top-k keys among their experts
    /// are chosen. w = s (unbiased), divided by (sum + 1e-20) when `renormalize`, times `scale`.
    SigmoidGroupTopK {
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
    },
    /// DeepSeek-V2 `group_limited_greedy`: p = softmax(l); a group scores its maximum p; the best
    /// `topk_group` groups stay; the top-k p among their experts; w = p times `scale`.
    SoftmaxGroupTopK { n_group: usize, topk_group: usize },
    /// Dynamic top-p ("Harder Tasks Need More Experts"): p = softmax(l); experts in descending p
    /// until their cumulative p reaches `p`, at most k of them. Unused slots carry id -1 and
    /// weight 0. Optionally the chosen weights are renormalised to sum to one.
    TopP { p: f32, renormalize: bool },
}

impl RouterRule {
    /// `(n_group, topk_group)` of the group-limited rules.
    pub fn groups(&self) -> Option<(usize, usize)> {
        match *self {
            RouterRule::SigmoidGroupTopK {
                n_group,
                topk_group,
                ..
            }
            | RouterRule::SoftmaxGroupTopK {
                n_group,
                topk_group,
            } => Some((n_group, topk_group)),
            _ => None,
        }
    }
}

/// A router: its rule, K, and the scalars every rule shares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    pub rule: RouterRule,
    /// Experts per token (the maximum for [`RouterRule::TopP`]).
    pub k: usize,
    /// Multiplies every weight at the end (DeepSeek's `routed_scaling_factor`); 1.0 elsewhere.
    pub scale: f32,
    /// `cap * tanh(l / cap)` applied to the logits first, when set.
    pub softcap: Option<f32>,
}

impl RouterConfig {
    pub fn new(rule: RouterRule, k: usize) -> Self {
        RouterConfig {
            rule,
            k,
            scale: 1.0,
            softcap: None,
        }
    }

    /// Mixtral: softmax over E, top-k, always renormalised.
    pub fn mixtral(k: usize) -> Self {
        Self::new(RouterRule::SoftmaxTopK { renormalize: true }, k)
    }

    /// Qwen2-MoE, Qwen3-MoE and OLMoE: softmax over E, top-k, renormalised by `norm_topk_prob`.
    pub fn qwen(k: usize, norm_topk_prob: bool) -> Self {
        Self::new(
            RouterRule::SoftmaxTopK {
                renormalize: norm_topk_prob,
            },
            k,
        )
    }

    /// gpt-oss and GraniteMoE: top-k on the logits, softmax over the k.
    pub fn gpt_oss(k: usize) -> Self {
        Self::new(RouterRule::TopKSoftmax, k)
    }

    /// Llama 4: top-k on the logits, sigmoid weights.
    pub fn llama4(k: usize) -> Self {
        Self::new(RouterRule::TopKSigmoid, k)
    }

    /// DeepSeek-V3, GLM-4.5-MoE, Kimi-K2. Needs the correction bias `[E]` at routing time.
    pub fn deepseek_v3(
        k: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    ) -> Self {
        RouterConfig {
            scale: routed_scaling_factor,
            ..Self::new(
                RouterRule::SigmoidGroupTopK {
                    n_group,
                    topk_group,
                    renormalize: norm_topk_prob,
                },
                k,
            )
        }
    }

    /// DeepSeek-V2. transformers ignores `norm_topk_prob` for this model and always multiplies by
    /// `routed_scaling_factor`; so does this preset. `group_limited` selects
    /// `topk_method = "group_limited_greedy"`, otherwise `"greedy"`.
    pub fn deepseek_v2(
        k: usize,
        group_limited: Option<(usize, usize)>,
        routed_scaling_factor: f32,
    ) -> Self {
        let rule = match group_limited {
            Some((n_group, topk_group)) => RouterRule::SoftmaxGroupTopK {
                n_group,
                topk_group,
            },
            None => RouterRule::SoftmaxTopK { renormalize: false },
        };
        RouterConfig {
            scale: routed_scaling_factor,
            ..Self::new(rule, k)
        }
    }

    /// Whether the rule needs a per-expert correction bias.
    pub fn needs_bias(&self) -> bool {
        matches!(self.rule, RouterRule::SigmoidGroupTopK { .. })
    }

    /// Checks the configuration against E experts and a bias of `bias_len` (if any).
    pub fn validate(
        &self,
        op: &'static str,
        experts: usize,
        bias_len: Option<usize>,
    ) -> Result<()> {
        let bad = |arg, expected: String, got: String| Err(Error::shape(op, arg, expected, got));
        if experts == 0 || experts > MAX_EXPERTS {
            return bad(
                "logits",
                format!("1..={MAX_EXPERTS} experts (last dim)"),
                format!("{experts}"),
            );
        }
        if self.k == 0 || self.k > experts.min(MAX_K) {
            return bad(
                "k",
                format!("1..={} (min(E={experts}, {MAX_K}))", experts.min(MAX_K)),
                format!("{}", self.k),
            );
        }
        if !self.scale.is_finite() {
            return bad("scale", "a finite value".into(), format!("{}", self.scale));
        }
        if let Some(cap) = self.softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return bad("softcap", "a finite value > 0".into(), format!("{cap}"));
        }
        if let Some((n_group, topk_group)) = self.rule.groups() {
            if n_group == 0 || n_group > MAX_GROUPS || !experts.is_multiple_of(n_group) {
                return bad(
                    "n_group",
                    format!("a divisor of E={experts} in 1..={MAX_GROUPS}"),
                    format!("{n_group}"),
                );
            }
            if topk_group == 0 || topk_group > n_group {
                return bad(
                    "topk_group",
                    format!("1..=n_group ({n_group})"),
                    format!("{topk_group}"),
                );
            }
            let per_group = experts / n_group;
            if matches!(self.rule, RouterRule::SigmoidGroupTopK { .. }) && per_group < 2 {
                return bad(
                    "n_group",
                    format!(
                        "at least 2 experts per group (the group score sums its top 2); E={experts}"
                    ),
                    format!("{n_group} groups of {per_group}"),
                );
            }
            if self.k > topk_group * per_group {
                return bad(
                    "k",
                    format!(
                        "at most topk_group * E/n_group = {}",
                        topk_group * per_group
                    ),
                    format!("{}", self.k),
                );
            }
        }
        if let RouterRule::TopP { p, .. } = self.rule
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("p", "a value in (0, 1]".into(), format!("{p}"));
        }
        match (self.needs_bias(), bias_len) {
            (true, None) => bad(
                "bias",
                format!("a correction bias of length E={experts}"),
                "none".into(),
            ),
            (true, Some(n)) if n != experts => {
                bad("bias", format!("length E={experts}"), format!("length {n}"))
            }
            (false, Some(_)) => bad(
                "bias",
                "no bias (only the grouped sigmoid rule takes one)".into(),
                "a bias".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// The largest E the fused routing kernel holds in registers (32 lanes x 32 values).
pub const MAX_EXPERTS: usize = 1024;
/// The largest K: one selected expert per lane of a warp.
pub const MAX_K: usize = 32;
/// The most groups: one group score per lane of a warp.
pub const MAX_GROUPS: usize = 32;
