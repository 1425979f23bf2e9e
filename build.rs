//! Compiles every `kernels/*.cu` into a fatbin with nvcc and embeds the images in the crate.
//!
//! Modes, chosen by `MOE_KERNELS_BUILD`:
//! - `auto` (default): compile when nvcc is found; otherwise warn and build a crate without kernels.
//! - `off`: never compile kernels.
//! - `require`: a missing nvcc is an error.
//!
//! An nvcc that is found but fails is always an error, whatever the mode.
//!
//! Targets: sm_80 and sm_90 machine code plus compute_90 PTX, unless `MOE_KERNELS_ARCHS` says
//! otherwise (comma-separated, e.g. `80,90` or `90`; the highest also gets its PTX).
//! Files named `*_sm90a.cu` hold Hopper-only instructions (wgmma, setmaxnreg) and are built for
//! `sm_90a` alone.
//!
//! The generated `$OUT_DIR/kernel_images.rs` holds one `Option<&[u8]>` per file (`None` when not
//! built), the nvcc version, the architectures and the ptxas resource report.
//!
//! `MOE_KERNELS_CACHE=DIR` (optional) keeps each file's fatbin, ptxas report and PTX warnings in
//! DIR under a key made of the nvcc found, its version, every nvcc argument but the output
//! paths, the file and the headers of `kernels/common` it includes, directly or not (`#include
//! "name"` lines; names and bytes). A later build with the same key (another profile, `cargo
//! clippy` after `cargo build`, a scratch copy of the crate) copies them instead of running
//! nvcc. Line info in a reused image names the source paths of the build that made it.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Newest PTX ISA that a CUDA 13.0 driver (r580) and ptxas 13.0 accept.
const MAX_PTX_ISA: (u32, u32) = (9, 0);
const DEFAULT_ARCHS: &[u32] = &[80, 90];
/// The folder `scripts/install-cuda-toolchain.sh` installs into.
const PINNED_TOOLCHAIN: &str = ".cuda-toolchain/nvidia/cu13/bin";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Off,
    Require,
}

struct Kernel {
    /// File stem, e.g. `activation`.
    stem: String,
    src: PathBuf,
    hopper_only: bool,
}

struct Built {
    stem: String,
    fatbin: PathBuf,
    ptxas_report: String,
}

/// What `MOE_KERNELS_CACHE` keys an image by, besides the nvcc arguments.
struct CacheKey {
    dir: PathBuf,
    /// nvcc's path and version, hashed.
    common: u128,
}

/// nvcc's path (links resolved: a scratch copy that links the toolchain finds the same one) and
/// version.
fn common_hash(nvcc: &Path, version: &str) -> u128 {
    let mut h = Hasher::new();
    let real = fs::canonicalize(nvcc).unwrap_or_else(|_| nvcc.to_path_buf());
    h.bytes(real.to_string_lossy().as_bytes());
    h.bytes(version.as_bytes());
    h.finish()
}

/// The headers of `common` that `src` includes, directly or through another (`#include "name"`
/// lines), sorted by name.
fn included_headers(src: &Path, common: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(file) = todo.pop() {
        let text = fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let Some(rest) = line.trim_start().strip_prefix("#include") else {
                continue;
            };
            let Some(name) = rest
                .trim()
                .strip_prefix('"')
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            let path = common.join(name);
            if path.is_file() && !found.contains(&path) {
                found.push(path.clone());
                todo.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The cache entry of kernel `k` built with `args`: nvcc, the arguments, the file and the headers
/// it includes, as they are now.
fn cache_entry(
    c: &CacheKey,
    args: &[std::ffi::OsString],
    k: &Kernel,
    kernel_dir: &Path,
) -> PathBuf {
    let mut h = Hasher::new();
    h.bytes(&c.common.to_le_bytes());
    for a in args {
        h.bytes(a.to_string_lossy().as_bytes());
    }
    h.bytes(&fs::read(&k.src).unwrap_or_default());
    for path in included_headers(&k.src, &kernel_dir.join("common")) {
        h.bytes(path.file_name().unwrap().to_string_lossy().as_bytes());
        h.bytes(&fs::read(&path).unwrap_or_default());
    }
    c.dir.join(format!("{}-{:032x}", k.stem, h.finish()))
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest_dir.join("kernels");

    for var in [
        "MOE_KERNELS_BUILD",
        "MOE_KERNELS_ARCHS",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "NVCC_CCBIN",
        "MOE_KERNELS_CACHE",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!(
        "cargo::rerun-if-changed={}",
        manifest_dir.join(PINNED_TOOLCHAIN).display()
    );

    let kernels = list_kernels(&kernel_dir);
    for path in list_files(&kernel_dir.join("common")) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    for k in &kernels {
        println!("cargo::rerun-if-changed={}", k.src.display());
    }

    let mode = match env::var("MOE_KERNELS_BUILD").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Mode::Auto,
        Ok("off") => Mode::Off,
        Ok("require") => Mode::Require,
        Ok(other) => fail(&format!(
            "MOE_KERNELS_BUILD: expected `auto`, `off` or `require`, got `{other}`"
        )),
    };
    let archs = parse_archs();

    let nvcc = match mode {
        Mode::Off => None,
        _ => find_nvcc(&manifest_dir),
    };
    let nvcc = match (mode, nvcc) {
        (_, Some(nvcc)) => Some(nvcc),
        (Mode::Off, None) => None,
        (Mode::Auto, None) => {
            println!(
                "cargo::warning=moe-kernels: nvcc not found, building without CUDA kernels \
                 (GPU ops will return Error::KernelsNotBuilt). Install the pinned toolchain with \
                 scripts/install-cuda-toolchain.sh, or set NVCC / CUDA_HOME."
            );
            None
        }
        (Mode::Require, None) => fail(
            "MOE_KERNELS_BUILD=require but nvcc was not found. Looked in $NVCC, $CUDA_HOME/bin, \
             $CUDA_PATH/bin, PATH, /usr/local/cuda/bin and .cuda-toolchain/ (see \
             scripts/install-cuda-toolchain.sh).",
        ),
    };

    let generated = match nvcc {
        None => generate(&kernels, &[], None, &[]),
        Some(nvcc) => {
            let version = nvcc_version(&nvcc);
            let cache = env::var_os("MOE_KERNELS_CACHE")
                .filter(|d| !d.is_empty())
                .map(|dir| CacheKey {
                    dir: PathBuf::from(dir),
                    common: common_hash(&nvcc, &version),
                });
            let built = compile_all(
                &nvcc,
                &kernels,
                &archs,
                &kernel_dir,
                &out_dir,
                cache.as_ref(),
            );
            let arch_names = arch_names(&archs);
            generate(&kernels, &built, Some(&version), &arch_names)
        }
    };
    fs::write(out_dir.join("kernel_images.rs"), generated).unwrap();
}

fn fail(msg: &str) -> ! {
    eprintln!("error: moe-kernels build: {msg}");
    std::process::exit(1);
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn list_kernels(dir: &Path) -> Vec<Kernel> {
    list_files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            let hopper_only = stem.ends_with("_sm90a");
            Kernel {
                stem,
                src,
                hopper_only,
            }
        })
        .collect()
}

fn parse_archs() -> Vec<u32> {
    let Ok(spec) = env::var("MOE_KERNELS_ARCHS") else {
        return DEFAULT_ARCHS.to_vec();
    };
    let mut archs = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let digits = part.trim_start_matches("sm_");
        match digits.parse::<u32>() {
            Ok(a) if a >= 70 => archs.push(a),
            _ => fail(&format!(
                "MOE_KERNELS_ARCHS: expected a comma-separated list such as `80,90`, got `{spec}`"
            )),
        }
    }
    if archs.is_empty() {
        fail("MOE_KERNELS_ARCHS is set but names no architecture");
    }
    archs.sort_unstable();
    archs.dedup();
    archs
}

fn arch_names(archs: &[u32]) -> Vec<String> {
    let mut names: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
    names.push(format!("compute_{}", archs.last().unwrap()));
    names
}

/// `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, `/usr/local/cuda/bin`, then the pinned
/// toolchain inside the repository.
fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(nvcc) = env::var_os("NVCC") {
        let nvcc = PathBuf::from(nvcc);
        if !nvcc.is_file() {
            println!(
                "cargo::warning=moe-kernels: NVCC={} is not a file; looking elsewhere",
                nvcc.display()
            );
        }
        candidates.push(nvcc);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            candidates.push(PathBuf::from(root).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(manifest_dir.join(PINNED_TOOLCHAIN).join("nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| fail(&format!("could not run {}: {e}", nvcc.display())));
    if !out.status.success() {
        fail(&format!(
            "{} --version failed: {}",
            nvcc.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| text.trim().to_string())
}

fn compile_all(
    nvcc: &Path,
    kernels: &[Kernel],
    archs: &[u32],
    kernel_dir: &Path,
    out_dir: &Path,
    cache: Option<&CacheKey>,
) -> Vec<Built> {
    // Two cores on CI: compile files in parallel, one nvcc each.
    let results: Vec<Result<Built, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = kernels
            .iter()
            .map(|k| s.spawn(move || compile_one(nvcc, k, archs, kernel_dir, out_dir, cache)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut built = Vec::new();
    let mut errors = String::new();
    for r in results {
        match r {
            Ok(b) => built.push(b),
            Err(e) => errors.push_str(&e),
        }
    }
    if !errors.is_empty() {
        fail(&format!("nvcc failed:\n{errors}"));
    }
    built
}

fn compile_one(
    nvcc: &Path,
    k: &Kernel,
    archs: &[u32],
    kernel_dir: &Path,
    out_dir: &Path,
    cache: Option<&CacheKey>,
) -> Result<Built, String> {
    let fatbin = out_dir.join(format!("{}.fatbin", k.stem));
    let keep_dir = out_dir.join(format!("{}.keep", k.stem));
    let _ = fs::remove_dir_all(&keep_dir);
    fs::create_dir_all(&keep_dir).map_err(|e| e.to_string())?;

    // The arguments that decide the image; the output paths follow them.
    let mut args: Vec<std::ffi::OsString> = [
        "-fatbin",
        "-O3",
        "-std=c++17",
        "-lineinfo",
        // The driver inflates compressed images at load time; every test, bench and CLI binary
        // embeds all of them, so this keeps each binary small.
        "-Xfatbin=-compress-all",
        "-Xptxas=-v",
    ]
    .iter()
    .map(Into::into)
    .collect();
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        args.push("-ccbin".into());
        args.push(ccbin);
    }
    if k.hopper_only {
        args.push("-gencode=arch=compute_90a,code=sm_90a".into());
    } else {
        for a in archs {
            args.push(format!("-gencode=arch=compute_{a},code=sm_{a}").into());
        }
        let top = archs.last().unwrap();
        args.push(format!("-gencode=arch=compute_{top},code=compute_{top}").into());
    }

    let entry = cache.map(|c| cache_entry(c, &args, k, kernel_dir));
    if let Some(entry) = &entry
        && let Some(built) = from_cache(k, entry, &fatbin)
    {
        return Ok(built);
    }

    let mut cmd = Command::new(nvcc);
    cmd.args(&args)
        .arg("--keep")
        .arg("--keep-dir")
        .arg(&keep_dir)
        .arg("-I")
        .arg(kernel_dir.join("common"));
    cmd.arg("-o").arg(&fatbin).arg(&k.src);

    let out = cmd
        .output()
        .map_err(|e| format!("could not run {}: {e}\n", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "--- {} (exit {}) ---\n{}{}\n",
            k.src.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            stderr
        ));
    }
    let ptx_warnings = check_ptx_isa(k, &keep_dir);
    for w in &ptx_warnings {
        println!("cargo::warning={w}");
    }
    warn_on_spills(k, &stderr);
    // Stored only if no source changed while nvcc ran (the image might not be the key's).
    if let (Some(entry), Some(c)) = (&entry, cache)
        && cache_entry(c, &args, k, kernel_dir) == *entry
    {
        to_cache(entry, &fatbin, &stderr, &ptx_warnings);
    }
    Ok(Built {
        stem: k.stem.clone(),
        fatbin,
        ptxas_report: stderr,
    })
}

/// A cached image for `k` copied to `fatbin`, its warnings repeated; None on a miss.
fn from_cache(k: &Kernel, entry: &Path, fatbin: &Path) -> Option<Built> {
    let report = fs::read_to_string(entry.join("ptxas.txt")).ok()?;
    let warnings = fs::read_to_string(entry.join("ptx-warnings.txt")).ok()?;
    fs::copy(entry.join("image.fatbin"), fatbin).ok()?;
    for w in warnings.lines() {
        println!("cargo::warning={w}");
    }
    warn_on_spills(k, &report);
    Some(Built {
        stem: k.stem.clone(),
        fatbin: fatbin.to_path_buf(),
        ptxas_report: report,
    })
}

/// Stores an image under `entry`, whole or not at all: written beside it, then renamed (a build
/// that stored the same key first wins; failures only cost the next build a compile).
fn to_cache(entry: &Path, fatbin: &Path, report: &str, ptx_warnings: &[String]) {
    let Some(parent) = entry.parent() else {
        return;
    };
    let tmp = parent.join(format!(
        ".{}.{}",
        entry.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let stored = fs::create_dir_all(&tmp).is_ok()
        && fs::copy(fatbin, tmp.join("image.fatbin")).is_ok()
        && fs::write(tmp.join("ptxas.txt"), report).is_ok()
        && fs::write(tmp.join("ptx-warnings.txt"), ptx_warnings.join("\n")).is_ok();
    if !stored || fs::rename(&tmp, entry).is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
}

/// Two 64-bit FNV-1a hashes with different offsets, as one 128-bit key: no build dependency,
/// and a collision between two kernel sources is not a practical concern at this width.
struct Hasher(u64, u64);

impl Hasher {
    fn new() -> Self {
        Hasher(0xcbf2_9ce4_8422_2325, 0x6c62_272e_07bb_0142)
    }

    /// Hashes `b` with its length in front, so that the boundaries between parts count.
    fn bytes(&mut self, b: &[u8]) {
        for &x in (b.len() as u64).to_le_bytes().iter().chain(b) {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
            self.1 = (self.1 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u128 {
        (u128::from(self.0) << 64) | u128::from(self.1)
    }
}

/// The warnings for PTX newer than the CUDA 13.0 driver accepts.
fn check_ptx_isa(k: &Kernel, keep_dir: &Path) -> Vec<String> {
    let mut warnings = Vec::new();
    for ptx in list_files(keep_dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
    {
        let Ok(text) = fs::read_to_string(&ptx) else {
            continue;
        };
        let Some(version) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))
        else {
            continue;
        };
        let mut parts = version
            .trim()
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let isa = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if isa > MAX_PTX_ISA {
            warnings.push(format!(
                "moe-kernels: {} emitted PTX ISA {}.{}, newer than {}.{}, which a CUDA 13.0 \
                 driver (r580) rejects; use the pinned 13.0 toolchain",
                k.src.display(),
                isa.0,
                isa.1,
                MAX_PTX_ISA.0,
                MAX_PTX_ISA.1
            ));
        }
    }
    warnings
}

/// DeepGEMM's rule: a kernel that uses local memory without a written reason is not done.
/// The one written reason: `decode8_stored_order` (kernels/common/qdecode.cuh), the per-8
/// decoder of act-order experts, is a call on purpose, so that it does not raise the register
/// use of every kernel that inlines `decode8`; those kernels keep a call frame (a stack frame
/// without spills) where the file calls it, used only around that call.
fn warn_on_spills(k: &Kernel, report: &str) {
    let calls_stored_order = report.contains("decode8_stored_order");
    let mut function = "";
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function ").nth(1) {
            function = rest.trim();
        }
        let spills = line.contains("spill stores") && !line.contains(" 0 bytes spill stores");
        let stack = line.contains("bytes stack frame")
            && !line.contains(" 0 bytes stack frame")
            && !(calls_stored_order && line.contains(" 0 bytes spill stores, 0 bytes spill loads"));
        if spills || stack {
            println!(
                "cargo::warning=moe-kernels: {}: {function}: {}",
                k.src.display(),
                line.trim()
            );
        }
    }
}

fn generate(
    kernels: &[Kernel],
    built: &[Built],
    nvcc_version: Option<&str>,
    archs: &[String],
) -> String {
    let mut s = String::from("// Generated by build.rs.\n\n");
    if !built.is_empty() {
        s.push_str(
            "/// Keeps an embedded image 16-byte aligned, as the driver's loader prefers.\n\
             #[repr(C, align(16))]\nstruct Aligned<B: ?Sized>(B);\n\n",
        );
    }
    let mut report = String::new();
    for k in kernels {
        let konst = k.stem.to_uppercase();
        match built.iter().find(|b| b.stem == k.stem) {
            Some(b) => {
                writeln!(
                    s,
                    "pub const {konst}: Option<&[u8]> = Some(&Aligned(*include_bytes!({:?})).0);",
                    b.fatbin.display().to_string()
                )
                .unwrap();
                writeln!(report, "== {}.cu", b.stem).unwrap();
                report.push_str(&b.ptxas_report);
            }
            None => writeln!(s, "pub const {konst}: Option<&[u8]> = None;").unwrap(),
        }
    }
    writeln!(
        s,
        "pub const NVCC_VERSION: Option<&str> = {nvcc_version:?};"
    )
    .unwrap();
    writeln!(s, "pub const ARCHS: &[&str] = &{archs:?};").unwrap();
    writeln!(s, "pub const PTXAS_REPORT: &str = {report:?};").unwrap();
    s
}
