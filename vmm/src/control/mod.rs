//! Driving running VMs from outside: every VM with published profiler regions has a control
//! socket `vm-<pid>-<n>.ctl` next to them in the run directory. [`protocol`] owns the messages
//! (newline-delimited JSON, documented in `vmm/CONTROL.md`), [`server`] the socket served from
//! the session's event loop, [`client`] the `vmm ctl` side. The session carries the requests out
//! (pause, resume, stop, status, snapshot).
pub mod client;
pub mod protocol;
pub mod server;
