//! User-space tools for the Linux guest's initramfs, built as static binaries
//! (`build-static.sh`):
//!
//! - `work` — MP3's page-fault workload ([`work`], [`workmem`], [`rusage`]);
//! - `register` — `R`/`U`/list through `/proc/mirrorball/status` ([`register`], [`procfs`]);
//! - `monitor` — reads the driver's shared region through `/dev/mirrorball` ([`device`]),
//!   walks its sample ring counting every lost record ([`walker`]) and prints a table, CSV or
//!   MP3's format ([`sink`], [`names`], [`monitor`]).
//!
//! The binaries in `src/bin` only parse, call into these modules and turn errors into one line
//! on stderr (exit status 2 for usage errors, 1 for the rest). [`args`] and [`signal`] are shared
//! plumbing.

pub mod args;
pub mod device;
pub mod monitor;
pub mod names;
pub mod procfs;
pub mod register;
pub mod rusage;
pub mod signal;
pub mod sink;
pub mod walker;
pub mod work;
pub mod workmem;
