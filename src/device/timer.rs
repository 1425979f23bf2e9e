//! Timing on the stream with CUDA events, as the benches and the CLI measure.

use std::time::Duration;

use cudarc::driver::{CudaEvent, sys::CUevent_flags};

use super::Device;
use crate::error::{DriverResultExt, Result};

/// A pair of timing events on a device's stream.
pub struct GpuTimer {
    start: CudaEvent,
    end: CudaEvent,
}

impl Device {
    pub fn timer(&self) -> Result<GpuTimer> {
        let ev = || {
            self.context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        };
        Ok(GpuTimer {
            start: ev().op("Device::timer")?,
            end: ev().op("Device::timer")?,
        })
    }
}

impl GpuTimer {
    /// The device time of the work `enqueue` puts on `dev`'s stream, measured between two events
    /// around it. Waits for the end event.
    pub fn time(&self, dev: &Device, enqueue: impl FnOnce() -> Result<()>) -> Result<Duration> {
        const OP: &str = "GpuTimer::time";
        self.start.record(dev.stream()).op(OP)?;
        enqueue()?;
        self.end.record(dev.stream()).op(OP)?;
        let ms = self.start.elapsed_ms(&self.end).op(OP)?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }
}
