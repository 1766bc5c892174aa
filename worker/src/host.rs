//! Who this process is: the host's name (for logs and the transport's address) and the
//! worker id the coordinator keeps a place for.

/// `SIMMIM_WORKER_ID`; in a Kubernetes Indexed Job `index-<JOB_COMPLETION_INDEX>`, so a
/// replacement pod takes over its predecessor's place; else host and process id.
pub fn worker_id() -> String {
    if let Ok(id) = std::env::var("SIMMIM_WORKER_ID") {
        return id;
    }
    if let Ok(index) = std::env::var("JOB_COMPLETION_INDEX") {
        return format!("index-{index}");
    }
    format!("{}-{}", hostname(), std::process::id())
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}
