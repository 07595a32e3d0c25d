//! A virtio-mmio transport's state for snapshots: its registers and every queue's
//! configuration and ring positions. Restoring checks the saved queues against the device's
//! own (count, maximum sizes, sizes, ring alignment) through `virtio_queue`'s validated
//! constructor, and loads nothing unless all of it is valid.
use virtio_queue::Queue;

use super::{VirtioBackend, VirtioMmio};
use crate::state::{QueueState, StateError, TransportState};

impl<B: VirtioBackend> VirtioMmio<B> {
    /// The transport's registers and queues.
    pub fn transport_state(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            driver_features_beyond: self.driver_features_beyond,
            shm_sel: self.shm_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queue_sel: self.queues.sel(),
            queues: self
                .queues
                .queues()
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueState {
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                    }
                })
                .collect(),
        }
    }

    /// Loads saved transport state (the backend's own state is the caller's). The backend is
    /// told the restored status.
    pub fn restore_transport(
        &mut self,
        device: &'static str,
        state: &TransportState,
    ) -> Result<(), StateError> {
        let max_sizes = self.backend.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(StateError::new(
                device,
                format!(
                    "{} queues saved, the device has {}",
                    state.queues.len(),
                    max_sizes.len()
                ),
            ));
        }
        let queues = state
            .queues
            .iter()
            .zip(&max_sizes)
            .enumerate()
            .map(|(i, (q, &max_size))| {
                let saved = virtio_queue::QueueState {
                    max_size,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                };
                Queue::try_from(saved)
                    .map_err(|e| StateError::new(device, format!("queue {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.driver_features_beyond = state.driver_features_beyond;
        self.shm_sel = state.shm_sel;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        self.queues.load(state.queue_sel, queues);
        self.backend
            .status_changed(self.status, self.driver_features);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiler_device::{ProfilerDevice, ProfilerDeviceConfig};
    use crate::trigger::EventFdTrigger;

    fn device() -> ProfilerDevice {
        ProfilerDevice::new(
            ProfilerDeviceConfig {
                shm_guest_base: 0x1000_0000,
                shm_len: 0x1000,
                vcpu_count: 1,
                default_period_ns: 50_000_000,
                host_region_id: 7,
                abi_version: (1, 3),
            },
            EventFdTrigger::new().expect("eventfd"),
        )
    }

    #[test]
    fn a_transport_round_trips_and_refuses_a_foreign_queue_layout() {
        let mut a = device();
        let mut state = a.state();
        state.transport.status = 0x0f;
        state.transport.config_generation = 3;
        state.requested_period_ns = 20_000_000;
        let mut b = device();
        b.restore(&state).expect("restore");
        assert_eq!(b.state(), state);
        assert!(b.driver_ok());
        assert_eq!(b.requested_period_ns(), Some(20_000_000));
        // The profiler device has no queues: a saved queue is someone else's device.
        let mut bad = state.clone();
        bad.transport.queues.push(QueueState::default());
        let e = a.restore(&bad).expect_err("queue count");
        assert!(e.to_string().contains("queues saved"), "{e}");
        assert_eq!(a.state().transport.status, 0, "nothing loaded");
    }
}
