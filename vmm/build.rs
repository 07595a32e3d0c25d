//! Builds the OS-less workload guest image (`guest/workload-image`) with a nested `cargo build`
//! into this crate's OUT_DIR, so `vmm` can embed it with `include_bytes!`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("workload-target");
    for dir in ["guest/workload/src", "guest/workload-image/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for file in [
        "guest/workload-image/linker.ld",
        "guest/workload-image/build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--offline",
            "-p",
            "mirrorball-workload-image",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy, coverage, sanitizers) are not for the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the workload image");
    assert!(status.success(), "building the workload image failed");
    let image = target_dir.join("release").join("workload-image");
    let embedded = out_dir.join("workload-image.elf");
    std::fs::copy(&image, &embedded).expect("copying the workload image");
}
