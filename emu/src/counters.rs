//! The profiler's records: one JSON line per launch (emu/runtime/counters.cpp counts and writes
//! them), to a file named by `MOE_EMU_COUNTERS` and/or to the process that turned counting on
//! with `moe_emu_counters_enable` and takes them with `moe_emu_counters_take`.
//!
//! `MOE_EMU_SAMPLE=F` (or `moe_emu_set_sample`) runs only the first ceil(F x blocks) blocks of
//! each counted launch and scales the counts to the whole grid; F must lie in (0, 1].

use std::ffi::{CStr, c_char, c_double, c_int, c_uint};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::sync::Mutex;

mod ffi {
    use std::ffi::{c_char, c_double, c_int};
    unsafe extern "C" {
        pub fn moe_emu_rt_counting(on: c_int);
        pub fn moe_emu_rt_sample(f: c_double) -> c_int;
        pub fn moe_emu_rt_set_resources(
            kernel: *const c_char,
            regs: u32,
            static_smem: u32,
            local: u32,
        );
        pub fn moe_emu_rt_take() -> *mut c_char;
        pub fn free(p: *mut std::ffi::c_void);
    }
}

struct State {
    file: Option<(String, File)>,
    in_process: bool,
    pending: String,
}

static STATE: Mutex<State> = Mutex::new(State {
    file: None,
    in_process: false,
    pending: String::new(),
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn update(s: &State) {
    // SAFETY: a plain store in the runtime.
    unsafe { ffi::moe_emu_rt_counting(c_int::from(s.file.is_some() || s.in_process)) };
}

/// Reads `MOE_EMU_COUNTERS` and `MOE_EMU_SAMPLE` at `cuInit`: Err with one line saying what is
/// wrong.
pub(crate) fn init_from_env() -> Result<(), String> {
    if let Ok(f) = std::env::var("MOE_EMU_SAMPLE") {
        let v: f64 = f
            .trim()
            .parse()
            .map_err(|_| format!("MOE_EMU_SAMPLE={f:?}: expected a fraction in (0, 1]"))?;
        set_sample(v).map_err(|e| format!("MOE_EMU_SAMPLE: {e}"))?;
    }
    let Ok(path) = std::env::var("MOE_EMU_COUNTERS") else {
        return Ok(());
    };
    if path.is_empty() {
        return Err(
            "MOE_EMU_COUNTERS is empty: expected the path of a file to append records to".into(),
        );
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("MOE_EMU_COUNTERS={path}: cannot write the counters file: {e}"))?;
    let mut s = state();
    s.file = Some((path, file));
    update(&s);
    Ok(())
}

fn set_sample(f: f64) -> Result<(), String> {
    // SAFETY: a plain call.
    if !(f > 0.0 && f <= 1.0) || unsafe { ffi::moe_emu_rt_sample(f) } != 0 {
        return Err(format!("a sample fraction of {f}: expected one in (0, 1]"));
    }
    Ok(())
}

/// After each launch: moves the runtime's new records to the file and the in-process list.
pub(crate) fn collect() -> Result<(), String> {
    let mut s = state();
    if s.file.is_none() && !s.in_process {
        return Ok(());
    }
    // SAFETY: the runtime hands over a malloc'd, NUL-terminated copy (or null).
    let text = unsafe {
        let p = ffi::moe_emu_rt_take();
        if p.is_null() {
            return Err("out of memory taking the counters' records".into());
        }
        let t = CStr::from_ptr(p).to_string_lossy().into_owned();
        ffi::free(p.cast());
        t
    };
    if text.is_empty() {
        return Ok(());
    }
    if let Some((path, f)) = s.file.as_mut() {
        f.write_all(text.as_bytes())
            .map_err(|e| format!("MOE_EMU_COUNTERS={path}: cannot write the counters file: {e}"))?;
    }
    if s.in_process {
        s.pending.push_str(&text);
    }
    Ok(())
}

/// Turns in-process collection on (1) or off (0); returns 0.
#[unsafe(no_mangle)]
pub extern "C" fn moe_emu_counters_enable(on: c_int) -> c_int {
    let mut s = state();
    s.in_process = on != 0;
    if !s.in_process {
        s.pending.clear();
    }
    update(&s);
    0
}

/// The records collected in-process since the last call, as JSON lines (an empty string when
/// none); release with `moe_emu_counters_free`.
#[unsafe(no_mangle)]
pub extern "C" fn moe_emu_counters_take() -> *mut c_char {
    let text = std::mem::take(&mut state().pending);
    std::ffi::CString::new(text.replace('\0', ""))
        .unwrap_or_default()
        .into_raw()
}

/// Releases a string from `moe_emu_counters_take`.
///
/// # Safety
/// `p` is null or came from `moe_emu_counters_take` and was not released before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_emu_counters_free(p: *mut c_char) {
    if !p.is_null() {
        // SAFETY: the caller's contract.
        drop(unsafe { std::ffi::CString::from_raw(p) });
    }
}

/// A kernel's resources on sm_90 (from ptxas), for occupancy in its records; 0 on success.
///
/// # Safety
/// `kernel` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_emu_set_resources(
    kernel: *const c_char,
    regs: c_uint,
    static_smem: c_uint,
    local_bytes: c_uint,
) -> c_int {
    if kernel.is_null() || regs > 255 {
        return 1;
    }
    // SAFETY: the caller's contract; the runtime copies the name.
    unsafe { ffi::moe_emu_rt_set_resources(kernel, regs, static_smem, local_bytes) };
    0
}

/// Runs only a fraction of each counted launch's blocks (see the module doc); 0 on success,
/// 1 for a fraction outside (0, 1].
#[unsafe(no_mangle)]
pub extern "C" fn moe_emu_set_sample(fraction: c_double) -> c_int {
    c_int::from(set_sample(fraction).is_err())
}
