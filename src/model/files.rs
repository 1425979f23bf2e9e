//! A Hugging Face model folder on disk: `config.json` and the safetensors weights, one file or
//! shards listed in `model.safetensors.index.json`, memory-mapped and read by tensor name.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};

use crate::dtype::Float;
use crate::error::{Error, Result};

/// One memory-mapped safetensors file with its parsed, validated header.
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

impl TensorFile {
    /// Maps `path` and checks its header: a truncated file, a header that is not JSON, or
    /// offsets that do not tile the data section are refused here, before any tensor is read.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| {
            Error::checkpoint(&shown, "file", "a readable safetensors file", e.to_string())
        })?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped would
        // fault, as with every mmap-based loader (safetensors' own included). Weights are not
        // expected to change under a running loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| {
            Error::checkpoint(
                &shown,
                "file",
                "a file that can be memory-mapped",
                e.to_string(),
            )
        })?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::checkpoint(
                &shown,
                "header",
                "a valid safetensors header whose offsets cover the file",
                e.to_string(),
            )
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in this file.
    pub fn names(&self) -> Vec<String> {
        self.meta.tensors().into_keys().collect()
    }

    /// The `__metadata__` strings of the header.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    /// A tensor's dtype, shape and bytes.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self.info(name).ok_or_else(|| {
            Error::checkpoint(
                self.path.display(),
                format!("tensor `{name}`"),
                "present",
                "missing",
            )
        })?;
        // read_metadata checked that the offsets tile [0, data length) and that the data
        // section ends where the file does.
        let (b, e) = info.data_offsets;
        Ok(RawTensor {
            file: &self.path,
            name: name.to_string(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &self.map[self.data_start + b..self.data_start + e],
        })
    }
}

/// A tensor as it lies in the file.
pub struct RawTensor<'a> {
    pub file: &'a Path,
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    fn err(&self, what: &str, expected: impl Into<String>, got: impl Into<String>) -> Error {
        Error::checkpoint(
            self.file.display(),
            format!("tensor `{}`{what}", self.name),
            expected,
            got,
        )
    }

    /// Refuses any shape but `shape`.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(self.err(" shape", format!("{shape:?}"), format!("{:?}", self.shape)));
        }
        Ok(())
    }

    /// The values converted to `S` (exactly when `S` is at least as wide as the stored float
    /// dtype; rounded to nearest even otherwise). Stored dtypes: f32, bf16, f16.
    pub fn to_vec<S: Float>(&self) -> Result<Vec<S>> {
        fn conv<const N: usize, S: Float>(b: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<S> {
            b.chunks_exact(N)
                .map(|c| S::from_f32(f(c.try_into().expect("chunks_exact"))))
                .collect()
        }
        Ok(match self.dtype {
            Dtype::F32 => conv(self.bytes, f32::from_le_bytes),
            Dtype::BF16 => conv(self.bytes, |c| bf16::from_le_bytes(c).to_f32()),
            Dtype::F16 => conv(self.bytes, |c| f16::from_le_bytes(c).to_f32()),
            d => return Err(self.err(" dtype", "F32, BF16 or F16", format!("{d:?}"))),
        })
    }

    /// The raw bytes of a U8 tensor (packed codes, e8m0 scales).
    pub fn u8s(&self) -> Result<&[u8]> {
        match self.dtype {
            Dtype::U8 => Ok(self.bytes),
            d => Err(self.err(" dtype", "U8", format!("{d:?}"))),
        }
    }

    /// The values as i64, from an integer tensor (I64 or I32).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        Ok(match self.dtype {
            Dtype::I64 => self
                .bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact")))
                .collect(),
            Dtype::I32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("chunks_exact"))))
                .collect(),
            d => return Err(self.err(" dtype", "I64 or I32", format!("{d:?}"))),
        })
    }
}

/// A model folder: the parsed `config.json` and every weight file, with a name → file map.
pub struct ModelDir {
    dir: PathBuf,
    config: serde_json::Value,
    files: Vec<TensorFile>,
    index: HashMap<String, usize>,
}

impl ModelDir {
    /// Opens `dir`: `config.json`, then `model.safetensors.index.json` and its shards if the
    /// index exists, else `model.safetensors`. Every header is parsed now, so a malformed file
    /// fails here and not in the middle of a load.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            Error::checkpoint(
                config_path.display(),
                "file",
                "a readable config.json",
                e.to_string(),
            )
        })?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::checkpoint(config_path.display(), "contents", "JSON", e.to_string())
        })?;
        if !config.is_object() {
            return Err(Error::checkpoint(
                config_path.display(),
                "contents",
                "a JSON object",
                "another JSON value",
            ));
        }
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            shards_of(&index_path)?
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::with_capacity(shard_names.len());
        let mut index = HashMap::new();
        for shard in &shard_names {
            let file = TensorFile::open(&dir.join(shard))?;
            for name in file.names() {
                if index.insert(name.clone(), files.len()).is_some() {
                    return Err(Error::checkpoint(
                        dir.display(),
                        format!("tensor `{name}`"),
                        "stored in one file",
                        "stored in two files",
                    ));
                }
            }
            files.push(file);
        }
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A tensor by its name on disk.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        match self.index.get(name) {
            Some(&f) => self.files[f].raw(name),
            None => Err(Error::checkpoint(
                self.dir.display(),
                format!("tensor `{name}`"),
                "present in the checkpoint",
                "missing",
            )),
        }
    }

    /// A float tensor of exactly `shape`, converted to `S`.
    pub fn read<S: Float>(&self, name: &str, shape: &[usize]) -> Result<Vec<S>> {
        let t = self.raw(name)?;
        t.expect_shape(shape)?;
        t.to_vec()
    }

    /// Total bytes of the named tensors (for a progress bar), skipping missing ones.
    pub fn bytes_of<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> u64 {
        names
            .into_iter()
            .filter_map(|n| self.raw(n).ok())
            .map(|t| t.bytes.len() as u64)
            .sum()
    }
}

/// The shard file names of a `model.safetensors.index.json`, in first-seen order.
fn shards_of(index_path: &Path) -> Result<Vec<String>> {
    let shown = index_path.display();
    let text = std::fs::read_to_string(index_path)
        .map_err(|e| Error::checkpoint(&shown, "file", "a readable index", e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&shown, "contents", "JSON", e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            Error::checkpoint(&shown, "`weight_map`", "an object of name -> file", "none")
        })?;
    let mut shards: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::checkpoint(
                &shown,
                format!("`weight_map.{name}`"),
                "a file name",
                file.to_string(),
            )
        })?;
        // A shard is a plain file name inside the folder, never a path out of it.
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::checkpoint(
                &shown,
                format!("`weight_map.{name}`"),
                "a file name inside the model folder",
                file,
            ));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// A tensor to write: dtype, shape and little-endian bytes.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(shape: &[usize], v: &[f32]) -> Self {
        OwnedTensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn i64(shape: &[usize], v: &[i64]) -> Self {
        OwnedTensor {
            dtype: Dtype::I64,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` to a safetensors file at `path`.
pub fn write_tensors<N: AsRef<str>>(path: &Path, tensors: &[(N, OwnedTensor)]) -> Result<()> {
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_ref(), t)), None, path)
        .map_err(|e| {
            Error::checkpoint(
                path.display(),
                "file",
                "a writable safetensors file",
                e.to_string(),
            )
        })
}
