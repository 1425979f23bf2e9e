//! Loading one MoE block from a Hugging Face model folder.
//!
//! [`ModelDir`] maps the folder's safetensors files; [`Model::open`] reads `config.json`, picks
//! the family from `model_type`, and knows which decoder layers are MoE; [`Model::load_layer`]
//! reads one block's tensors by their names on disk and lays them out as [`LayerWeights`]. Each
//! family reproduces its transformers MoE block; the table is in [`Family`].

mod families;
pub mod files;
mod linear;

use std::io::IsTerminal;

pub use families::Family;
pub use files::{ModelDir, OwnedTensor, RawTensor, TensorFile, write_tensors};
pub use linear::Quantization;

use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::layer::{LayerWeights, MoeConfig};

/// `config.json` values, with errors that name the key.
pub(crate) struct Config<'a> {
    file: String,
    v: &'a serde_json::Value,
}

impl<'a> Config<'a> {
    fn missing(&self, key: &str, expected: &str) -> Error {
        Error::checkpoint(&self.file, format!("key `{key}`"), expected, "missing")
    }

    fn wrong(&self, key: &str, expected: &str, got: &serde_json::Value) -> Error {
        Error::checkpoint(
            &self.file,
            format!("key `{key}`"),
            expected,
            got.to_string(),
        )
    }

    fn get(&self, key: &str) -> Option<&'a serde_json::Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| self.missing(key, "a positive integer"))?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| self.wrong(key, "a positive integer", v))
    }

    /// The first of `keys` present (a key and its aliases).
    pub(crate) fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        match keys.iter().find(|k| self.get(k).is_some()) {
            Some(k) => self.usize(k),
            None => Err(self.missing(&keys.join("` or `"), "a positive integer")),
        }
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.wrong(key, "a finite number", v)),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// A list of integers (`mlp_only_layers`, `moe_layers`); absent is empty.
    pub(crate) fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| self.wrong(key, "a list of non-negative integers", v)),
        }
    }

    /// Refuses a configuration value outside what the crate runs, naming the key.
    pub(crate) fn refuse(&self, key: &str, expected: &str, got: impl std::fmt::Display) -> Error {
        Error::checkpoint(
            &self.file,
            format!("key `{key}`"),
            expected,
            got.to_string(),
        )
    }
}

/// More decoder layers than any published model has, by far: a larger count is a broken config.
const MAX_LAYERS: usize = 4096;

/// An opened model: its folder, family, and the facts of `config.json` the MoE blocks need.
pub struct Model {
    pub dir: ModelDir,
    pub family: Family,
    pub model_type: String,
    /// The checkpoint's dtype (`torch_dtype` or `dtype`), bf16 when absent.
    pub dtype: DType,
    /// Decoder layers.
    pub layers: usize,
    /// Name prefix of the decoder layers, e.g. `model.layers`.
    pub prefix: String,
    /// How the Linear weights are stored (`quantization_config`).
    pub quant: Quantization,
}

impl Model {
    /// Opens the folder and recognises the family. Unknown `model_type`s are refused.
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let dir = ModelDir::open(path)?;
        let file = path.join("config.json").display().to_string();
        let top = Config {
            file: file.clone(),
            v: dir.config(),
        };
        let model_type = top.str_or("model_type", "")?.to_string();
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            Error::checkpoint(
                &file,
                "key `model_type`",
                format!("one of {}", Family::MODEL_TYPES.join(", ")),
                format!("{model_type:?}"),
            )
        })?;
        let text = family.text_config(&top)?;
        // `torch_dtype` (transformers 4) or `dtype` (5): the top-level one wins, as transformers
        // applies it to the sub-configs; else the text config's.
        let dtype_name = [&top, &text]
            .iter()
            .flat_map(|c| ["torch_dtype", "dtype"].map(|k| (c, k)))
            .find(|(c, k)| c.get(k).is_some())
            .map_or(Ok("bfloat16"), |(c, k)| c.str_or(k, "bfloat16"))?;
        let dtype = match dtype_name {
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            "float32" => DType::F32,
            other => {
                return Err(text.refuse("torch_dtype", "bfloat16, float16 or float32", other));
            }
        };
        let layers = text.usize("num_hidden_layers")?;
        if layers > MAX_LAYERS {
            return Err(text.refuse(
                "num_hidden_layers",
                &format!("at most {MAX_LAYERS}"),
                layers,
            ));
        }
        let quant = Quantization::from_config(&top)?;
        Ok(Model {
            quant,
            prefix: family.layer_prefix(&model_type).to_string(),
            dir,
            family,
            model_type,
            dtype,
            layers,
        })
    }

    fn text(&self) -> Result<Config<'_>> {
        let top = Config {
            file: self.dir.dir().join("config.json").display().to_string(),
            v: self.dir.config(),
        };
        self.family.text_config(&top)
    }

    /// Whether decoder layer `layer` holds an MoE block (rather than a dense MLP).
    pub fn is_moe(&self, layer: usize) -> Result<bool> {
        self.family.is_moe(&self.text()?, layer)
    }

    /// The MoE decoder layers, in order.
    pub fn moe_layers(&self) -> Result<Vec<usize>> {
        let text = self.text()?;
        let mut out = Vec::new();
        for l in 0..self.layers {
            if self.family.is_moe(&text, l)? {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// The block configuration of `layer`, refusing a layer out of range or dense.
    pub fn layer_config(&self, layer: usize) -> Result<MoeConfig> {
        let text = self.text()?;
        if layer >= self.layers {
            return Err(text.refuse(
                "num_hidden_layers",
                &format!("a layer index below {}", self.layers),
                format!("layer {layer}"),
            ));
        }
        if !self.family.is_moe(&text, layer)? {
            let moe = self.moe_layers()?;
            return Err(Error::checkpoint(
                &text.file,
                format!("layer {layer}"),
                format!("an MoE layer (this model's are {moe:?})"),
                "a dense layer",
            ));
        }
        let cfg = self.family.moe_config(&text)?;
        cfg.validate("Model::layer_config").map_err(|e| {
            Error::checkpoint(
                &text.file,
                "the MoE block it describes",
                "a block the crate can run",
                e.to_string(),
            )
        })?;
        Ok(cfg)
    }

    /// Reads layer `layer`'s block, converting its weights to `S`. Shows a progress bar on a
    /// terminal when the block is large.
    pub fn load_layer<S: Float>(&self, layer: usize) -> Result<(MoeConfig, LayerWeights<S>)> {
        let cfg = self.layer_config(layer)?;
        let names = self.family.names(&self.prefix, layer, &cfg);
        let total = self.dir.bytes_of(names.all().iter().map(String::as_str));
        let bar = (total > (256 << 20) && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "loading layer {msg} {bar:40} {bytes}/{total_bytes} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(layer.to_string());
            bar
        });
        let w = names.read(&self.dir, &cfg, self.quant, bar.as_ref());
        // Cleared on success and on error, so an error stays the one line on the terminal.
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let w = w?;
        w.check("Model::load_layer", &cfg)?;
        Ok((cfg, w))
    }
}
