//! moe-emu: a CUDA driver library for the CPU, which runs moe-kernels' own `kernels/*.cu`.
//!
//! cudarc loads `libcuda.so` at run time and looks up each driver function by name.
//! `scripts/emulate` puts this library in front of the loader under that name, so a program
//! built with moe-kernels — its tests, benches and command — runs every kernel on the CPU with
//! no change to the crate. The library is built as `libmoe_emu.so` and is never called
//! `libcuda.so` inside `target/`, where `cargo run` and `cargo test` would put it on the
//! library path of every program.
//!
//! What it implements, with CPU semantics (everything else returns `CUDA_ERROR_NOT_SUPPORTED`
//! with a message naming the call, see `stubs.rs`):
//! - one device that names itself as the emulator, with sm_90's limits;
//! - one primary context; streams that run their work at once, in order; events on the host
//!   clock;
//! - device memory from `emu/runtime/memory.cpp` (guard pages, poison, exact bounds);
//! - modules that find kernels by name in the table `emu/build.rs` compiled in, and launches
//!   refused as the hardware refuses them;
//! - stream capture into graphs, replayed on the buffers' contents at launch time.
//!
//! A kernel that fails a check (an out-of-bounds access, undefined behaviour, a deadlock, a
//! misused warp collective) fails its launch; `cuGetErrorString` of the code then gives the
//! finding, with the kernel, block and thread.

#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)] // every export is a CUDA driver function: cuda.h is their contract

pub mod counters;
pub mod stubs;
pub mod tmap;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use cudarc::driver::sys::{CUdevice_attribute as A, CUresult, cudaError_enum as E};

pub use cudarc::driver::sys::CUresult as Result;

type Handle = *mut c_void;
type DevPtr = u64;

/// The device's name, which moe-kernels checks to say its figures come from the emulator.
pub const DEVICE_NAME: &str = "moe-emu CPU emulator (sm_90 limits)";

/// The dynamic shared memory a block may use without the opt-in attribute, and with it.
const DEFAULT_DYN_SMEM: u32 = 48 * 1024;
const MAX_DYN_SMEM: u32 = 232_448;

/// One kernel of the table (emu/runtime's `KernelDef`, moe_emu/cuda.h).
#[repr(C)]
pub struct KernelDef {
    pub name: *const c_char,
    entry: *const c_void,
    pub nparams: u32,
    pub param_size: [u32; 8],
    pub param_align: [u32; 8],
    pub max_threads: u32,
    pub file: *const c_char,
}
const _: () = assert!(std::mem::size_of::<KernelDef>() == 96);

// SAFETY: the table is immutable static data of the library.
unsafe impl Sync for KernelDef {}
unsafe impl Send for KernelDef {}

impl KernelDef {
    pub fn name(&self) -> &str {
        // SAFETY: a NUL-terminated literal from the generated table.
        unsafe { CStr::from_ptr(self.name) }.to_str().unwrap_or("?")
    }
}

mod ffi {
    use super::*;
    unsafe extern "C" {
        pub fn moe_emu_init() -> c_int;
        pub fn moe_emu_memory_limit() -> usize;
        pub fn moe_emu_memory_used() -> usize;
        pub fn moe_emu_alloc(n: usize, out: *mut u64, msg: *mut c_char, cap: usize) -> c_int;
        pub fn moe_emu_free(p: u64, msg: *mut c_char, cap: usize) -> c_int;
        pub fn moe_emu_contains(p: u64, n: usize, msg: *mut c_char, cap: usize) -> c_int;
        pub fn moe_emu_range(p: u64, base: *mut u64, size: *mut usize) -> c_int;
        pub fn moe_emu_launch(
            k: *const KernelDef,
            grid: *const u32,
            block: *const u32,
            dyn_smem: u32,
            args: *const *mut c_void,
            order: c_int,
            seed: u64,
            msg: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn moe_emu_zero(p: *mut c_void, n: usize);
        pub fn moe_emu_kernel_count() -> usize;
        pub fn moe_emu_kernel(i: usize) -> *const KernelDef;
    }
}

// ---- thread order -------------------------------------------------------------------------------

/// The order in which a block's threads run between barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Forward,
    Reverse,
    /// A seeded shuffle, a different one for every block.
    Shuffle(u64),
}

impl Order {
    /// `MOE_EMU_ORDER`: `forward` (the default), `reverse`, `shuffle` or `shuffle:SEED`.
    pub fn from_env() -> std::result::Result<Order, String> {
        match std::env::var("MOE_EMU_ORDER").as_deref() {
            Err(_) | Ok("") | Ok("forward") => Ok(Order::Forward),
            Ok("reverse") => Ok(Order::Reverse),
            Ok("shuffle") => Ok(Order::Shuffle(1)),
            Ok(s) => match s.strip_prefix("shuffle:").map(str::parse::<u64>) {
                Some(Ok(seed)) => Ok(Order::Shuffle(seed)),
                _ => Err(format!(
                    "MOE_EMU_ORDER: expected forward, reverse, shuffle or shuffle:SEED, got `{s}`"
                )),
            },
        }
    }

    fn code(self) -> (c_int, u64) {
        match self {
            Order::Forward => (0, 0),
            Order::Reverse => (1, 0),
            Order::Shuffle(s) => (2, s),
        }
    }
}

thread_local! {
    static ORDER_OVERRIDE: Cell<Option<Order>> = const { Cell::new(None) };
    static LAST: RefCell<Option<(u32, &'static CStr)>> = const { RefCell::new(None) };
    static CURRENT_CTX: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` with every launch from this thread in `order` (the emulator's own tests).
pub fn with_order<R>(order: Order, f: impl FnOnce() -> R) -> R {
    let prev = ORDER_OVERRIDE.with(|o| o.replace(Some(order)));
    let r = f();
    ORDER_OVERRIDE.with(|o| o.set(prev));
    r
}

// ---- errors -------------------------------------------------------------------------------------

/// Messages are interned: a pointer handed out by cuGetErrorString stays valid.
fn intern(s: String) -> &'static CStr {
    static POOL: OnceLock<Mutex<HashSet<&'static CStr>>> = OnceLock::new();
    let c = CString::new(s.replace('\0', " ")).unwrap_or_default();
    let mut pool = POOL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&p) = pool.get(c.as_c_str()) {
        return p;
    }
    let leaked: &'static CStr = Box::leak(c.into_boxed_c_str());
    pool.insert(leaked);
    leaked
}

/// Records `msg` as the explanation of `code` for this thread's next cuGetErrorString.
fn fail(code: CUresult, msg: impl Into<String>) -> CUresult {
    let m = intern(format!("moe-emu: {}", msg.into()));
    LAST.with(|l| *l.borrow_mut() = Some((code as u32, m)));
    code
}

/// The name of a result code, read as the plain integer the caller passed (an enum value the
/// crate does not know must not become a Rust enum).
fn code_name(code: u32) -> String {
    const KNOWN: &[CUresult] = &[
        E::CUDA_SUCCESS,
        E::CUDA_ERROR_INVALID_VALUE,
        E::CUDA_ERROR_OUT_OF_MEMORY,
        E::CUDA_ERROR_NOT_INITIALIZED,
        E::CUDA_ERROR_INVALID_DEVICE,
        E::CUDA_ERROR_INVALID_CONTEXT,
        E::CUDA_ERROR_INVALID_HANDLE,
        E::CUDA_ERROR_NOT_FOUND,
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        E::CUDA_ERROR_MISALIGNED_ADDRESS,
        E::CUDA_ERROR_LAUNCH_FAILED,
        E::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
        E::CUDA_ERROR_NOT_SUPPORTED,
        E::CUDA_ERROR_ILLEGAL_STATE,
        E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        E::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
        E::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
        E::CUDA_ERROR_UNKNOWN,
    ];
    KNOWN
        .iter()
        .find(|&&c| c as u32 == code)
        .map(|c| format!("{c:?}"))
        .unwrap_or_else(|| format!("CUDA error {code}"))
}

pub(crate) fn unimplemented(name: &str) -> CUresult {
    fail(
        E::CUDA_ERROR_NOT_SUPPORTED,
        format!("{name} is not implemented by the CPU emulator"),
    )
}

fn status(rc: c_int, msg: &[u8]) -> CUresult {
    let text = || {
        let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
        String::from_utf8_lossy(&msg[..end]).into_owned()
    };
    let code = match rc {
        0 => return E::CUDA_SUCCESS,
        1 => E::CUDA_ERROR_ILLEGAL_ADDRESS,
        2 => E::CUDA_ERROR_MISALIGNED_ADDRESS,
        3 => E::CUDA_ERROR_LAUNCH_FAILED,
        4 => E::CUDA_ERROR_INVALID_VALUE,
        5 => E::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
        6 => E::CUDA_ERROR_OUT_OF_MEMORY,
        _ => E::CUDA_ERROR_UNKNOWN,
    };
    fail(code, text())
}

// ---- MOE_EMU_PROFILE=1: the time each kernel took, printed when the process exits --------------

mod profile {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    static TIMES: Mutex<Option<HashMap<String, (u64, Duration)>>> = Mutex::new(None);

    unsafe extern "C" {
        fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
    }

    pub fn start() {
        if std::env::var("MOE_EMU_PROFILE").is_ok_and(|v| v == "1") {
            *TIMES.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
            // SAFETY: registers a plain function with no arguments.
            unsafe { atexit(report) };
        }
    }

    pub fn add(kernel: &str, t: Duration) {
        if let Some(m) = TIMES.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let e = m.entry(kernel.to_string()).or_default();
            e.0 += 1;
            e.1 += t;
        }
    }

    extern "C" fn report() {
        let Some(m) = TIMES.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let mut rows: Vec<_> = m.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
        let total: Duration = rows.iter().map(|r| r.1.1).sum();
        eprintln!(
            "moe-emu profile (CPU emulator wall time, not GPU time): {:.2} s in kernels",
            total.as_secs_f64()
        );
        for (name, (n, t)) in rows.iter().take(25) {
            eprintln!("  {:>9.3} s {:>7} launches  {name}", t.as_secs_f64(), n);
        }
    }
}

// ---- state --------------------------------------------------------------------------------------

struct Function {
    def: &'static KernelDef,
    max_dyn_smem: u32,
}

#[derive(Default)]
struct Module {
    functions: HashMap<String, Box<Function>>,
}

#[derive(Clone)]
enum Op {
    Launch {
        def: &'static KernelDef,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: Vec<Vec<ParamChunk>>,
    },
    Memset {
        dst: DevPtr,
        value: u32,
        elem: usize,
        count: usize,
    },
    CopyDtoD {
        dst: DevPtr,
        src: DevPtr,
        n: usize,
    },
    Event(usize),
}

struct Capture {
    mode: u32,
    thread: std::thread::ThreadId,
    ops: Vec<Op>,
    invalid: Option<String>,
}

#[derive(Default)]
struct Stream {
    capture: Option<Capture>,
    /// The device whose context created it.
    device: usize,
}

struct Graph {
    ops: Vec<Op>,
}

struct Event {
    at: Option<Instant>,
}

#[derive(Default)]
struct Driver {
    init: bool,
    kernels: HashMap<String, &'static KernelDef>,
    ctx_refs: [u32; DEVICES],
    /// The device each live allocation was made on, by its base address.
    owners: HashMap<DevPtr, usize>,
    streams: HashSet<usize>,
    events: HashSet<usize>,
    modules: HashSet<usize>,
    functions: HashSet<usize>,
    graphs: HashSet<usize>,
    execs: HashSet<usize>,
    order: Option<Order>,
}

fn driver() -> MutexGuard<'static, Driver> {
    static D: OnceLock<Mutex<Driver>> = OnceLock::new();
    D.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Devices the emulator has: two, so that the checks across contexts (a tensor, a stream or a
/// pointer of another device) can be tested. They share one memory and one set of workers.
const DEVICES: usize = 2;

/// Device `dev`'s primary context handle: the address of a static, never dereferenced by callers.
fn primary(dev: usize) -> usize {
    static P: [u8; DEVICES] = [0; DEVICES];
    &P[dev] as *const u8 as usize
}

/// The device whose primary context `ctx` is.
fn device_of(ctx: usize) -> Option<usize> {
    (0..DEVICES).find(|&d| primary(d) == ctx)
}

/// The device of this thread's current context, device 0 when none is current (a call that
/// needs a context fails elsewhere).
fn current_device() -> usize {
    device_of(CURRENT_CTX.with(|c| c.get())).unwrap_or(0)
}

macro_rules! ensure {
    ($cond:expr, $code:ident, $($msg:tt)*) => {
        if !$cond {
            return fail(E::$code, format!($($msg)*));
        }
    };
}

macro_rules! init_or_fail {
    ($d:expr) => {
        if !$d.init {
            return fail(E::CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
        }
    };
}

/// The null stream and the two special handles, `CU_STREAM_LEGACY` (1) and
/// `CU_STREAM_PER_THREAD` (2), which name the current context's default streams. They run in
/// order like every stream here, and cannot capture.
fn default_stream(s: Handle) -> bool {
    matches!(s as usize, 0..=2)
}

impl Driver {
    fn stream(&mut self, s: Handle) -> Option<&mut Stream> {
        if s.is_null() || !self.streams.contains(&(s as usize)) {
            return None;
        }
        // SAFETY: a live handle made by cuStreamCreate from a Box<Stream>.
        Some(unsafe { &mut *(s as *mut Stream) })
    }

    /// Refuses a call that a capture in progress forbids (cuStreamBeginCapture's modes: global
    /// forbids it on every thread, thread-local on the capturing one, relaxed nowhere).
    fn forbidden_in_capture(&mut self, call: &str) -> Option<CUresult> {
        let me = std::thread::current().id();
        for &s in &self.streams {
            // SAFETY: live handles from cuStreamCreate.
            let st = unsafe { &mut *(s as *mut Stream) };
            if let Some(c) = st.capture.as_mut() {
                let hit = match c.mode {
                    0 => true,
                    1 => c.thread == me,
                    _ => false,
                };
                if hit {
                    let why = format!(
                        "{call} during a stream capture (mode {}): it could synchronise the device, so \
                         the capture is invalidated",
                        ["global", "thread-local", "relaxed"][c.mode.min(2) as usize]
                    );
                    c.invalid.get_or_insert(why.clone());
                    return Some(fail(E::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, why));
                }
            }
        }
        None
    }

    /// Where an operation on stream `s` goes: recorded into its capture, or run now.
    fn capture_of(&mut self, s: Handle) -> std::result::Result<Option<&mut Capture>, CUresult> {
        if default_stream(s) {
            return Ok(None);
        }
        match self.stream(s) {
            None => Err(fail(
                E::CUDA_ERROR_INVALID_HANDLE,
                format!("{s:?} is not a live stream"),
            )),
            Some(st) => Ok(st.capture.as_mut()),
        }
    }

    fn order(&self) -> Order {
        ORDER_OVERRIDE
            .with(|o| o.get())
            .or(self.order)
            .unwrap_or(Order::Forward)
    }
}

fn msg_buf() -> Vec<u8> {
    vec![0u8; 4096]
}

fn contains(p: DevPtr, n: usize) -> std::result::Result<(), String> {
    if n == 0 {
        return Ok(());
    }
    let mut m = msg_buf();
    // SAFETY: the runtime writes at most m.len() bytes into m.
    let rc = unsafe { ffi::moe_emu_contains(p, n, m.as_mut_ptr().cast(), m.len()) };
    if rc == 0 {
        Ok(())
    } else {
        let end = m.iter().position(|&b| b == 0).unwrap_or(m.len());
        Err(String::from_utf8_lossy(&m[..end]).into_owned())
    }
}

fn run(d: &Driver, op: &Op) -> CUresult {
    match op {
        Op::Launch {
            def,
            grid,
            block,
            smem,
            params,
        } => {
            let ptrs: Vec<*mut c_void> = params.iter().map(|p| p.as_ptr() as *mut c_void).collect();
            let (order, seed) = d.order().code();
            let mut m = msg_buf();
            let start = Instant::now();
            // SAFETY: def comes from the kernel table; ptrs point at one copy of each parameter,
            // of the size and alignment the table gives; grid and block hold three values each;
            // the runtime writes at most m.len() bytes into m.
            let rc = unsafe {
                ffi::moe_emu_launch(
                    *def,
                    grid.as_ptr(),
                    block.as_ptr(),
                    *smem,
                    ptrs.as_ptr(),
                    order,
                    seed,
                    m.as_mut_ptr().cast(),
                    m.len(),
                )
            };
            profile::add(def.name(), start.elapsed());
            if let Err(e) = counters::collect() {
                return fail(E::CUDA_ERROR_UNKNOWN, e);
            }
            status(rc, &m)
        }
        Op::Memset {
            dst,
            value,
            elem,
            count,
        } => {
            let Some(n) = count.checked_mul(*elem) else {
                return fail(E::CUDA_ERROR_INVALID_VALUE, "cuMemset: size overflows");
            };
            if let Err(why) = contains(*dst, n) {
                return fail(
                    E::CUDA_ERROR_INVALID_VALUE,
                    format!("cuMemset of {n} bytes: {why}"),
                );
            }
            if *dst % *elem as u64 != 0 {
                return fail(
                    E::CUDA_ERROR_INVALID_VALUE,
                    format!("cuMemsetD{}: 0x{dst:x} is not aligned", elem * 8),
                );
            }
            // SAFETY: [dst, dst + n) lies inside one live allocation (checked above).
            unsafe {
                match elem {
                    _ if *value == 0 => ffi::moe_emu_zero(*dst as *mut c_void, n),
                    1 => std::ptr::write_bytes(*dst as *mut u8, *value as u8, n),
                    2 => {
                        std::slice::from_raw_parts_mut(*dst as *mut u16, *count).fill(*value as u16)
                    }
                    _ => std::slice::from_raw_parts_mut(*dst as *mut u32, *count).fill(*value),
                }
            }
            E::CUDA_SUCCESS
        }
        Op::CopyDtoD { dst, src, n } => {
            if let Err(why) = contains(*dst, *n).and_then(|_| contains(*src, *n)) {
                return fail(E::CUDA_ERROR_INVALID_VALUE, format!("cuMemcpyDtoD: {why}"));
            }
            // SAFETY: both ranges lie inside live allocations (checked above); copy allows overlap.
            unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *n) };
            E::CUDA_SUCCESS
        }
        Op::Event(e) => {
            if d.events.contains(e) {
                // SAFETY: a live handle from cuEventCreate.
                unsafe { (*(*e as *mut Event)).at = Some(Instant::now()) };
            }
            E::CUDA_SUCCESS
        }
    }
}

/// Runs `op` on stream `s` now, or records it into the stream's capture.
fn submit(d: &mut Driver, s: Handle, op: Op) -> CUresult {
    match d.capture_of(s) {
        Err(e) => e,
        Ok(Some(c)) => {
            c.ops.push(op);
            E::CUDA_SUCCESS
        }
        Ok(None) => run(d, &op),
    }
}

/// Refuses a copy from or to host memory on a capturing stream (the emulator records only
/// launches, memsets, device-to-device copies and events).
fn host_copy(d: &mut Driver, s: Handle, call: &str) -> Option<CUresult> {
    match d.capture_of(s) {
        Err(e) => Some(e),
        Ok(Some(c)) => {
            let why = format!(
                "{call} on a capturing stream: a copy to or from host memory cannot be captured"
            );
            c.invalid.get_or_insert(why.clone());
            Some(fail(E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why))
        }
        Ok(None) => None,
    }
}

// ---- initialisation, device, context ------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    let mut d = driver();
    if d.init {
        return E::CUDA_SUCCESS;
    }
    // SAFETY: plain calls into the runtime.
    if unsafe { ffi::moe_emu_init() } != 0 {
        return fail(
            E::CUDA_ERROR_OUT_OF_MEMORY,
            "could not reserve the emulated device's address range",
        );
    }
    // SAFETY: the table's entries are static data; i < count.
    let n = unsafe { ffi::moe_emu_kernel_count() };
    for i in 0..n {
        let k = unsafe { &*ffi::moe_emu_kernel(i) };
        d.kernels.insert(k.name().to_string(), k);
    }
    match Order::from_env() {
        Ok(o) => d.order = Some(o),
        Err(e) => return fail(E::CUDA_ERROR_INVALID_VALUE, e),
    }
    if let Err(e) = counters::init_from_env() {
        return fail(E::CUDA_ERROR_INVALID_VALUE, e);
    }
    profile::start();
    d.init = true;
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    ensure!(
        !v.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuDriverGetVersion: null"
    );
    // SAFETY: non-null, the caller's int.
    unsafe { *v = 13000 };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(code: c_uint, out: *mut *const c_char) -> CUresult {
    if out.is_null() {
        return E::CUDA_ERROR_INVALID_VALUE;
    }
    let detail = LAST.with(|l| match *l.borrow() {
        Some((c, m)) if c == code => Some(m),
        _ => None,
    });
    let s = detail.unwrap_or_else(|| intern(code_name(code)));
    // SAFETY: non-null; the interned string lives for the process.
    unsafe { *out = s.as_ptr() };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(code: c_uint, out: *mut *const c_char) -> CUresult {
    if out.is_null() {
        return E::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null; the interned string lives for the process.
    unsafe { *out = intern(code_name(code)).as_ptr() };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !n.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuDeviceGetCount: null"
    );
    // SAFETY: non-null.
    unsafe { *n = DEVICES as c_int };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut c_int, ordinal: c_int) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !dev.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuDeviceGet: null"
    );
    ensure!(
        (0..DEVICES as c_int).contains(&ordinal),
        CUDA_ERROR_INVALID_DEVICE,
        "cuDeviceGet: ordinal {ordinal}, the emulator has {DEVICES} devices"
    );
    // SAFETY: non-null.
    unsafe { *dev = ordinal };
    E::CUDA_SUCCESS
}

fn check_dev(dev: c_int) -> std::result::Result<(), CUresult> {
    if (0..DEVICES as c_int).contains(&dev) {
        Ok(())
    } else {
        Err(fail(
            E::CUDA_ERROR_INVALID_DEVICE,
            format!("device {dev}: the emulator has {DEVICES} devices"),
        ))
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    if let Err(e) = check_dev(dev) {
        return e;
    }
    ensure!(
        !name.is_null() && len > 0,
        CUDA_ERROR_INVALID_VALUE,
        "cuDeviceGetName: no buffer"
    );
    let bytes = DEVICE_NAME.as_bytes();
    let n = bytes.len().min(len as usize - 1);
    // SAFETY: the caller's buffer holds len > n bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
        *name.add(n) = 0;
    }
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    if let Err(e) = check_dev(dev) {
        return e;
    }
    ensure!(
        !bytes.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuDeviceTotalMem: null"
    );
    // SAFETY: non-null; plain runtime query.
    unsafe { *bytes = ffi::moe_emu_memory_limit() };
    E::CUDA_SUCCESS
}

/// sm_90's limits (an H200 where a number is the card's, not the architecture's).
fn attribute(a: u32) -> Option<c_int> {
    let v = |x: A| x as u32;
    let r = match a {
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK) => 1024,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X) => 1024,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y) => 1024,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z) => 64,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X) => i32::MAX,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y) => 65535,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z) => 65535,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK) => DEFAULT_DYN_SMEM as i32,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) => {
            MAX_DYN_SMEM as i32
        }
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR) => 233_472,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY) => 65536,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE) => 32,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK) => 65536,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR) => 65536,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE) => 1_980_000,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE) => 3_201_000,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH) => 6144,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) => 132,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE) => 60 * 1024 * 1024,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR) => 2048,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR) => 32,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) => 9,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_INTEGRATED) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_ECC_ENABLED) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_COMPUTE_MODE) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT) => 1,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID) => 0,
        x if x == v(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID) => 0,
        _ => return None,
    };
    Some(r)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_uint,
    dev: c_int,
) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    if let Err(e) = check_dev(dev) {
        return e;
    }
    ensure!(
        !pi.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuDeviceGetAttribute: null"
    );
    match attribute(attrib) {
        // SAFETY: non-null.
        Some(v) => unsafe { *pi = v },
        None => {
            return fail(
                E::CUDA_ERROR_INVALID_VALUE,
                format!(
                    "cuDeviceGetAttribute: attribute {attrib} is not modelled by the CPU emulator"
                ),
            );
        }
    }
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Handle, dev: c_int) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Err(e) = check_dev(dev) {
        return e;
    }
    ensure!(
        !ctx.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuDevicePrimaryCtxRetain: null"
    );
    d.ctx_refs[dev as usize] += 1;
    // SAFETY: non-null.
    unsafe { *ctx = primary(dev as usize) as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: c_int) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Err(e) = check_dev(dev) {
        return e;
    }
    ensure!(
        d.ctx_refs[dev as usize] > 0,
        CUDA_ERROR_INVALID_CONTEXT,
        "cuDevicePrimaryCtxRelease: the primary context is not retained"
    );
    d.ctx_refs[dev as usize] -= 1;
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: Handle) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        ctx.is_null() || device_of(ctx as usize).is_some(),
        CUDA_ERROR_INVALID_CONTEXT,
        "cuCtxSetCurrent: {ctx:?} is not the emulator's context"
    );
    CURRENT_CTX.with(|c| c.set(ctx as usize));
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut Handle) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !ctx.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuCtxGetCurrent: null"
    );
    // SAFETY: non-null.
    unsafe { *ctx = CURRENT_CTX.with(|c| c.get()) as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !dev.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuCtxGetDevice: null"
    );
    ensure!(
        CURRENT_CTX.with(|c| c.get()) != 0,
        CUDA_ERROR_INVALID_CONTEXT,
        "cuCtxGetDevice: no current context"
    );
    // SAFETY: non-null.
    unsafe { *dev = current_device() as c_int };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Some(e) = d.forbidden_in_capture("cuCtxSynchronize") {
        return e;
    }
    E::CUDA_SUCCESS
}

// ---- streams and events -------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(s: *mut Handle, _flags: c_uint) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !s.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuStreamCreate: null"
    );
    let h = Box::into_raw(Box::new(Stream {
        capture: None,
        device: current_device(),
    })) as usize;
    d.streams.insert(h);
    // SAFETY: non-null.
    unsafe { *s = h as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut Handle,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    // SAFETY: the same contract as cuStreamCreate.
    unsafe { cuStreamCreate(s, flags) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.streams.remove(&(s as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuStreamDestroy: {s:?} is not a live stream"
    );
    // SAFETY: the handle was made by Box::into_raw in cuStreamCreate and is removed from the set.
    drop(unsafe { Box::from_raw(s as *mut Stream) });
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    match d.capture_of(s) {
        Err(e) => e,
        Ok(Some(c)) => {
            let why = "cuStreamSynchronize on a capturing stream: a host wait cannot be captured"
                .to_string();
            c.invalid.get_or_insert(why.clone());
            fail(E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why)
        }
        Ok(None) => E::CUDA_SUCCESS,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    match d.capture_of(s) {
        Err(e) => e,
        _ => E::CUDA_SUCCESS,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamWaitEvent(s: Handle, ev: Handle, _flags: c_uint) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.events.contains(&(ev as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuStreamWaitEvent: {ev:?} is not a live event"
    );
    match d.capture_of(s) {
        Err(e) => e,
        _ => E::CUDA_SUCCESS, // streams run their work at once, so every event has happened
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(ev: *mut Handle, _flags: c_uint) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !ev.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuEventCreate: null"
    );
    let h = Box::into_raw(Box::new(Event { at: None })) as usize;
    d.events.insert(h);
    // SAFETY: non-null.
    unsafe { *ev = h as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(ev: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.events.remove(&(ev as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuEventDestroy: {ev:?} is not a live event"
    );
    // SAFETY: made by Box::into_raw in cuEventCreate, removed from the set.
    drop(unsafe { Box::from_raw(ev as *mut Event) });
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(ev: Handle, s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.events.contains(&(ev as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuEventRecord: {ev:?} is not a live event"
    );
    submit(&mut d, s, Op::Event(ev as usize))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecordWithFlags(ev: Handle, s: Handle, _flags: c_uint) -> CUresult {
    // SAFETY: the same contract as cuEventRecord.
    unsafe { cuEventRecord(ev, s) }
}

fn event_at(d: &Driver, ev: Handle, call: &str) -> std::result::Result<Option<Instant>, CUresult> {
    if !d.events.contains(&(ev as usize)) {
        return Err(fail(
            E::CUDA_ERROR_INVALID_HANDLE,
            format!("{call}: {ev:?} is not a live event"),
        ));
    }
    // SAFETY: a live handle from cuEventCreate.
    Ok(unsafe { (*(ev as *const Event)).at })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(ev: Handle) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    match event_at(&d, ev, "cuEventSynchronize") {
        Err(e) => e,
        Ok(_) => E::CUDA_SUCCESS,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(ev: Handle) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuEventSynchronize(ev) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !ms.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuEventElapsedTime: null"
    );
    let (a, b) = match (
        event_at(&d, start, "cuEventElapsedTime"),
        event_at(&d, end, "cuEventElapsedTime"),
    ) {
        (Ok(Some(a)), Ok(Some(b))) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
        _ => {
            return fail(
                E::CUDA_ERROR_INVALID_HANDLE,
                "cuEventElapsedTime: an event that was never recorded",
            );
        }
    };
    let t = if b >= a {
        (b - a).as_secs_f64() * 1e3
    } else {
        -((a - b).as_secs_f64() * 1e3)
    };
    // SAFETY: non-null.
    unsafe { *ms = t as f32 };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuEventElapsedTime(ms, start, end) }
}

// ---- memory -------------------------------------------------------------------------------------

fn alloc(d: &mut Driver, p: *mut DevPtr, n: usize, s: Handle, call: &str) -> CUresult {
    ensure!(!p.is_null(), CUDA_ERROR_INVALID_VALUE, "{call}: null");
    match d.capture_of(s) {
        Err(e) => return e,
        Ok(Some(c)) => {
            let why =
                format!("{call} on a capturing stream: the emulator does not capture allocations");
            c.invalid.get_or_insert(why.clone());
            return fail(E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why);
        }
        Ok(None) => {}
    }
    let mut m = msg_buf();
    let mut out = 0u64;
    // SAFETY: the runtime writes one u64 and at most m.len() bytes of message.
    let rc = unsafe { ffi::moe_emu_alloc(n, &mut out, m.as_mut_ptr().cast(), m.len()) };
    let r = status(rc, &m);
    if r == E::CUDA_SUCCESS {
        d.owners.insert(out, current_device());
        // SAFETY: non-null.
        unsafe { *p = out };
    }
    r
}

fn free(d: &mut Driver, p: DevPtr, s: Handle, call: &str) -> CUresult {
    match d.capture_of(s) {
        Err(e) => return e,
        Ok(Some(c)) => {
            let why = format!("{call} on a capturing stream: the emulator does not capture frees");
            c.invalid.get_or_insert(why.clone());
            return fail(E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why);
        }
        Ok(None) => {}
    }
    let mut m = msg_buf();
    // SAFETY: the runtime writes at most m.len() bytes of message.
    let rc = unsafe { ffi::moe_emu_free(p, m.as_mut_ptr().cast(), m.len()) };
    if rc == 0 {
        d.owners.remove(&p);
    }
    status(rc, &m)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(p: *mut DevPtr, n: usize) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Some(e) = d.forbidden_in_capture("cuMemAlloc") {
        return e;
    }
    alloc(&mut d, p, n, std::ptr::null_mut(), "cuMemAlloc")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(p: *mut DevPtr, n: usize, s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    alloc(&mut d, p, n, s, "cuMemAllocAsync")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(p: DevPtr) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Some(e) = d.forbidden_in_capture("cuMemFree") {
        return e;
    }
    free(&mut d, p, std::ptr::null_mut(), "cuMemFree")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(p: DevPtr, s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    free(&mut d, p, s, "cuMemFreeAsync")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !free.is_null() && !total.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuMemGetInfo: null"
    );
    // SAFETY: non-null; plain runtime queries.
    unsafe {
        let limit = ffi::moe_emu_memory_limit();
        *total = limit;
        *free = limit.saturating_sub(ffi::moe_emu_memory_used());
    }
    E::CUDA_SUCCESS
}

fn htod(
    d: &mut Driver,
    dst: DevPtr,
    src: *const c_void,
    n: usize,
    s: Handle,
    call: &str,
) -> CUresult {
    if let Some(e) = host_copy(d, s, call) {
        return e;
    }
    if n == 0 {
        return E::CUDA_SUCCESS;
    }
    ensure!(
        !src.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "{call}: null host pointer"
    );
    if let Err(why) = contains(dst, n) {
        return fail(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("{call} of {n} bytes: {why}"),
        );
    }
    // SAFETY: the destination lies inside a live allocation; the caller vouches for n bytes at src.
    unsafe { std::ptr::copy_nonoverlapping(src.cast::<u8>(), dst as *mut u8, n) };
    E::CUDA_SUCCESS
}

fn dtoh(
    d: &mut Driver,
    dst: *mut c_void,
    src: DevPtr,
    n: usize,
    s: Handle,
    call: &str,
) -> CUresult {
    if let Some(e) = host_copy(d, s, call) {
        return e;
    }
    if n == 0 {
        return E::CUDA_SUCCESS;
    }
    ensure!(
        !dst.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "{call}: null host pointer"
    );
    if let Err(why) = contains(src, n) {
        return fail(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("{call} of {n} bytes: {why}"),
        );
    }
    // SAFETY: the source lies inside a live allocation; the caller vouches for n bytes at dst.
    // Copies complete before the call returns, as the real driver's do into pageable memory.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.cast::<u8>(), n) };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: DevPtr, src: *const c_void, n: usize) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Some(e) = d.forbidden_in_capture("cuMemcpyHtoD") {
        return e;
    }
    htod(&mut d, dst, src, n, std::ptr::null_mut(), "cuMemcpyHtoD")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: DevPtr,
    src: *const c_void,
    n: usize,
    s: Handle,
) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    htod(&mut d, dst, src, n, s, "cuMemcpyHtoDAsync")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: DevPtr, n: usize) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    if let Some(e) = d.forbidden_in_capture("cuMemcpyDtoH") {
        return e;
    }
    dtoh(&mut d, dst, src, n, std::ptr::null_mut(), "cuMemcpyDtoH")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: DevPtr,
    n: usize,
    s: Handle,
) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    dtoh(&mut d, dst, src, n, s, "cuMemcpyDtoHAsync")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: DevPtr, src: DevPtr, n: usize) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    submit(&mut d, std::ptr::null_mut(), Op::CopyDtoD { dst, src, n })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: DevPtr,
    src: DevPtr,
    n: usize,
    s: Handle,
) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    submit(&mut d, s, Op::CopyDtoD { dst, src, n })
}

macro_rules! memset {
    ($sync:ident, $async_:ident, $t:ty, $elem:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $sync(dst: DevPtr, value: $t, count: usize) -> CUresult {
            let mut d = driver();
            init_or_fail!(d);
            let op = Op::Memset {
                dst,
                value: value as u32,
                elem: $elem,
                count,
            };
            submit(&mut d, std::ptr::null_mut(), op)
        }
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $async_(
            dst: DevPtr,
            value: $t,
            count: usize,
            s: Handle,
        ) -> CUresult {
            let mut d = driver();
            init_or_fail!(d);
            let op = Op::Memset {
                dst,
                value: value as u32,
                elem: $elem,
                count,
            };
            submit(&mut d, s, op)
        }
    };
}
memset!(cuMemsetD8_v2, cuMemsetD8Async, u8, 1);
memset!(cuMemsetD16_v2, cuMemsetD16Async, u16, 2);
memset!(cuMemsetD32_v2, cuMemsetD32Async, u32, 4);

// ---- modules, functions, launches ---------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut Handle, image: *const c_void) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !m.is_null() && !image.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuModuleLoadData: null"
    );
    if let Some(e) = d.forbidden_in_capture("cuModuleLoadData") {
        return e;
    }
    // The image is not read: every kernel of the crate is compiled into this library, and
    // cuModuleGetFunction finds it by name.
    let h = Box::into_raw(Box::<Module>::default()) as usize;
    d.modules.insert(h);
    // SAFETY: non-null.
    unsafe { *m = h as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    m: *mut Handle,
    image: *const c_void,
    _n: c_uint,
    _opts: *mut c_void,
    _vals: *mut *mut c_void,
) -> CUresult {
    // SAFETY: the same contract as cuModuleLoadData.
    unsafe { cuModuleLoadData(m, image) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(m: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.modules.remove(&(m as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuModuleUnload: {m:?} is not a loaded module"
    );
    // SAFETY: made by Box::into_raw in cuModuleLoadData, removed from the set.
    let module = unsafe { Box::from_raw(m as *mut Module) };
    for f in module.functions.values() {
        d.functions.remove(&(&**f as *const Function as usize));
    }
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut Handle,
    m: Handle,
    name: *const c_char,
) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !f.is_null() && !name.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuModuleGetFunction: null"
    );
    ensure!(
        d.modules.contains(&(m as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuModuleGetFunction: {m:?} is not a loaded module"
    );
    // SAFETY: a NUL-terminated string from the caller.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let Some(&def) = d.kernels.get(&name) else {
        return fail(
            E::CUDA_ERROR_NOT_FOUND,
            format!(
                "cuModuleGetFunction: no kernel named `{name}` is compiled into the emulator (it holds \
                 the kernels of kernels/*.cu as they were when it was built: rebuild it with scripts/emulate)"
            ),
        );
    };
    // SAFETY: a live handle from cuModuleLoadData.
    let module = unsafe { &mut *(m as *mut Module) };
    let func = module.functions.entry(name).or_insert_with(|| {
        Box::new(Function {
            def,
            max_dyn_smem: DEFAULT_DYN_SMEM,
        })
    });
    let h = &**func as *const Function as usize;
    d.functions.insert(h);
    // SAFETY: non-null.
    unsafe { *f = h as Handle };
    E::CUDA_SUCCESS
}

fn function<'a>(
    d: &'a mut Driver,
    f: Handle,
    call: &str,
) -> std::result::Result<&'a mut Function, CUresult> {
    if !d.functions.contains(&(f as usize)) {
        return Err(fail(
            E::CUDA_ERROR_INVALID_HANDLE,
            format!("{call}: {f:?} is not a live function"),
        ));
    }
    // SAFETY: a live handle into a loaded module's boxed functions; the driver lock is held.
    Ok(unsafe { &mut *(f as *mut Function) })
}

const FUNC_MAX_THREADS: c_uint = 0;
const FUNC_SHARED_SIZE: c_uint = 1;
const FUNC_CONST_SIZE: c_uint = 2;
const FUNC_LOCAL_SIZE: c_uint = 3;
const FUNC_NUM_REGS: c_uint = 4;
const FUNC_PTX_VERSION: c_uint = 5;
const FUNC_BINARY_VERSION: c_uint = 6;
const FUNC_MAX_DYN_SMEM: c_uint = 8;
const FUNC_CARVEOUT: c_uint = 9;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetAttribute(f: Handle, attrib: c_uint, value: c_int) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    let func = match function(&mut d, f, "cuFuncSetAttribute") {
        Ok(func) => func,
        Err(e) => return e,
    };
    match attrib {
        FUNC_MAX_DYN_SMEM => {
            ensure!(
                (0..=MAX_DYN_SMEM as c_int).contains(&value),
                CUDA_ERROR_INVALID_VALUE,
                "cuFuncSetAttribute({}): {value} bytes of dynamic shared memory, the most a block may \
                 have is {MAX_DYN_SMEM}",
                func.def.name()
            );
            func.max_dyn_smem = value as u32;
        }
        FUNC_CARVEOUT => {}
        _ => {
            return fail(
                E::CUDA_ERROR_INVALID_VALUE,
                format!("cuFuncSetAttribute: attribute {attrib} is not settable in the emulator"),
            );
        }
    }
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetAttribute(pi: *mut c_int, attrib: c_uint, f: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !pi.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuFuncGetAttribute: null"
    );
    let func = match function(&mut d, f, "cuFuncGetAttribute") {
        Ok(func) => func,
        Err(e) => return e,
    };
    let v = match attrib {
        FUNC_MAX_THREADS => func.def.max_threads as c_int,
        FUNC_SHARED_SIZE | FUNC_CONST_SIZE | FUNC_LOCAL_SIZE => 0,
        FUNC_NUM_REGS => 32,
        FUNC_PTX_VERSION | FUNC_BINARY_VERSION => 90,
        FUNC_MAX_DYN_SMEM => func.max_dyn_smem as c_int,
        _ => {
            return fail(
                E::CUDA_ERROR_INVALID_VALUE,
                format!("cuFuncGetAttribute: attribute {attrib} is not modelled by the emulator"),
            );
        }
    };
    // SAFETY: non-null.
    unsafe { *pi = v };
    E::CUDA_SUCCESS
}

/// Refuses a launch configuration as the hardware does, and copies the parameters.
#[allow(clippy::too_many_arguments)]
fn prepare(
    func: &Function,
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> std::result::Result<Op, CUresult> {
    let name = func.def.name();
    let bad = |code, msg: String| Err(fail(code, format!("cuLaunchKernel({name}): {msg}")));
    if block.contains(&0) || grid.contains(&0) {
        return bad(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("grid {grid:?} and block {block:?} must not be empty"),
        );
    }
    if block[0] > 1024 || block[1] > 1024 || block[2] > 64 {
        return bad(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("block {block:?} is past the limits (1024, 1024, 64)"),
        );
    }
    let threads = u64::from(block[0]) * u64::from(block[1]) * u64::from(block[2]);
    if threads > 1024 {
        return bad(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("a block of {threads} threads, more than 1024"),
        );
    }
    if threads > u64::from(func.def.max_threads) {
        return bad(
            E::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
            format!(
                "a block of {threads} threads, more than the kernel's __launch_bounds__ of {}",
                func.def.max_threads
            ),
        );
    }
    if grid[0] > i32::MAX as u32 || grid[1] > 65535 || grid[2] > 65535 {
        return bad(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("grid {grid:?} is past the limits (2^31 - 1, 65535, 65535)"),
        );
    }
    if smem > func.max_dyn_smem {
        return bad(
            E::CUDA_ERROR_INVALID_VALUE,
            format!(
                "{smem} bytes of dynamic shared memory, more than the kernel's limit of {} (raise it with \
                 cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), up to {MAX_DYN_SMEM})",
                func.max_dyn_smem
            ),
        );
    }
    if !extra.is_null() {
        return bad(
            E::CUDA_ERROR_NOT_SUPPORTED,
            "the `extra` argument is not supported".into(),
        );
    }
    let n = func.def.nparams as usize;
    if n > 0 && params.is_null() {
        return bad(
            E::CUDA_ERROR_INVALID_VALUE,
            format!("kernelParams is null, the kernel takes {n}"),
        );
    }
    let mut copies = Vec::with_capacity(n);
    for i in 0..n {
        let size = func.def.param_size[i] as usize;
        // SAFETY: the caller passes one pointer per parameter of the kernel's signature.
        let p = unsafe { *params.add(i) };
        if p.is_null() {
            return bad(
                E::CUDA_ERROR_INVALID_VALUE,
                format!("parameter {i} is null"),
            );
        }
        let mut buf = vec![ParamChunk([0; 64]); size.div_ceil(64).max(1)];
        // SAFETY: p points at the caller's value of `size` bytes; buf holds at least that many.
        unsafe {
            std::ptr::copy_nonoverlapping(p.cast::<u8>(), buf.as_mut_ptr().cast::<u8>(), size)
        };
        copies.push(buf);
    }
    Ok(Op::Launch {
        def: func.def,
        grid,
        block,
        smem,
        params: copies,
    })
}

/// A kernel parameter's copy is kept in these, so that it has the largest alignment a parameter
/// takes (a CUtensorMap's 64 bytes).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct ParamChunk([u8; 64]);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    s: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    let func = match function(&mut d, f, "cuLaunchKernel") {
        Ok(func) => func,
        Err(e) => return e,
    };
    let op = match prepare(func, [gx, gy, gz], [bx, by, bz], smem, params, extra) {
        Ok(op) => op,
        Err(e) => return e,
    };
    submit(&mut d, s, op)
}

// ---- capture and graphs -------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(s: Handle, mode: c_uint) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    let Some(st) = d.stream(s) else {
        return fail(
            E::CUDA_ERROR_INVALID_VALUE,
            "cuStreamBeginCapture: the null stream or a dead stream cannot capture",
        );
    };
    ensure!(
        st.capture.is_none(),
        CUDA_ERROR_ILLEGAL_STATE,
        "cuStreamBeginCapture: the stream is already capturing"
    );
    st.capture = Some(Capture {
        mode,
        thread: std::thread::current().id(),
        ops: Vec::new(),
        invalid: None,
    });
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture(s: Handle, g: *mut Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !g.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuStreamEndCapture: null"
    );
    let Some(st) = d.stream(s) else {
        return fail(
            E::CUDA_ERROR_INVALID_HANDLE,
            "cuStreamEndCapture: not a live stream",
        );
    };
    let Some(c) = st.capture.take() else {
        return fail(
            E::CUDA_ERROR_ILLEGAL_STATE,
            "cuStreamEndCapture: the stream is not capturing",
        );
    };
    // SAFETY: non-null.
    unsafe { *g = std::ptr::null_mut() };
    if let Some(why) = c.invalid {
        return fail(
            E::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            format!("cuStreamEndCapture: the capture was invalidated: {why}"),
        );
    }
    let h = Box::into_raw(Box::new(Graph { ops: c.ops })) as usize;
    d.graphs.insert(h);
    // SAFETY: non-null.
    unsafe { *g = h as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamIsCapturing(s: Handle, status: *mut c_uint) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !status.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuStreamIsCapturing: null"
    );
    let v = match d.capture_of(s) {
        Err(e) => return e,
        Ok(None) => 0,
        Ok(Some(c)) if c.invalid.is_some() => 2,
        Ok(Some(_)) => 1,
    };
    // SAFETY: non-null.
    unsafe { *status = v };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    e: *mut Handle,
    g: Handle,
    _flags: u64,
) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !e.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuGraphInstantiate: null"
    );
    ensure!(
        d.graphs.contains(&(g as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuGraphInstantiate: {g:?} is not a live graph"
    );
    // SAFETY: a live handle from cuStreamEndCapture.
    let ops = unsafe { (*(g as *const Graph)).ops.clone() };
    let h = Box::into_raw(Box::new(Graph { ops })) as usize;
    d.execs.insert(h);
    // SAFETY: non-null.
    unsafe { *e = h as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphLaunch(e: Handle, s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.execs.contains(&(e as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuGraphLaunch: {e:?} is not an instantiated graph"
    );
    // SAFETY: a live handle from cuGraphInstantiateWithFlags.
    let ops = unsafe { (*(e as *const Graph)).ops.clone() };
    for op in ops {
        let r = submit(&mut d, s, op);
        if r != E::CUDA_SUCCESS {
            return r;
        }
    }
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphUpload(e: Handle, s: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.execs.contains(&(e as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuGraphUpload: {e:?} is not an instantiated graph"
    );
    match d.capture_of(s) {
        Err(e) => e,
        _ => E::CUDA_SUCCESS,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphExecDestroy(e: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.execs.remove(&(e as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuGraphExecDestroy: {e:?} is not an instantiated graph"
    );
    // SAFETY: made by Box::into_raw, removed from the set.
    drop(unsafe { Box::from_raw(e as *mut Graph) });
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphDestroy(g: Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        d.graphs.remove(&(g as usize)),
        CUDA_ERROR_INVALID_HANDLE,
        "cuGraphDestroy: {g:?} is not a live graph"
    );
    // SAFETY: made by Box::into_raw, removed from the set.
    drop(unsafe { Box::from_raw(g as *mut Graph) });
    E::CUDA_SUCCESS
}

// ---- pointers and stream contexts ----------------------------------------------------------------

const POINTER_CONTEXT: c_uint = 1;
const POINTER_MEMORY_TYPE: c_uint = 2;
const POINTER_DEVICE_POINTER: c_uint = 3;
const POINTER_DEVICE_ORDINAL: c_uint = 9;
const POINTER_RANGE_START: c_uint = 11;
const POINTER_RANGE_SIZE: c_uint = 12;
const MEMORYTYPE_DEVICE: c_uint = 2;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: c_uint,
    p: DevPtr,
) -> CUresult {
    let d = driver();
    init_or_fail!(d);
    ensure!(
        !data.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuPointerGetAttribute: null"
    );
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: the runtime writes two values.
    let found = unsafe { ffi::moe_emu_range(p, &mut base, &mut size) } == 0;
    ensure!(
        found,
        CUDA_ERROR_INVALID_VALUE,
        "cuPointerGetAttribute: 0x{p:x} is not in a live device allocation"
    );
    let dev = d.owners.get(&base).copied().unwrap_or(0);
    // SAFETY: data points at storage of the attribute's type, per cuda.h.
    unsafe {
        match attribute {
            POINTER_CONTEXT => *data.cast::<Handle>() = primary(dev) as Handle,
            POINTER_MEMORY_TYPE => *data.cast::<c_uint>() = MEMORYTYPE_DEVICE,
            POINTER_DEVICE_POINTER => *data.cast::<DevPtr>() = p,
            POINTER_DEVICE_ORDINAL => *data.cast::<c_int>() = dev as c_int,
            POINTER_RANGE_START => *data.cast::<DevPtr>() = base,
            POINTER_RANGE_SIZE => *data.cast::<usize>() = size,
            _ => {
                return fail(
                    E::CUDA_ERROR_INVALID_VALUE,
                    format!(
                        "cuPointerGetAttribute: attribute {attribute} is not modelled by the emulator"
                    ),
                );
            }
        }
    }
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx(s: Handle, ctx: *mut Handle) -> CUresult {
    let mut d = driver();
    init_or_fail!(d);
    ensure!(
        !ctx.is_null(),
        CUDA_ERROR_INVALID_VALUE,
        "cuStreamGetCtx: null"
    );
    let dev = if default_stream(s) {
        current_device()
    } else {
        match d.stream(s) {
            Some(st) => st.device,
            None => {
                return fail(
                    E::CUDA_ERROR_INVALID_HANDLE,
                    format!("cuStreamGetCtx: {s:?} is not a live stream"),
                );
            }
        }
    };
    // SAFETY: non-null.
    unsafe { *ctx = primary(dev) as Handle };
    E::CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx_v2(
    s: Handle,
    ctx: *mut Handle,
    green: *mut Handle,
) -> CUresult {
    if !green.is_null() {
        // SAFETY: non-null; the emulator has no green contexts.
        unsafe { *green = std::ptr::null_mut() };
    }
    // SAFETY: the same contract.
    unsafe { cuStreamGetCtx(s, ctx) }
}

// ---- for the emulator's own tests ---------------------------------------------------------------

/// The kernels compiled into the emulator, by name.
pub fn kernels() -> Vec<&'static KernelDef> {
    // SAFETY: cuInit only touches the driver's own state.
    unsafe { cuInit(0) };
    driver().kernels.values().copied().collect()
}

/// The message cuGetErrorString gives for `code` on this thread now.
pub fn error_string(code: CUresult) -> String {
    let mut p: *const c_char = std::ptr::null();
    // SAFETY: p receives a pointer to an interned, NUL-terminated string.
    unsafe {
        cuGetErrorString(code as c_uint, &mut p);
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
