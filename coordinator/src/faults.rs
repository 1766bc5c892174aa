//! Fault injection for the crash-consistency tests: `SIMMIM_FAULT=<point>@<step>` makes the
//! coordinator exit abruptly at that point of that checkpoint's commit, as a crash would.
//! Points: `exit-before-manifest` (data written, no manifest), `exit-before-latest` (manifest
//! written, `latest` not moved). Unset in normal runs.

pub fn maybe_exit(point: &str, step: u64) {
    let Ok(fault) = std::env::var("SIMMIM_FAULT") else {
        return;
    };
    if fault == format!("{point}@{step}") {
        eprintln!("coordinator: injected fault {fault}: exiting now");
        std::process::exit(101);
    }
}
