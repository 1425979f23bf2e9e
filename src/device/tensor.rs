//! A device buffer that carries its shape. Always contiguous and row-major.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, sys::CUdeviceptr};

use super::Device;
use crate::dtype::{DType, Elem};
use crate::error::{Error, Result};

/// The shape may cover fewer elements than the buffer holds: a workspace allocated once for a
/// maximum token count is re-shaped in place with [`Tensor::set_shape`] for each smaller batch,
/// and every op sees only the leading `numel()` elements.
pub struct Tensor<T> {
    buf: CudaSlice<T>,
    shape: Vec<usize>,
    numel: usize,
}

impl<T> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .finish()
    }
}

/// Element count of `shape`, refusing one that overflows `usize`.
pub(crate) fn numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            Error::shape(
                op,
                "shape",
                "an element count that fits in usize",
                format!("{shape:?}"),
            )
        })
}

impl<T: Elem> Tensor<T> {
    pub(crate) fn from_parts(buf: CudaSlice<T>, shape: Vec<usize>) -> Self {
        let numel = shape.iter().product::<usize>();
        debug_assert_eq!(buf.len(), numel);
        Tensor { buf, shape, numel }
    }

    /// A tensor of `shape` (`numel` elements) over the leading part of a longer buffer.
    pub(crate) fn from_parts_over(buf: CudaSlice<T>, shape: Vec<usize>, numel: usize) -> Self {
        debug_assert!(numel <= buf.len());
        Tensor { buf, shape, numel }
    }

    /// The buffer, giving up the tensor.
    pub(crate) fn into_buf(self) -> CudaSlice<T> {
        self.buf
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Elements the buffer holds: the most any shape given to [`Tensor::set_shape`] may cover.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// The underlying buffer, for callers that launch their own kernels on it. It may be longer
    /// than the shape (see [`Tensor::set_shape`]).
    pub fn buf(&self) -> &CudaSlice<T> {
        &self.buf
    }

    pub fn buf_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.buf
    }

    /// The elements the shape covers, as a cudarc view.
    pub(crate) fn cuda_view(&self) -> cudarc::driver::CudaView<'_, T> {
        self.buf.slice(..self.numel)
    }

    pub(crate) fn cuda_view_mut(&mut self) -> cudarc::driver::CudaViewMut<'_, T> {
        self.buf.slice_mut(..self.numel)
    }

    /// Gives the tensor another shape in place, over the leading elements of its buffer: any
    /// shape of at most [`Tensor::capacity`] elements. Nothing is copied or cleared, so a
    /// workspace sized once serves every smaller batch.
    pub fn set_shape(&mut self, shape: &[usize]) -> Result<()> {
        let n = numel("Tensor::set_shape", shape)?;
        if n > self.capacity() {
            return Err(Error::shape(
                "Tensor::set_shape",
                "shape",
                format!(
                    "at most {} elements (the buffer's capacity)",
                    self.capacity()
                ),
                format!("{shape:?} ({n} elements)"),
            ));
        }
        self.shape = shape.to_vec();
        self.numel = n;
        Ok(())
    }

    /// The same buffer under another shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n = numel("Tensor::reshape", shape)?;
        if n != self.numel() {
            return Err(Error::shape(
                "Tensor::reshape",
                "shape",
                format!("{} elements (from {:?})", self.numel(), self.shape),
                format!("{shape:?} ({n} elements)"),
            ));
        }
        self.shape = shape.to_vec();
        self.numel = n;
        Ok(self)
    }

    /// Splits the shape into (rows, last dim) for ops over the last dimension; rank 0 is refused.
    pub(crate) fn rows_cols(&self, op: &'static str, arg: &'static str) -> Result<(usize, usize)> {
        match self.shape.split_last() {
            Some((&cols, lead)) => Ok((lead.iter().product(), cols)),
            None => Err(Error::shape(op, arg, "rank >= 1", "a rank-0 tensor")),
        }
    }

    /// The two dims of a rank-2 tensor; `names` (e.g. "[T, E]") says what they are in the error.
    pub(crate) fn dims2(
        &self,
        op: &'static str,
        arg: &'static str,
        names: &str,
    ) -> Result<(usize, usize)> {
        match *self.shape.as_slice() {
            [a, b] => Ok((a, b)),
            _ => Err(Error::shape(
                op,
                arg,
                format!("rank 2 {names}"),
                format!("{:?}", self.shape),
            )),
        }
    }

    /// Refuses a tensor that lives in another CUDA context than `dev`.
    pub(crate) fn check_device(
        &self,
        op: &'static str,
        arg: &'static str,
        dev: &Device,
    ) -> Result<()> {
        if self.buf.context() != dev.context() {
            return Err(Error::shape(
                op,
                arg,
                format!("a tensor on device {}", dev.info().ordinal),
                format!("a tensor on device {}", self.buf.context().ordinal()),
            ));
        }
        Ok(())
    }

    /// The raw address, for a kernel's parameter struct. Event tracking is off on every
    /// [`Device`], so the guard cudarc returns does nothing and can be dropped at once.
    pub(crate) fn device_ptr(&self, dev: &Device) -> CUdeviceptr {
        self.buf.device_ptr(dev.stream()).0
    }

    pub(crate) fn device_ptr_mut(&mut self, dev: &Device) -> CUdeviceptr {
        self.buf.device_ptr_mut(dev.stream()).0
    }
}
