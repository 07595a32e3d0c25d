//! The VMM's side of the two-level profiler: the guest and host regions published as files in
//! the run directory (`regions`), the host sampler that fills the host region (`sampler`), and
//! the memory-sharing accounting of a VM's RAM against its template (`sharing`).
pub mod attribution;
pub mod cow_charges;
pub mod ledger;
pub mod pagemap;
pub mod regions;
pub mod sampler;
pub mod sharing;
pub mod sizing;
