//! Forming a generation's transport: the TCP ring between the ranks the coordinator listed,
//! then NCCL over it for GPU workers (unless `SIMMIM_COLLECTIVE=ring`).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::{io_timeout, Collective, Ring, RingListener, Solo};
use crate::device::Device;

/// Where this worker's transport listens and what address it announces: the coordinator's
/// loopback means a local run; otherwise `SIMMIM_ADVERTISE_HOST` (a pod IP or DNS name) or the
/// host name. `SIMMIM_TRANSPORT_PORT` pins the port (default: any free one).
pub fn listener(coordinator_url: &str) -> Result<RingListener> {
    let local = coordinator_url.contains("127.0.0.1") || coordinator_url.contains("localhost");
    let port = match std::env::var("SIMMIM_TRANSPORT_PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| anyhow!("SIMMIM_TRANSPORT_PORT=`{p}` is not a port number"))?,
        Err(_) => 0,
    };
    let (bind, advertise) = if local {
        ("127.0.0.1".to_string(), "127.0.0.1".to_string())
    } else {
        let advertise =
            std::env::var("SIMMIM_ADVERTISE_HOST").unwrap_or_else(|_| crate::host::hostname());
        ("0.0.0.0".to_string(), advertise)
    };
    RingListener::bind(&bind, port, &advertise)
        .with_context(|| format!("binding the gradient transport on {bind}:{port}"))
}

/// Who takes part in a generation's transport.
pub struct Members<'a> {
    pub rank: usize,
    /// Every rank's transport address, in rank order.
    pub peers: &'a [String],
    pub token: &'a [u8],
    pub generation: u64,
    pub heartbeat_timeout_s: f64,
}

/// The transport of a generation: nothing for a world of one, else the ring (and NCCL on it
/// for GPU workers).
pub fn form(
    listener: RingListener,
    members: Members<'_>,
    device: Device,
) -> Result<Box<dyn Collective>> {
    if members.peers.len() <= 1 {
        return Ok(Box::new(Solo));
    }
    let started = Instant::now();
    let timeout = io_timeout(members.heartbeat_timeout_s);
    let ring = Ring::establish(
        listener,
        members.rank,
        members.peers,
        members.token,
        members.generation,
        timeout,
    )?;
    tracing::info!(
        rank = members.rank,
        world = members.peers.len(),
        "gradient ring formed in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    gpu_transport(Box::new(ring), device, timeout)
}

/// NCCL between GPU workers (set up over the ring, which then closes), unless
/// `SIMMIM_COLLECTIVE=ring` keeps the TCP ring; CPU workers keep the ring.
#[cfg(feature = "cuda")]
fn gpu_transport(
    mut ring: Box<dyn Collective>,
    device: Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    use super::nccl::{share_unique_id, Nccl};
    let Device::Cuda(ordinal) = device else {
        return Ok(ring);
    };
    if std::env::var("SIMMIM_COLLECTIVE").is_ok_and(|v| v == "ring") {
        tracing::info!("SIMMIM_COLLECTIVE=ring: gradients stay on the TCP ring");
        return Ok(ring);
    }
    let started = Instant::now();
    let id = share_unique_id(ring.as_mut())?;
    let nccl = Nccl::connect(ordinal, ring.rank(), ring.world(), id, timeout)?;
    tracing::info!(
        rank = ring.rank(),
        world = ring.world(),
        "NCCL communicator formed on cuda:{ordinal} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "cuda"))]
fn gpu_transport(
    ring: Box<dyn Collective>,
    _device: Device,
    _timeout: Duration,
) -> Result<Box<dyn Collective>> {
    Ok(ring)
}
