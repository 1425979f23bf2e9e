//! Tensors over device memory the crate does not own: a runtime's activations and weights, used
//! where they are, with no copy.
//!
//! A [`TensorView`] (read) or [`TensorViewMut`] (read and write) is a [`Tensor`] that borrows its
//! memory for `'a` and never frees it; it dereferences to `Tensor`, so every op of the crate
//! takes it as it takes an owned tensor — there is one code path, and the same checks (shape,
//! dtype, alignment, the device's context). An owned tensor hands out the same views
//! ([`Tensor::view`], [`Tensor::view_mut`]).

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr};

use super::Device;
use super::tensor::{Tensor, numel};
use crate::dtype::Elem;
use crate::error::{Error, Result};

/// A read-only tensor over borrowed device memory.
pub struct TensorView<'a, T: Elem> {
    t: ManuallyDrop<Tensor<T>>,
    _borrow: PhantomData<&'a [T]>,
}

/// A writable tensor over borrowed device memory.
pub struct TensorViewMut<'a, T: Elem> {
    t: ManuallyDrop<Tensor<T>>,
    _borrow: PhantomData<&'a mut [T]>,
}

/// Checks `len` elements at `ptr` for `shape` on `dev` and wraps them, not owning them.
///
/// # Safety
/// `ptr` must address `len` elements of `T` in device memory of `dev`'s context that stay
/// allocated while the returned tensor lives.
unsafe fn borrowed<T: Elem>(
    op: &'static str,
    arg: &'static str,
    dev: &Device,
    ptr: CUdeviceptr,
    len: usize,
    shape: &[usize],
) -> Result<Tensor<T>> {
    let n = numel(op, shape)?;
    if n > len {
        return Err(Error::shape(
            op,
            arg,
            format!("memory of at least {n} elements for shape {shape:?}"),
            format!("{len} elements"),
        ));
    }
    check_ptr::<T>(op, arg, ptr, len)?;
    // SAFETY: the caller's contract; the slice is leaked, never freed (see Drop).
    let buf = unsafe { dev.stream().upgrade_device_ptr::<T>(ptr, len) };
    Ok(Tensor::from_parts_over(buf, shape.to_vec(), n))
}

/// Refuses a null pointer for a non-empty view, and one not aligned to the element size.
fn check_ptr<T>(op: &'static str, arg: &'static str, ptr: CUdeviceptr, len: usize) -> Result<()> {
    let align = std::mem::align_of::<T>().max(std::mem::size_of::<T>()) as u64;
    if len > 0 && ptr == 0 {
        return Err(Error::shape(op, arg, "a device pointer", "null"));
    }
    if !ptr.is_multiple_of(align) {
        return Err(Error::shape(
            op,
            arg,
            format!("a pointer aligned to {align} bytes (the element size)"),
            format!("0x{ptr:x}"),
        ));
    }
    Ok(())
}

/// Refuses `ptr` unless the driver places it in `dev`'s context, with `bytes` bytes of its
/// allocation from `ptr` on.
fn check_context(
    op: &'static str,
    arg: &'static str,
    dev: &Device,
    ptr: CUdeviceptr,
    bytes: usize,
) -> Result<()> {
    let attr = |a: sys::CUpointer_attribute, out: *mut std::ffi::c_void| {
        // SAFETY: `out` points at storage of the attribute's type (cuda.h); the driver checks
        // `ptr` itself.
        unsafe { sys::cuPointerGetAttribute(out, a, ptr) }
    };
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    let rc = attr(
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
        (&mut ctx as *mut sys::CUcontext).cast(),
    );
    if rc != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::shape(
            op,
            arg,
            "device memory the driver knows",
            format!("0x{ptr:x} ({rc:?})"),
        ));
    }
    if ctx != dev.context().cu_ctx() {
        return Err(Error::shape(
            op,
            arg,
            format!("memory of device {}'s context", dev.info().ordinal),
            format!("0x{ptr:x}, memory of another context"),
        ));
    }
    // The allocation around ptr must hold the elements claimed.
    let (mut start, mut size): (CUdeviceptr, usize) = (0, 0);
    let known = attr(
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        (&mut start as *mut CUdeviceptr).cast(),
    ) == sys::CUresult::CUDA_SUCCESS
        && attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            (&mut size as *mut usize).cast(),
        ) == sys::CUresult::CUDA_SUCCESS;
    let end = start.saturating_add(size as u64);
    if known && ptr.saturating_add(bytes as u64) > end {
        return Err(Error::shape(
            op,
            arg,
            format!("{bytes} bytes of device memory from 0x{ptr:x}"),
            format!(
                "an allocation ending {} bytes after it",
                end.saturating_sub(ptr)
            ),
        ));
    }
    Ok(())
}

/// The checks of a raw pointer `ptr` of `len` elements: not null, aligned, and `len` elements
/// of an allocation of `dev`'s context.
fn check_raw<T>(op: &'static str, dev: &Device, ptr: CUdeviceptr, len: usize) -> Result<()> {
    check_ptr::<T>(op, "ptr", ptr, len)?;
    if len > 0 {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        check_context(op, "ptr", dev, ptr, bytes)?;
    }
    Ok(())
}

/// The address of a cudarc view, refusing one of another context than `dev`'s.
fn view_ptr<T, V: DevicePtr<T>>(
    op: &'static str,
    arg: &'static str,
    dev: &Device,
    v: &V,
) -> Result<CUdeviceptr> {
    if v.stream().context() != dev.context() {
        return Err(Error::shape(
            op,
            arg,
            format!("a view of device {}'s context", dev.info().ordinal),
            format!("a view of device {}'s", v.stream().context().ordinal()),
        ));
    }
    Ok(v.device_ptr(v.stream()).0)
}

impl<'a, T: Elem> TensorView<'a, T> {
    /// A tensor of `shape` over a cudarc view of `dev`'s context (a candle tensor's storage, for
    /// one): the view must hold at least `shape`'s elements.
    pub fn from_cuda(dev: &Device, v: &'a CudaView<'a, T>, shape: &[usize]) -> Result<Self> {
        const OP: &str = "TensorView::from_cuda";
        let ptr = view_ptr(OP, "view", dev, v)?;
        // SAFETY: the view holds v.len() elements of this context, borrowed for 'a.
        let t = unsafe { borrowed(OP, "view", dev, ptr, v.len(), shape)? };
        Ok(Self::wrap(t))
    }

    /// A tensor of `shape` over `len` elements at the raw device address `ptr`.
    ///
    /// # Safety
    /// - `ptr` must address `len` elements of `T`, allocated in `dev`'s context, that stay
    ///   allocated for `'a`;
    /// - nothing may write them while the view is read (the stream orders the crate's work; the
    ///   caller orders its own).
    ///
    /// A null or misaligned `ptr`, memory of another context (asked of the driver), and a
    /// `len` shorter than `shape` are refused with an error.
    pub unsafe fn from_raw(
        dev: &Device,
        ptr: CUdeviceptr,
        len: usize,
        shape: &[usize],
    ) -> Result<Self> {
        const OP: &str = "TensorView::from_raw";
        check_raw::<T>(OP, dev, ptr, len)?;
        // SAFETY: the caller's contract.
        let t = unsafe { borrowed(OP, "ptr", dev, ptr, len, shape)? };
        Ok(Self::wrap(t))
    }

    fn wrap(t: Tensor<T>) -> Self {
        TensorView {
            t: ManuallyDrop::new(t),
            _borrow: PhantomData,
        }
    }
}

impl<'a, T: Elem> TensorViewMut<'a, T> {
    /// A writable tensor of `shape` over a cudarc view of `dev`'s context.
    pub fn from_cuda(dev: &Device, v: &'a mut CudaViewMut<'a, T>, shape: &[usize]) -> Result<Self> {
        const OP: &str = "TensorViewMut::from_cuda";
        let ptr = view_ptr(OP, "view", dev, &*v)?;
        // SAFETY: the view holds v.len() elements of this context, borrowed mutably for 'a.
        let t = unsafe { borrowed(OP, "view", dev, ptr, v.len(), shape)? };
        Ok(Self::wrap(t))
    }

    /// A writable tensor of `shape` over `len` elements at the raw device address `ptr`.
    ///
    /// # Safety
    /// - `ptr` must address `len` elements of `T`, allocated in `dev`'s context, that stay
    ///   allocated for `'a`;
    /// - nothing else may read or write them while the crate's work on them is pending, unless
    ///   ordered after it on the stream.
    ///
    /// A null or misaligned `ptr`, memory of another context and a `len` shorter than `shape`
    /// are refused with an error.
    pub unsafe fn from_raw(
        dev: &Device,
        ptr: CUdeviceptr,
        len: usize,
        shape: &[usize],
    ) -> Result<Self> {
        const OP: &str = "TensorViewMut::from_raw";
        check_raw::<T>(OP, dev, ptr, len)?;
        // SAFETY: the caller's contract.
        let t = unsafe { borrowed(OP, "ptr", dev, ptr, len, shape)? };
        Ok(Self::wrap(t))
    }

    fn wrap(t: Tensor<T>) -> Self {
        TensorViewMut {
            t: ManuallyDrop::new(t),
            _borrow: PhantomData,
        }
    }
}

impl<T: Elem> Tensor<T> {
    /// This tensor's elements as a view: what a borrowed tensor is, so code written for views
    /// takes owned tensors too.
    pub fn view(&self) -> TensorView<'_, T> {
        TensorView::wrap(self.alias())
    }

    /// The same, writable, for as long as the tensor is borrowed mutably.
    pub fn view_mut(&mut self) -> TensorViewMut<'_, T> {
        TensorViewMut::wrap(self.alias())
    }

    /// A second tensor over this one's memory and shape, which its holder must leak.
    fn alias(&self) -> Tensor<T> {
        let stream = self.buf().stream().clone();
        let ptr = self.buf().device_ptr(&stream).0;
        // SAFETY: the buffer holds capacity() elements; the views that hold the alias borrow
        // this tensor for their life and leak the alias instead of freeing it.
        let buf = unsafe { stream.upgrade_device_ptr::<T>(ptr, self.capacity()) };
        Tensor::from_parts_over(buf, self.shape().to_vec(), self.numel())
    }
}

macro_rules! borrowed_tensor {
    ($view:ident) => {
        impl<T: Elem> Deref for $view<'_, T> {
            type Target = Tensor<T>;
            fn deref(&self) -> &Tensor<T> {
                &self.t
            }
        }

        impl<T: Elem> Drop for $view<'_, T> {
            fn drop(&mut self) {
                // SAFETY: taken once, here; the slice is leaked so the borrowed memory is never
                // freed.
                let t = unsafe { ManuallyDrop::take(&mut self.t) };
                t.into_buf().leak();
            }
        }

        impl<T: Elem> std::fmt::Debug for $view<'_, T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($view))
                    .field("shape", &self.t.shape())
                    .finish()
            }
        }
    };
}
borrowed_tensor!(TensorView);
borrowed_tensor!(TensorViewMut);

impl<T: Elem> DerefMut for TensorViewMut<'_, T> {
    fn deref_mut(&mut self) -> &mut Tensor<T> {
        &mut self.t
    }
}
