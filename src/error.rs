//! The crate's one error type.

use cudarc::driver::DriverError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA driver library (libcuda.so) could not be loaded.
    #[error("no CUDA driver: libcuda could not be loaded on this machine")]
    NoDriver,

    /// A driver is present but no device with this ordinal exists.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// The crate was built without nvcc, so it holds no kernel images.
    #[error(
        "{op}: CUDA kernels were not built into this crate (module `{module}`). Install the \
         pinned toolchain with scripts/install-cuda-toolchain.sh (or set NVCC / CUDA_HOME) and \
         rebuild; MOE_KERNELS_BUILD=require turns a missing nvcc into a build error"
    )]
    KernelsNotBuilt {
        op: &'static str,
        module: &'static str,
    },

    /// An argument's shape, dtype, value or alignment is not what the op needs.
    #[error("{op}: argument `{arg}`: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: String,
    },

    /// The op or configuration exists in principle but not in this build or on this device.
    #[error("{op}: unsupported: {what}")]
    Unsupported { op: &'static str, what: String },

    /// A check that ran on the device found bad data (for example expert ids out of range).
    #[error("{op}: device-side check failed: {what}")]
    DeviceCheck { op: &'static str, what: String },

    /// A model folder or tensor file is missing, unreadable or not what the loader needs. `what`
    /// names the tensor, key or part of the file.
    #[error("{file}: {what}: expected {expected}, got {got}")]
    Checkpoint {
        file: String,
        what: String,
        expected: String,
        got: String,
    },

    /// An error from the CUDA driver.
    #[error("CUDA driver error in {op}: {source}")]
    Driver {
        op: &'static str,
        #[source]
        source: DriverError,
    },
}

impl Error {
    pub(crate) fn shape(
        op: &'static str,
        arg: &'static str,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            op,
            arg,
            expected: expected.into(),
            got: got.into(),
        }
    }
}

impl Error {
    pub(crate) fn checkpoint(
        file: impl std::fmt::Display,
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Checkpoint {
            file: file.to_string(),
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}

/// Attaches the op's name to a driver error: `stream.foo().op("softmax")?`.
pub(crate) trait DriverResultExt<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> DriverResultExt<T> for std::result::Result<T, DriverError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { op, source })
    }
}
