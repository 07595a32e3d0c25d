//! What the workspace's test suites share: skipping a test on a host where `/dev/kvm` cannot be
//! opened. It lives here because every suite that needs KVM (this crate's, the VMM's unit tests
//! and the end-to-end tests) already depends on this crate.

use kvm_ioctls::Kvm;

/// Opens `/dev/kvm` for `test`; if that fails, prints why `test` is skipped and returns `None`.
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm not available ({e})");
            None
        }
    }
}

/// True when `/dev/kvm` can be opened; otherwise prints why `test` is skipped.
pub fn kvm_available(test: &str) -> bool {
    kvm_or_skip(test).is_some()
}
