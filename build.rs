//! Tells the tests what this machine lets them do: tests that mount a small
//! tmpfs to fill a disk need root, and without it they are marked ignored
//! (`cfg(lbft_not_root)`), so the summary counts them instead of passing
//! them unrun.

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lbft_not_root)");
    println!("cargo::rerun-if-changed=build.rs");
    // `sudo` and a login as another user change these.
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0");
    if !root {
        println!("cargo::rustc-cfg=lbft_not_root");
    }
}
