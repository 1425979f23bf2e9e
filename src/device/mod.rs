//! The device layer: a context with one stream, kernel loading, and typed tensors.
//!
//! Every op of the crate enqueues its kernels on the [`Device`]'s stream and returns without
//! waiting, so a runtime can capture a sequence of ops in a CUDA graph. Only the explicit host
//! transfers ([`Device::download`] and friends) synchronise.

mod fill;
mod tensor;
mod timer;
mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdevice_attribute as Attr};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

pub use fill::uniform_at;
pub use tensor::Tensor;
pub use timer::GpuTimer;
pub use view::{TensorView, TensorViewMut};

use crate::dtype::Elem;
use crate::error::{DriverResultExt, Error, Result};
use crate::kernels::Module;

/// How the CPU emulator's device names itself (emu/src/lib.rs, `DEVICE_NAME`).
const EMULATOR_NAME_PREFIX: &str = "moe-emu";

/// What the driver says about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub sm_count: i32,
    pub total_mem_bytes: usize,
    pub l2_bytes: i32,
    /// e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    /// True on the crate's CPU emulator (emu/, run through `scripts/emulate`): the kernels run on
    /// the host, so their results are checked but their times are not GPU figures.
    pub emulated: bool,
}

/// True when the CUDA driver library can be loaded. Every entry into the driver checks this
/// first: cudarc panics on a missing library, and the crate must not.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    #[cfg(not(feature = "candle"))]
    return unsafe { sys::is_culib_present() };
    // With `candle` the driver is linked (candle-core's cudarc links CUDA at build time): a
    // process that started has it.
    #[cfg(feature = "candle")]
    true
}

/// How much work the crate has put on a [`Device`]: kernel launches, memsets, host-device
/// copies and allocations, counted as they are enqueued (captured ones too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkCounts {
    pub launches: u64,
    pub memsets: u64,
    /// Copies: uploads, downloads and device-to-device copies.
    pub copies: u64,
    /// Device allocations.
    pub allocations: u64,
}

impl std::ops::Sub for WorkCounts {
    type Output = WorkCounts;
    fn sub(self, o: WorkCounts) -> WorkCounts {
        WorkCounts {
            launches: self.launches - o.launches,
            memsets: self.memsets - o.memsets,
            copies: self.copies - o.copies,
            allocations: self.allocations - o.allocations,
        }
    }
}

/// A CUDA context and the stream every op of the crate runs on.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    info: DeviceInfo,
    launches: AtomicU64,
    memsets: AtomicU64,
    copies: AtomicU64,
    allocations: AtomicU64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

impl Device {
    /// Opens device `ordinal` with a new non-blocking stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        const OP: &str = "Device::new";
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count().map_err(|e| no_device_or_driver(OP, e))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(Error::NoDevice(format!(
                "device ordinal {ordinal} requested, {count} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| no_device_or_driver(OP, e))?;
        // The crate orders its work on one stream and never relies on cudarc's per-buffer
        // events; turning them off keeps launches free of event records, which graph capture
        // and the hot path both want.
        // SAFETY: no buffer of this context exists yet, so none carries events to lose.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().op(OP)?;
        Self::on(OP, ctx, stream)
    }

    /// A device whose ops go on a stream the runtime already has (candle's, a runtime's own):
    /// the crate's work is ordered with the runtime's by the stream itself, with no host wait and
    /// no event between them. Where the stream's context tracks events per buffer (cudarc's
    /// default), the crate's own buffers record them too; the crate's launches do not.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        const OP: &str = "Device::from_stream";
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let ctx = stream.context().clone();
        Self::on(OP, ctx, stream)
    }

    /// [`Device::from_stream`] for a raw `CUstream` of `ctx` (null: the context's legacy default
    /// stream). A stream of another context is refused.
    ///
    /// # Safety
    /// `stream` must be a valid stream, or null, and its owner must keep it alive while this
    /// device (or anything made from it) is used; the owner orders its own work on it.
    pub unsafe fn from_raw_stream(ctx: &Arc<CudaContext>, stream: sys::CUstream) -> Result<Self> {
        const OP: &str = "Device::from_raw_stream";
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        ctx.bind_to_thread().op(OP)?;
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes one CUcontext; the driver checks the stream handle.
        unsafe { sys::cuStreamGetCtx(stream, &mut owner) }
            .result()
            .op(OP)?;
        if owner != ctx.cu_ctx() {
            return Err(Error::shape(
                OP,
                "stream",
                format!("a stream of device {}'s context", ctx.ordinal()),
                "a stream of another context",
            ));
        }
        // SAFETY: the stream belongs to ctx (checked) and the caller keeps it alive.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::on(OP, ctx.clone(), stream)
    }

    fn on(op: &'static str, ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let info = query_info(&ctx, ctx.ordinal()).op(op)?;
        Ok(Device {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            info,
            launches: AtomicU64::new(0),
            memsets: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
        })
    }

    /// The launches and memsets enqueued on this device so far; the difference of two readings
    /// counts what a stretch of work enqueued.
    pub fn work_counts(&self) -> WorkCounts {
        WorkCounts {
            launches: self.launches.load(Ordering::Relaxed),
            memsets: self.memsets.load(Ordering::Relaxed),
            copies: self.copies.load(Ordering::Relaxed),
            allocations: self.allocations.load(Ordering::Relaxed),
        }
    }

    /// Launches `func` on the stream with `params` as its single argument, and counts it.
    ///
    /// # Safety
    /// `func` must take exactly one argument of type `P`, and with `params` and `cfg` every
    /// access the kernel makes must stay inside the buffers `params` points at, which must
    /// belong to this device and outlive the launch (every op's `// SAFETY:` says why).
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        op: &'static str,
        func: &CudaFunction,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        self.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract.
        unsafe { self.stream.launch_builder(func).arg(params).launch(cfg) }.op(op)?;
        Ok(())
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op enqueues on. Capture it to record a CUDA graph.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Blocks until all work on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().op("Device::synchronize")
    }

    /// Copies `data` to a new tensor of `shape`.
    pub fn upload<T: Elem>(&self, data: &[T], shape: &[usize]) -> Result<Tensor<T>> {
        let numel = tensor::numel("Device::upload", shape)?;
        if numel != data.len() {
            return Err(Error::shape(
                "Device::upload",
                "data",
                format!("{numel} elements for shape {shape:?}"),
                format!("{} elements", data.len()),
            ));
        }
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.copies.fetch_add(1, Ordering::Relaxed);
        let buf = self.stream.clone_htod(data).op("Device::upload")?;
        Ok(Tensor::from_parts(buf, shape.to_vec()))
    }

    /// Copies `data` into an existing tensor of the same element count.
    pub fn upload_into<T: Elem>(&self, dst: &mut Tensor<T>, data: &[T]) -> Result<()> {
        dst.check_device("Device::upload_into", "dst", self)?;
        if dst.numel() != data.len() {
            return Err(Error::shape(
                "Device::upload_into",
                "data",
                format!("{} elements (dst shape {:?})", dst.numel(), dst.shape()),
                format!("{} elements", data.len()),
            ));
        }
        self.copies.fetch_add(1, Ordering::Relaxed);
        self.stream
            .memcpy_htod(data, &mut dst.cuda_view_mut())
            .op("Device::upload_into")
    }

    /// Copies a tensor back to the host; waits for the stream.
    pub fn download<T: Elem>(&self, t: &Tensor<T>) -> Result<Vec<T>> {
        t.check_device("Device::download", "tensor", self)?;
        self.copies.fetch_add(1, Ordering::Relaxed);
        self.stream
            .clone_dtoh(&t.cuda_view())
            .op("Device::download")
    }

    /// Copies `src` into `dst`, device to device, on the stream: both of this device, of one
    /// element count.
    pub fn copy_into<T: Elem>(&self, dst: &mut Tensor<T>, src: &Tensor<T>) -> Result<()> {
        const OP: &str = "Device::copy_into";
        dst.check_device(OP, "dst", self)?;
        src.check_device(OP, "src", self)?;
        if dst.numel() != src.numel() {
            return Err(Error::shape(
                OP,
                "dst",
                format!("{} elements (src shape {:?})", src.numel(), src.shape()),
                format!("{} elements", dst.numel()),
            ));
        }
        self.copies.fetch_add(1, Ordering::Relaxed);
        self.stream
            .memcpy_dtod(&src.cuda_view(), &mut dst.cuda_view_mut())
            .op(OP)
    }

    /// A new zero-filled tensor.
    pub fn zeros<T: Elem>(&self, shape: &[usize]) -> Result<Tensor<T>> {
        let numel = tensor::numel("Device::zeros", shape)?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.memsets.fetch_add(1, Ordering::Relaxed);
        let buf = self.stream.alloc_zeros::<T>(numel).op("Device::zeros")?;
        Ok(Tensor::from_parts(buf, shape.to_vec()))
    }

    /// A new tensor with every byte set to `byte`. Tests poison outputs with 0xFF (NaN for every
    /// float dtype, -1 for signed integers) so an element a kernel forgot to write fails the check.
    pub fn filled_bytes<T: Elem>(&self, shape: &[usize], byte: u8) -> Result<Tensor<T>> {
        let mut t = self.zeros::<T>(shape)?;
        self.fill_bytes(&mut t, byte)?;
        Ok(t)
    }

    /// Sets every byte of `t` to `byte`, on the stream.
    pub fn fill_bytes<T: Elem>(&self, t: &mut Tensor<T>, byte: u8) -> Result<()> {
        t.check_device("Device::fill_bytes", "tensor", self)?;
        let bytes = t.numel() * std::mem::size_of::<T>();
        if bytes == 0 {
            return Ok(());
        }
        self.memsets.fetch_add(1, Ordering::Relaxed);
        let ptr = t.device_ptr_mut(self);
        // SAFETY: `ptr` addresses `bytes` bytes owned by `t`, allocated on this device; every
        // bit pattern is valid for an `Elem` (they are all `Pod`).
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, byte, bytes, self.stream.cu_stream())
        }
        .op("Device::fill_bytes")
    }

    /// Loads `modules` now rather than at their first launch: a module load may synchronise
    /// the context, which must not happen inside a CUDA-graph capture.
    pub(crate) fn preload(&self, op: &'static str, modules: &[Module]) -> Result<()> {
        for &m in modules {
            self.module(op, m)?;
        }
        Ok(())
    }

    fn module(&self, op: &'static str, module: Module) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(&module) {
            return Ok(m.clone());
        }
        let image = module.image().ok_or(Error::KernelsNotBuilt {
            op,
            module: module.name(),
        })?;
        let m = self
            .ctx
            .load_module(Ptx::from_binary(image.to_vec()))
            .op(op)?;
        modules.insert(module, m.clone());
        Ok(m)
    }

    /// The kernel `name` from `module`, loading the module on first use.
    pub(crate) fn function(
        &self,
        op: &'static str,
        module: Module,
        name: &str,
    ) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok(f.clone());
        }
        let module = self.module(op, module)?;
        let f = module.load_function(name).op(op)?;
        lock(&self.functions).insert(name.to_string(), f.clone());
        Ok(f)
    }
}

/// A poisoned lock only means another thread panicked while inserting into a cache; the map
/// itself is still sound.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn no_device_or_driver(op: &'static str, e: DriverError) -> Error {
    use sys::cudaError_enum as C;
    match e.0 {
        C::CUDA_ERROR_NO_DEVICE | C::CUDA_ERROR_INVALID_DEVICE => Error::NoDevice(e.to_string()),
        C::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH | C::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
            Error::NoDevice(format!("the driver cannot run this CUDA 13.0 build: {e}"))
        }
        _ => Error::Driver { op, source: e },
    }
}

fn query_info(
    ctx: &Arc<CudaContext>,
    ordinal: usize,
) -> std::result::Result<DeviceInfo, DriverError> {
    let mut driver_version = 0;
    // SAFETY: writes one int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result()?;
    let name = ctx.name()?;
    Ok(DeviceInfo {
        ordinal,
        emulated: name.starts_with(EMULATOR_NAME_PREFIX),
        name,
        compute_capability: ctx.compute_capability()?,
        sm_count: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        total_mem_bytes: ctx.total_mem()?,
        l2_bytes: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        driver_version,
    })
}
