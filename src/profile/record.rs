//! The emulator's per-launch counter records (one JSON object per line), read into Rust.
//!
//! Every counter is a number the emulator already scaled to the whole grid when it ran only a
//! sample of the blocks, so a count may be fractional. Fields the crate does not know are
//! skipped; a field it needs that is missing or not a non-negative number is an error naming
//! the line and the field.

use serde_json::{Map, Value};

use super::ptxas::Resources;
use crate::error::{Error, Result};

/// Global-memory traffic of one kind of request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GlobalCount {
    /// Warp-wide instructions.
    pub requests: f64,
    /// 32-byte sectors touched, summed over the requests.
    pub sectors: f64,
    /// Bytes the lanes asked for.
    pub bytes: f64,
}

/// Global loads, stores, atomics, and the global side of `cp.async` (when the emulator
/// reports it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GlobalCounters {
    pub ld: GlobalCount,
    pub st: GlobalCount,
    pub atom: GlobalCount,
    /// `cp.async`'s global reads (LDGSTS); zero when the record has no `ldgsts`.
    pub ldgsts: GlobalCount,
}

/// DRAM bytes: distinct sectors, and what the emulator's L2 model sends to DRAM.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DramCounters {
    pub unique_read_bytes: f64,
    pub unique_write_bytes: f64,
    pub l2_read_bytes: f64,
    pub l2_write_bytes: f64,
}

/// Shared-memory traffic of one kind of request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SharedCount {
    pub requests: f64,
    /// Wavefronts by the bank rule (bank conflicts included).
    pub wavefronts: f64,
    /// Wavefronts without bank conflicts.
    pub ideal: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SharedCounters {
    pub ld: SharedCount,
    pub st: SharedCount,
    pub atom: SharedCount,
    pub ldmatrix: SharedCount,
    pub cp_async: SharedCount,
}

impl SharedCounters {
    pub fn wavefronts(&self) -> f64 {
        self.ld.wavefronts
            + self.st.wavefronts
            + self.atom.wavefronts
            + self.ldmatrix.wavefronts
            + self.cp_async.wavefronts
    }
}

/// Bytes moved by the asynchronous copies.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AsyncCounters {
    pub cp_async_bytes: f64,
    /// `cp.async.bulk` without a tensor map.
    pub bulk_bytes: f64,
    /// TMA tensor copies.
    pub tensor_bytes: f64,
}

impl AsyncCounters {
    pub fn total(&self) -> f64 {
        self.cp_async_bytes + self.bulk_bytes + self.tensor_bytes
    }
}

/// One tensor-core instruction shape and input type, and the work it did.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorCount {
    /// e.g. `mma.m16n8k16`, `wgmma.m64n128k16`.
    pub op: String,
    /// e.g. `bf16`, `f16`.
    pub dtype: String,
    pub count: f64,
    pub flops: f64,
}

/// The kernel's resources as the emulator had them registered, and the occupancy it derived.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordResources {
    pub regs: u32,
    pub static_smem: u32,
    /// Local memory (stack) per thread, in bytes.
    pub local: u32,
    pub blocks_per_sm: u32,
    pub limiter: String,
}

impl RecordResources {
    pub fn resources(&self) -> Resources {
        Resources {
            regs: self.regs,
            static_smem: self.static_smem,
            stack: self.local,
            spill_stores: 0,
            spill_loads: 0,
        }
    }
}

/// One launch's counters.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchRecord {
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_smem: u32,
    /// The fraction of blocks the emulator ran; counters are scaled to the whole grid.
    pub sampled: f64,
    /// `None` when the kernel's resources were not registered with the emulator.
    pub resources: Option<RecordResources>,
    pub global: GlobalCounters,
    pub dram: DramCounters,
    pub shared: SharedCounters,
    pub async_copies: AsyncCounters,
    pub tensor: Vec<TensorCount>,
}

impl LaunchRecord {
    /// Blocks in the grid (saturating: no real grid comes near `u64::MAX`).
    pub fn blocks(&self) -> u64 {
        dim3_product(self.grid)
    }

    /// Threads per block (saturating).
    pub fn block_threads(&self) -> u64 {
        dim3_product(self.block)
    }

    pub fn tensor_flops(&self) -> f64 {
        self.tensor.iter().map(|t| t.flops).sum()
    }

    /// Reads the emulator's JSON lines; blank lines are skipped.
    pub fn parse_lines(text: &str) -> Result<Vec<LaunchRecord>> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| LaunchRecord::parse_line(l, i + 1))
            .collect()
    }

    /// Reads one record; `line` is its 1-based line number, for the error.
    pub fn parse_line(text: &str, line: usize) -> Result<LaunchRecord> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            Error::shape(
                OP,
                "text",
                format!("line {line} to be one JSON launch record"),
                format!("invalid JSON ({e})"),
            )
        })?;
        let r = Reader { line };
        let top = r.object(&value, "the record")?;
        let global = r.object(r.get(top, "", "global")?, "global")?;
        let dram = r.object(r.get(top, "", "dram")?, "dram")?;
        let shared = r.object(r.get(top, "", "shared")?, "shared")?;
        let asyn = r.object(r.get(top, "", "async")?, "async")?;
        let sampled = r.number(top, "", "sampled")?;
        if !(sampled > 0.0 && sampled <= 1.0) {
            return Err(r.wrong("sampled", "a fraction in (0, 1]", &sampled.to_string()));
        }
        let resources = match r.get(top, "", "resources")? {
            Value::Null => None,
            v => {
                let o = r.object(v, "resources")?;
                let p = "resources.";
                Some(RecordResources {
                    regs: r.uint(o, p, "regs")?,
                    static_smem: r.uint(o, p, "static_smem")?,
                    local: r.uint(o, p, "local")?,
                    blocks_per_sm: r.uint(o, p, "blocks_per_sm")?,
                    limiter: r.string(o, p, "limiter")?,
                })
            }
        };
        let tensor = match r.get(top, "", "tensor")? {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let path = format!("tensor[{i}].");
                    let o = r.object(t, &path)?;
                    Ok(TensorCount {
                        op: r.string(o, &path, "op")?,
                        dtype: r.string(o, &path, "dtype")?,
                        count: r.number(o, &path, "count")?,
                        flops: r.number(o, &path, "flops")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            v => return Err(r.wrong("tensor", "an array", &short(v))),
        };
        Ok(LaunchRecord {
            kernel: r.string(top, "", "kernel")?,
            grid: r.dim3(top, "grid")?,
            block: r.dim3(top, "block")?,
            dyn_smem: r.uint(top, "", "dyn_smem")?,
            sampled,
            resources,
            global: GlobalCounters {
                ld: r.global(global, "ld", true)?,
                st: r.global(global, "st", true)?,
                atom: r.global(global, "atom", true)?,
                ldgsts: r.global(global, "ldgsts", false)?,
            },
            dram: DramCounters {
                unique_read_bytes: r.number(dram, "dram.", "unique_read_bytes")?,
                unique_write_bytes: r.number(dram, "dram.", "unique_write_bytes")?,
                l2_read_bytes: r.number(dram, "dram.", "l2_read_bytes")?,
                l2_write_bytes: r.number(dram, "dram.", "l2_write_bytes")?,
            },
            shared: SharedCounters {
                ld: r.shared(shared, "ld")?,
                st: r.shared(shared, "st")?,
                atom: r.shared(shared, "atom")?,
                ldmatrix: r.shared(shared, "ldmatrix")?,
                cp_async: r.shared(shared, "cp_async")?,
            },
            async_copies: AsyncCounters {
                cp_async_bytes: r.number(asyn, "async.", "cp_async_bytes")?,
                bulk_bytes: r.number(asyn, "async.", "bulk_bytes")?,
                tensor_bytes: r.number(asyn, "async.", "tensor_bytes")?,
            },
            tensor,
        })
    }
}

const OP: &str = "LaunchRecord::parse_lines";

fn dim3_product(d: [u32; 3]) -> u64 {
    d.iter().fold(1u64, |p, &x| p.saturating_mul(u64::from(x)))
}

/// A JSON value, shortened for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.floor_char_boundary(40)])
    } else {
        s
    }
}

/// Field access with errors that name the line and the field's path.
struct Reader {
    line: usize,
}

impl Reader {
    fn wrong(&self, path: &str, expected: &str, got: &str) -> Error {
        Error::shape(
            OP,
            "text",
            format!("line {}: field `{path}` to be {expected}", self.line),
            got.to_string(),
        )
    }

    fn object<'v>(&self, v: &'v Value, path: &str) -> Result<&'v Map<String, Value>> {
        v.as_object()
            .ok_or_else(|| self.wrong(path.trim_end_matches('.'), "an object", &short(v)))
    }

    fn get<'v>(&self, o: &'v Map<String, Value>, prefix: &str, key: &str) -> Result<&'v Value> {
        o.get(key)
            .ok_or_else(|| self.wrong(&format!("{prefix}{key}"), "present", "nothing"))
    }

    fn number(&self, o: &Map<String, Value>, prefix: &str, key: &str) -> Result<f64> {
        let v = self.get(o, prefix, key)?;
        match v.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(self.wrong(
                &format!("{prefix}{key}"),
                "a non-negative number",
                &short(v),
            )),
        }
    }

    fn uint(&self, o: &Map<String, Value>, prefix: &str, key: &str) -> Result<u32> {
        let v = self.get(o, prefix, key)?;
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| {
                self.wrong(
                    &format!("{prefix}{key}"),
                    "an integer in 0..2^32",
                    &short(v),
                )
            })
    }

    fn string(&self, o: &Map<String, Value>, prefix: &str, key: &str) -> Result<String> {
        let v = self.get(o, prefix, key)?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.wrong(&format!("{prefix}{key}"), "a string", &short(v)))
    }

    fn dim3(&self, o: &Map<String, Value>, key: &str) -> Result<[u32; 3]> {
        let v = self.get(o, "", key)?;
        let dims: Option<Vec<u32>> = v.as_array().and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect()
        });
        match dims.as_deref() {
            Some(&[x, y, z]) => Ok([x, y, z]),
            _ => Err(self.wrong(key, "three integers [x, y, z]", &short(v))),
        }
    }

    fn global(&self, o: &Map<String, Value>, key: &str, required: bool) -> Result<GlobalCount> {
        let path = format!("global.{key}");
        let Some(v) = o.get(key) else {
            return if required {
                Err(self.wrong(&path, "present", "nothing"))
            } else {
                Ok(GlobalCount::default())
            };
        };
        let c = self.object(v, &path)?;
        let p = format!("{path}.");
        Ok(GlobalCount {
            requests: self.number(c, &p, "requests")?,
            sectors: self.number(c, &p, "sectors")?,
            bytes: self.number(c, &p, "bytes")?,
        })
    }

    fn shared(&self, o: &Map<String, Value>, key: &str) -> Result<SharedCount> {
        let path = format!("shared.{key}");
        let c = self.object(self.get(o, "shared.", key)?, &path)?;
        let p = format!("{path}.");
        Ok(SharedCount {
            requests: self.number(c, &p, "requests")?,
            wavefronts: self.number(c, &p, "wavefronts")?,
            ideal: self.number(c, &p, "ideal")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record in the emulator's format (with the fields the crate does not read, too).
    const SAMPLE: &str = r#"{"kernel":"decode_gate_up_bf16_bf16_e128","grid":[96,8,1],"block":[256,1,1],"dyn_smem":0,"sampled":1,"resources":{"regs":72,"static_smem":384,"local":0,"blocks_per_sm":3,"limiter":"registers"},"resident_blocks":396,"global":{"ld":{"requests":18432,"sectors":294912,"bytes":9437184},"st":{"requests":24,"sectors":24,"bytes":3072},"atom":{"requests":0,"sectors":0,"bytes":0},"ldgsts":{"requests":0,"sectors":0,"bytes":0}},"dram":{"unique_read_bytes":9441280,"unique_write_bytes":3072,"l2_read_bytes":9441280,"l2_write_bytes":3072},"shared":{"ld":{"requests":100,"wavefronts":100,"ideal":100},"st":{"requests":10,"sectors":0,"wavefronts":20,"ideal":10},"atom":{"requests":0,"wavefronts":0,"ideal":0},"ldmatrix":{"requests":0,"wavefronts":0,"ideal":0},"cp_async":{"requests":0,"wavefronts":0,"ideal":0}},"async":{"cp_async_bytes":0,"bulk_bytes":0,"tensor_bytes":0},"tensor":[{"op":"mma.m16n8k16","dtype":"bf16","count":2,"flops":8192.5}]}"#;

    #[test]
    fn reads_the_emulator_format() {
        const REGISTERED: &str = r#""resources":{"regs":72,"static_smem":384,"local":0,"#;
        let start = SAMPLE.find(REGISTERED).unwrap();
        let end = start + SAMPLE[start..].find('}').unwrap() + 1;
        let unregistered = format!("{}\"resources\":null{}", &SAMPLE[..start], &SAMPLE[end..]);
        let text = format!("{SAMPLE}\n\n{unregistered}\n");
        let recs = LaunchRecord::parse_lines(&text).unwrap();
        assert_eq!(recs.len(), 2);
        let r = &recs[0];
        assert_eq!(r.kernel, "decode_gate_up_bf16_bf16_e128");
        assert_eq!(
            (r.grid, r.block, r.blocks(), r.block_threads()),
            ([96, 8, 1], [256, 1, 1], 768, 256)
        );
        let res = r.resources.as_ref().unwrap();
        assert_eq!((res.regs, res.static_smem, res.blocks_per_sm), (72, 384, 3));
        assert_eq!(res.limiter, "registers");
        assert_eq!(r.global.ld.bytes, 9437184.0);
        assert_eq!(r.dram.l2_read_bytes, 9441280.0);
        assert_eq!(r.shared.wavefronts(), 120.0);
        assert_eq!(r.tensor[0].flops, 8192.5);
        assert_eq!(r.tensor_flops(), 8192.5);
        assert!(recs[1].resources.is_none());
        assert!(LaunchRecord::parse_lines("").unwrap().is_empty());
    }

    #[test]
    fn malformed_lines_name_the_line_and_the_field() {
        let cases = [
            (
                SAMPLE.replace(r#""bytes":9437184"#, r#""bytes":"9437184""#),
                "line 2: field `global.ld.bytes`",
            ),
            (
                SAMPLE.replace(r#""grid":[96,8,1]"#, r#""grid":[96,8]"#),
                "line 2: field `grid`",
            ),
            (
                SAMPLE.replace(r#""l2_write_bytes":3072"#, r#""l2_write_bytes":-1"#),
                "field `dram.l2_write_bytes` to be a non-negative number",
            ),
            (
                SAMPLE.replace(r#""sampled":1"#, r#""sampled":0"#),
                "field `sampled` to be a fraction",
            ),
            (
                SAMPLE.replace(
                    r#""cp_async":{"requests":0,"wavefronts":0,"ideal":0}"#,
                    r#""cp_async":3"#,
                ),
                "field `shared.cp_async` to be an object",
            ),
            (
                SAMPLE.replace(r#","tensor_bytes":0"#, ""),
                "field `async.tensor_bytes` to be present",
            ),
            (
                SAMPLE.replace(r#""dtype":"bf16","#, ""),
                "field `tensor[0].dtype` to be present",
            ),
            (
                SAMPLE.replace(r#""regs":72"#, r#""regs":4294967296"#),
                "field `resources.regs`",
            ),
            (
                SAMPLE.replace(
                    r#""ld":{"requests":18432,"sectors":294912,"bytes":9437184},"#,
                    "",
                ),
                "field `global.ld` to be present",
            ),
            (
                SAMPLE[..SAMPLE.len() - 1].to_string(),
                "line 2 to be one JSON launch record",
            ),
            ("[1,2]".to_string(), "field `the record` to be an object"),
        ];
        for (bad, needle) in cases {
            let text = format!("{SAMPLE}\n{bad}\n{SAMPLE}");
            let e = LaunchRecord::parse_lines(&text).unwrap_err().to_string();
            assert!(e.starts_with("LaunchRecord::parse_lines"), "{e}");
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // A record without the optional ldgsts reads as zero cp.async global traffic.
        let text = SAMPLE.replace(r#","ldgsts":{"requests":0,"sectors":0,"bytes":0}"#, "");
        let r = LaunchRecord::parse_lines(&text).unwrap();
        assert_eq!(r[0].global.ldgsts, GlobalCount::default());
    }
}
