//! The crate's side of the profiler: exact counters from the CPU emulator, a documented model
//! that turns them into time on a named card, and the floors that time is measured against.
//!
//! - [`resources`]: each kernel's registers, shared and local memory from the ptxas report of
//!   the cubins the crate embeds (sm_90, and sm_90a for the Hopper-only kernels);
//! - [`occupancy`], [`waves`]: resident blocks per SM by NVIDIA's occupancy rules;
//! - [`Card`]: H100, H200, RTX 4090, RTX 5090, each figure with its source;
//! - [`LaunchRecord`]: the emulator's per-launch counters (JSON lines), and [`Emulator`], its
//!   functions when it is the process's driver;
//! - [`model`]: a launch's modelled time and limiter; [`floor`]: the datasheet floor.
//!
//! Every time this module gives is *modelled*, never measured: docs/MODEL.md has the formulas,
//! the constants with their sources, and what the model does not see. The model is frozen; it
//! changes only with a calibration on hardware that names the card and the run.
//!
//! ```no_run
//! use moe_kernels::profile::{self, Card, Emulator};
//! # fn main() -> moe_kernels::Result<()> {
//! let dev = moe_kernels::Device::new(0)?; // under scripts/emulate
//! let emu = Emulator::find().expect("run under scripts/emulate");
//! emu.register_resources()?;
//! emu.enable(true)?;
//! // ... launch kernels on `dev` ...
//! dev.synchronize()?;
//! let h200 = Card::parse("h200")?;
//! for rec in emu.take()? {
//!     let m = profile::model(&rec, &h200)?;
//!     println!("{}: {:.1} us modelled ({})", rec.kernel, m.us, m.limiter);
//! }
//! # Ok(())
//! # }
//! ```

mod card;
mod emulator;
mod model;
mod occupancy;
mod ptxas;
mod record;

pub use card::{
    CARDS, Card, DEPENDENT_LAUNCH_GAP_S, DRAM_LATENCY_S, Datasheet, FP8_OVER_BF16, Figure, H100,
    H200, HOPPER_L2_BYTES_PER_S, LAUNCH_OVERHEAD_S, MMA_SYNC_FRACTION_ON_HOPPER,
    OUTSTANDING_LOADS_PER_WARP, RTX4090, RTX5090, Rates, SECTOR_BYTES,
    SHARED_BYTES_PER_CLOCK_PER_SM, SM89, SM90, SM120, SmLimits, Source, TF32_OVER_BF16,
    WAVEFRONT_BYTES, constants,
};
pub use emulator::Emulator;
pub use model::{Floor, Limiter, Modelled, Terms, chain_us, floor, model};
pub use occupancy::{Occupancy, OccupancyLimiter, occupancy, sm_occupancy, waves};
pub use ptxas::{
    PROFILE_ARCHS, PtxasEntry, Resources, all_resources, parse_ptxas_report, resources,
};
pub use record::{
    AsyncCounters, DramCounters, GlobalCount, GlobalCounters, LaunchRecord, RecordResources,
    SharedCount, SharedCounters, TensorCount,
};
