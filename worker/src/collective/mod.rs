//! Gradient all-reduce (and, for sharded optimizer state, reduce-scatter and all-gather) behind
//! one trait. The train loop exchanges flat buffers and never knows which transport it has: `Solo` for a world of one, `Ring` (TCP
//! between CPU workers), or `Nccl` between GPU workers (builds with the `cuda` feature).

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
pub mod setup;

use std::time::Duration;

pub use ring::{Ring, RingListener};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("gradient transport to rank {rank} ({address}): {reason}")]
    Peer {
        rank: usize,
        address: String,
        reason: String,
    },
    #[error("gradient transport setup: {0}")]
    Setup(String),
    #[error("replicas diverged: {0}")]
    Diverged(String),
}

/// The collectives a step uses. With optimizer-state sharding (ZeRO-1) a step reduce-scatters
/// the gradients and all-gathers the updated weights instead of all-reducing the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AllReduce,
    /// Chunk `rank` of the buffer (cut into `world` equal chunks) ends with the sum over the
    /// ranks; the other chunks hold partial sums nobody should read.
    ReduceScatter,
    /// Every rank brings chunk `rank`; every rank ends with all of them.
    AllGather,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::ReduceScatter => "reduce-scatter",
            Op::AllGather => "all-gather",
        }
    }
}

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank ends with identical values.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;

    /// [`Op::ReduceScatter`] on a host buffer whose length is a multiple of the world. A full
    /// all-reduce also leaves the sum in every chunk: a transport without a cheaper schedule
    /// keeps this.
    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(data)
    }

    /// [`Op::AllGather`] on a host buffer whose length is a multiple of the world: a sum in
    /// which every other rank brings zeros is exact, so any transport can gather this way.
    fn all_gather(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let chunk = data.len() / self.world().max(1);
        let mine = self.rank() * chunk..(self.rank() + 1) * chunk;
        for (i, value) in data.iter_mut().enumerate() {
            if !mine.contains(&i) {
                *value = 0.0;
            }
        }
        self.all_reduce_sum(data)
    }

    /// `op` on a host buffer.
    fn run_on_host(&mut self, op: Op, data: &mut [f32]) -> Result<(), CollectiveError> {
        match op {
            Op::AllReduce => self.all_reduce_sum(data),
            Op::ReduceScatter => self.reduce_scatter_sum(data),
            Op::AllGather => self.all_gather(data),
        }
    }

    /// Whether this transport works on device memory ([`Self::run_on_device_f32`]); then
    /// every buffer of the step must go that way, on every rank.
    fn reduces_device_memory(&self) -> bool {
        false
    }

    /// `op` in place over `count` f32 values in this worker's GPU memory at `pointer`, for a
    /// transport that works there (NCCL); `None` for one that cannot (the caller then stages
    /// the values through the host). For the chunked ops `count` is a multiple of the world.
    ///
    /// # Safety
    /// `pointer` must address `count` f32 values on the transport's GPU that stay allocated,
    /// and that nothing else reads or writes, until this returns.
    unsafe fn run_on_device_f32(
        &mut self,
        _op: Op,
        _pointer: u64,
        _count: usize,
    ) -> Option<Result<(), CollectiveError>> {
        None
    }
}

/// A world of one: nothing to exchange.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Checks that every rank holds the same `digest` (of its weights): each rank writes its
/// digest, as four exactly representable 16-bit pieces, into its own slots of a zeroed
/// buffer, and a sum gives everyone everyone's digest.
pub fn verify_replicas(
    collective: &mut dyn Collective,
    digest: u64,
) -> Result<(), CollectiveError> {
    let world = collective.world();
    if world == 1 {
        return Ok(());
    }
    let mut slots = vec![0f32; 4 * world];
    let rank = collective.rank();
    for i in 0..4 {
        slots[4 * rank + i] = ((digest >> (16 * i)) & 0xffff) as f32;
    }
    collective.all_reduce_sum(&mut slots)?;
    let digests: Vec<u64> = (0..world)
        .map(|r| (0..4).fold(0u64, |acc, i| acc | ((slots[4 * r + i] as u64) << (16 * i))))
        .collect();
    if digests.iter().any(|&d| d != digests[0]) {
        return Err(CollectiveError::Diverged(format!(
            "weight digests per rank: {}",
            digests
                .iter()
                .map(|d| format!("{d:016x}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// Transport timeouts: a peer silent this long is treated as dead.
pub fn io_timeout(heartbeat_timeout_s: f64) -> Duration {
    Duration::from_secs_f64(heartbeat_timeout_s.max(1.0))
}
