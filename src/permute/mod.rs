//! Permutation family: the routing plan, gather into expert-major rows, and the weighted
//! combine back into token order, all on the device with no host round trip.
//!
//! Terms: a *slot* is one (token, k) pair, numbered `t * K + k` (S = T·K slots). The *plan*
//! orders the slots of the GEMM experts `[0, E)` expert-major, in token order within an expert
//! (stable). Two row layouts come out of it:
//! - [`Layout::Sorted`]: GEMM row r holds slot `sorted_slots[r]`; expert e owns rows
//!   `offsets[e]..offsets[e+1]`.
//! - [`Layout::Padded`]: each expert's segment is rounded up to `block_m` rows, so every block of
//!   `block_m` rows belongs to one expert (`block_experts`) — DeepGEMM's "contiguous" layout.
//!   Padding rows have slot -1.
//! - [`Layout::Masked`]: `[E, M]` rows with per-expert counts, as decode and expert-parallel
//!   runtimes use (DeepGEMM's "masked" layout); see [`Masked`].
//!
//! For expert parallelism, [`ep_send_into`] gives the per-rank send counts and the slot order of
//! an all-to-all exchange (the exchange itself is not part of this crate yet).
//!
//! Slots with id -1 (unused top-p slots, dropped tokens) and zero-computation experts
//! (`E <= id < E_total`) are left out of the GEMM rows; the combine gives the latter their
//! meaning (a copy expert adds `w · x[t]`, a zero expert nothing). Ids outside `[-1, E_total)`
//! are counted on the device, treated as -1, and reported by [`Plan::check`], the one call that
//! waits for the host; the forward path never calls it.

mod apply;
mod ep;
mod plan;
pub mod reference;

pub use apply::{CombineInputs, combine_into, gather_into};
pub use ep::ep_send_into;
pub use plan::{Masked, Plan};

/// Which row layout a gather writes or a combine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Sorted,
    Padded,
    /// `[E, M]` rows, for plans made with [`Plan::with_masked`].
    Masked,
}

/// The largest E the plan kernels hold in shared memory.
pub const MAX_PLAN_EXPERTS: usize = 1024;
