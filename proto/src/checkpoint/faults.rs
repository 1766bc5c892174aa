//! Fault injection for the crash-consistency tests: `SIMMIM_FAULT=<point>@<step>` makes the
//! committing process (the coordinator) exit abruptly at that point of the first commit at or after that step, as a
//! crash would.
//! Points: `exit-before-manifest` (data written, no manifest), `exit-before-latest` (manifest
//! written, `latest` not moved). Unset in normal runs.

pub fn maybe_exit(point: &str, step: u64) {
    let Ok(fault) = std::env::var("SIMMIM_FAULT") else {
        return;
    };
    let Some((at, from)) = fault.split_once('@') else {
        return;
    };
    if at == point && from.parse::<u64>().is_ok_and(|from| step >= from) {
        eprintln!("coordinator: injected fault {at} at step {step}: exiting now");
        std::process::exit(101);
    }
}
