//! Each kernel's registers, shared memory and local memory, read from the ptxas report that
//! build.rs keeps ([`crate::kernels::PTXAS_REPORT`]: `nvcc -Xptxas=-v` on every kernels/*.cu).
//!
//! ptxas prints, per entry function and target:
//! ```text
//! ptxas info    : Compiling entry function 'decode_down_bf16' for 'sm_90'
//! ptxas info    : Function properties for decode_down_bf16
//!     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 64 registers, used 1 barriers, 384 bytes smem
//! ```
//! The `smem` field is left out when a kernel has no static shared memory, and other fields
//! (`cmem[N]`, `cumulative stack size`) come and go with the target; they are skipped.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// What ptxas reports for one kernel on one target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Registers per thread.
    pub regs: u32,
    /// Static shared memory per block, in bytes.
    pub static_smem: u32,
    /// Stack frame per thread (local memory), in bytes.
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// One entry function of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxasEntry {
    pub kernel: String,
    /// The target: `sm_80`, `sm_90`, `sm_90a`.
    pub arch: String,
    pub resources: Resources,
}

const OP: &str = "profile::parse_ptxas_report";

fn bad_line(n: usize, line: &str, what: &str) -> Error {
    Error::shape(
        OP,
        "report",
        format!("line {n} to be ptxas's {what}"),
        format!("{:?}", line.trim()),
    )
}

/// The number in front of `unit` in a comma-separated ptxas field list, e.g. `smem` in
/// "Used 64 registers, used 1 barriers, 384 bytes smem".
fn field(fields: &str, unit: &str) -> Option<std::result::Result<u32, ()>> {
    fields.split(',').map(str::trim).find_map(|f| {
        let f = f.strip_prefix("Used ").unwrap_or(f);
        let (num, rest) = f.split_once(' ')?;
        (rest == unit).then(|| num.parse::<u32>().map_err(|_| ()))
    })
}

/// Every entry function of a ptxas `-v` report, in the order ptxas compiled them. Lines the
/// parser does not know are skipped; a known line it cannot read is an error naming its number.
pub fn parse_ptxas_report(report: &str) -> Result<Vec<PtxasEntry>> {
    let mut entries: Vec<PtxasEntry> = Vec::new();
    // The entry being read: its index in `entries`, and whether the "Function properties" block
    // that follows belongs to it.
    let mut current: Option<usize> = None;
    let mut properties_of_current = false;
    let mut done = false;
    for (i, raw) in report.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        let body = line
            .strip_prefix("ptxas info")
            .map(|r| r.trim_start().trim_start_matches(':').trim());
        if let Some(rest) = body.and_then(|b| b.strip_prefix("Compiling entry function ")) {
            let mut quoted = rest.split('\'').skip(1).step_by(2);
            let (Some(kernel), Some(arch)) = (quoted.next(), quoted.next()) else {
                return Err(bad_line(
                    n,
                    raw,
                    "\"Compiling entry function 'NAME' for 'ARCH'\"",
                ));
            };
            entries.push(PtxasEntry {
                kernel: kernel.to_string(),
                arch: arch.to_string(),
                resources: Resources::default(),
            });
            current = Some(entries.len() - 1);
            properties_of_current = false;
            done = false;
        } else if let Some(name) = body.and_then(|b| b.strip_prefix("Function properties for ")) {
            properties_of_current = current.is_some_and(|c| entries[c].kernel == name.trim());
        } else if line.contains("bytes stack frame") {
            if let (true, Some(c)) = (properties_of_current, current) {
                let r = &mut entries[c].resources;
                let stack = field(line, "bytes stack frame");
                let stores = field(line, "bytes spill stores");
                let loads = field(line, "bytes spill loads");
                match (stack, stores, loads) {
                    (Some(Ok(s)), Some(Ok(st)), Some(Ok(ld))) => {
                        r.stack = s;
                        r.spill_stores = st;
                        r.spill_loads = ld;
                    }
                    _ => {
                        return Err(bad_line(
                            n,
                            raw,
                            "\"N bytes stack frame, N bytes spill stores, N bytes spill loads\"",
                        ));
                    }
                }
            }
            properties_of_current = false;
        } else if let Some(fields) = body.filter(|b| b.starts_with("Used ")) {
            // A "Used" line closes its entry; one without an open entry (a device function under
            // separate compilation) is not a kernel's.
            let Some(c) = current.filter(|_| !done) else {
                continue;
            };
            let regs = match field(fields, "registers") {
                Some(Ok(r)) => r,
                _ => return Err(bad_line(n, raw, "\"Used N registers, ...\"")),
            };
            let smem = match field(fields, "bytes smem") {
                None => 0,
                Some(Ok(s)) => s,
                Some(Err(())) => return Err(bad_line(n, raw, "\"..., N bytes smem, ...\"")),
            };
            entries[c].resources.regs = regs;
            entries[c].resources.static_smem = smem;
            done = true;
        }
    }
    Ok(entries)
}

/// The targets whose figures the profiler uses, in order of preference: Hopper's, and
/// sm_90a for the Hopper-only kernels (`*_sm90a.cu`).
pub const PROFILE_ARCHS: &[&str] = &["sm_90", "sm_90a"];

/// Each kernel's resources for the first target of [`PROFILE_ARCHS`] that has it. Errors when a
/// kernel appears twice for one target (its name would not say which).
pub fn select(entries: &[PtxasEntry]) -> Result<BTreeMap<String, Resources>> {
    let mut out: BTreeMap<String, (usize, Resources)> = BTreeMap::new();
    for e in entries {
        let Some(rank) = PROFILE_ARCHS.iter().position(|a| *a == e.arch) else {
            continue;
        };
        match out.get(&e.kernel) {
            Some((r, _)) if *r == rank => {
                return Err(Error::shape(
                    "profile::resources",
                    "kernel",
                    "each kernel once per target, so that its name says which",
                    format!("`{}` twice for {}", e.kernel, e.arch),
                ));
            }
            Some((r, _)) if *r < rank => {}
            _ => {
                out.insert(e.kernel.clone(), (rank, e.resources));
            }
        }
    }
    Ok(out.into_iter().map(|(k, (_, r))| (k, r)).collect())
}

/// Every kernel of the crate's own ptxas report with its sm_90 (or sm_90a) resources. Empty when
/// the crate was built without nvcc or without sm_90.
pub fn all_resources() -> Result<&'static BTreeMap<String, Resources>> {
    static CACHE: OnceLock<std::result::Result<BTreeMap<String, Resources>, String>> =
        OnceLock::new();
    let parsed = CACHE.get_or_init(|| {
        parse_ptxas_report(crate::kernels::PTXAS_REPORT)
            .and_then(|e| select(&e))
            .map_err(|e| e.to_string())
    });
    parsed.as_ref().map_err(|e| Error::Unsupported {
        op: "profile::all_resources",
        what: format!("the embedded ptxas report could not be read: {e}"),
    })
}

/// The sm_90 (or sm_90a) resources of one of the crate's kernels, by its entry name.
pub fn resources(kernel: &str) -> Option<Resources> {
    all_resources().ok()?.get(kernel).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
== decode.cu
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'decode_down_bf16' for 'sm_80'
ptxas info    : Function properties for decode_down_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 62 registers, used 1 barriers, 380 bytes cmem[0]
ptxas info    : Compile time = 12.0 ms
ptxas info    : Compiling entry function 'decode_down_bf16' for 'sm_90'
ptxas info    : Function properties for decode_down_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers
ptxas info    : Compiling entry function 'spilly' for 'sm_90'
ptxas info    : Function properties for helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for spilly
    256 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size, 384 bytes smem
== grouped_gemm_sm90a.cu
ptxas info    : Compiling entry function 'grouped_gemm_v3_bf16_f32' for 'sm_90a'
ptxas info    : Function properties for grouped_gemm_v3_bf16_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem
";

    #[test]
    fn reads_each_entry_per_target() {
        let e = parse_ptxas_report(REPORT).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(
            (e[0].kernel.as_str(), e[0].arch.as_str()),
            ("decode_down_bf16", "sm_80")
        );
        assert_eq!(e[0].resources.regs, 62);
        assert_eq!(
            e[1].resources,
            Resources {
                regs: 64,
                ..Resources::default()
            }
        );
        // The callee's properties are not the kernel's.
        assert_eq!(
            e[2].resources,
            Resources {
                regs: 32,
                static_smem: 384,
                stack: 256,
                spill_stores: 16,
                spill_loads: 24,
            }
        );
        assert_eq!(e[3].arch, "sm_90a");
        assert_eq!(e[3].resources.static_smem, 1024);
    }

    #[test]
    fn selects_sm90_then_sm90a() {
        let m = select(&parse_ptxas_report(REPORT).unwrap()).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["decode_down_bf16"].regs, 64);
        assert_eq!(m["grouped_gemm_v3_bf16_f32"].regs, 168);
        let twice = format!(
            "{REPORT}{}",
            &REPORT[REPORT
                .find("ptxas info    : Compiling entry function 'decode_down_bf16' for 'sm_90'")
                .unwrap()..]
        );
        let e = select(&parse_ptxas_report(&twice).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`decode_down_bf16` twice for sm_90"), "{e}");
    }

    #[test]
    fn a_known_line_it_cannot_read_names_its_number() {
        let bad = REPORT.replace("Used 64 registers", "Used many registers");
        let e = parse_ptxas_report(&bad).unwrap_err().to_string();
        assert!(e.contains("line 11"), "{e}");
        assert!(e.contains("Used many registers"), "{e}");
        let bad = REPORT.replace("256 bytes stack frame", "x bytes stack frame");
        let e = parse_ptxas_report(&bad).unwrap_err().to_string();
        assert!(e.contains("line 16"), "{e}");
        let bad = "ptxas info    : Compiling entry function foo for sm_90";
        assert!(parse_ptxas_report(bad).is_err());
        assert!(parse_ptxas_report("").unwrap().is_empty());
    }

    #[test]
    fn the_crates_own_report() {
        let all = all_resources().unwrap();
        if !crate::kernels::built() || !crate::kernels::ARCHS.contains(&"sm_90") {
            return;
        }
        // Every sm_90/sm_90a entry of the report, each with a register count.
        let entries = parse_ptxas_report(crate::kernels::PTXAS_REPORT).unwrap();
        let hopper: std::collections::BTreeSet<&str> = entries
            .iter()
            .filter(|e| PROFILE_ARCHS.contains(&e.arch.as_str()))
            .map(|e| e.kernel.as_str())
            .collect();
        assert_eq!(all.len(), hopper.len());
        assert!(all.values().all(|r| r.regs > 0));
        let v3 = resources("grouped_gemm_v3_bf16_f32").unwrap();
        assert_eq!((v3.static_smem, v3.stack), (1024, 0));
        let gate_up = resources("decode_gate_up_bf16_bf16_e128").unwrap();
        assert_eq!(gate_up.static_smem, 384);
        assert!(resources("no_such_kernel").is_none());
    }
}
