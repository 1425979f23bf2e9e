//! Element types that live in device memory, and the float types kernels compute on.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

/// The runtime name of an element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    U32,
    U8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A type that can sit in a device buffer and cross to the host as plain bytes.
pub trait Elem:
    DeviceRepr + ValidAsZeroBits + bytemuck::Pod + Default + std::fmt::Debug + Send + Sync + 'static
{
    const DTYPE: DType;
}

/// A float storage type. Kernels compute in f32; the CPU references in f64.
pub trait Float: Elem + PartialOrd {
    /// Distance from 1.0 to the next larger value: the dtype's unit of relative error.
    const EPSILON: f64;
    fn to_f64(self) -> f64;
    /// Rounds to nearest even, as the kernels' conversions do.
    fn from_f64(v: f64) -> Self;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

macro_rules! elem {
    ($($t:ty => $d:ident),*) => { $(impl Elem for $t { const DTYPE: DType = DType::$d; })* };
}
elem!(f32 => F32, bf16 => BF16, f16 => F16, i32 => I32, u32 => U32, u8 => U8);

impl Float for f32 {
    const EPSILON: f64 = f32::EPSILON as f64;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

macro_rules! half_float {
    ($t:ty) => {
        impl Float for $t {
            const EPSILON: f64 = <$t>::EPSILON.to_f64_const();
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    };
}
half_float!(bf16);
half_float!(f16);

/// `v` rounded once to `T` (through f32, exact for every stored dtype): host weights in the
/// storage dtype made ready to upload in the compute dtype.
pub(crate) fn to_model<S: Float, T: Float>(v: &[S]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x.to_f32())).collect()
}
