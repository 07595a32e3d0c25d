//! The `vmm` command (temporary smoke driver).
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let spec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "work 16 R 100000".into());
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t: vmm::workload::TaskSpec = spec.parse()?;
    let vm = vmm::builder::build_workload(vec![t; n], None)?;
    let running = vmm::runner::start(vm.vcpus, vm.control.clone())?;
    while !running.control().should_stop() {
        std::thread::sleep(Duration::from_millis(10));
        if running.check_timeout(Some(Duration::from_secs(30))) {
            break;
        }
    }
    let (end, reports) = running.stop(vmm::exit::VmEnd::Interrupted);
    println!("end: {end}");
    println!("{:?}", vm.monitor.progress());
    println!("{reports:?}");
    Ok(())
}
