//! The VMM's side of the two-level profiler: the guest and host regions published as files in
//! the run directory (`regions`), and the host sampler that fills the host region (`sampler`).
pub mod attribution;
pub mod ledger;
pub mod regions;
pub mod sampler;
pub mod sizing;
