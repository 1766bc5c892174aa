//! Who is in the run: a pure state machine over registrations, heartbeats and reports, with
//! no network in it, so it is unit-tested directly. A generation is one fixed set of ranks;
//! anything that ends it (a death, a failure) moves the run to the next generation, and
//! messages stamped with an older generation are refused.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Joiner {
    pub worker_id: String,
    pub hostname: String,
    pub device: String,
    pub pid: u32,
    pub transport_addr: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub worker_id: String,
    pub hostname: String,
    pub device: String,
    pub pid: u32,
    pub transport_addr: String,
    pub rank: u32,
    pub last_heartbeat: Instant,
    pub step: u64,
    pub done: bool,
    pub step_seconds: f64,
    pub data_wait_share: f64,
    pub allreduce_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The message belongs to a generation that has ended.
    Stale { sent: u64, current: u64 },
    /// No such rank in the current generation.
    UnknownRank(u32),
    /// The generation is complete; no room for another worker until the next one.
    Full,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Stale { sent, current } => write!(
                f,
                "generation {sent} has ended (the run is at generation {current}); rejoin to get a new rank"
            ),
            Refusal::UnknownRank(rank) => write!(f, "rank {rank} is not part of this generation"),
            Refusal::Full => write!(f, "the current generation is complete; join at the next one"),
        }
    }
}

#[derive(Debug)]
pub struct Membership {
    pub generation: u64,
    min: usize,
    max: usize,
    pub members: BTreeMap<u32, Member>,
    /// The generation's world size once formed.
    pub world: Option<u32>,
    first_arrival: Option<Instant>,
    last_call: Duration,
}

impl Membership {
    pub fn new(min: usize, max: usize, last_call: Duration) -> Self {
        Self {
            generation: 0,
            min,
            max,
            members: BTreeMap::new(),
            world: None,
            first_arrival: None,
            last_call,
        }
    }

    /// Adds a worker to the forming generation and returns its rank.
    pub fn register(&mut self, joiner: &Joiner, now: Instant) -> Result<u32, Refusal> {
        if let Some(m) = self
            .members
            .values_mut()
            .find(|m| m.worker_id == joiner.worker_id)
        {
            if self.world.is_none() {
                m.transport_addr = joiner.transport_addr.clone();
                m.pid = joiner.pid;
            }
            return Ok(m.rank);
        }
        if self.world.is_some() || self.members.len() >= self.max {
            return Err(Refusal::Full);
        }
        let rank = self.members.len() as u32;
        self.first_arrival.get_or_insert(now);
        self.members.insert(
            rank,
            Member {
                worker_id: joiner.worker_id.clone(),
                hostname: joiner.hostname.clone(),
                device: joiner.device.clone(),
                pid: joiner.pid,
                transport_addr: joiner.transport_addr.clone(),
                rank,
                last_heartbeat: now,
                step: 0,
                done: false,
                step_seconds: 0.0,
                data_wait_share: 0.0,
                allreduce_seconds: 0.0,
            },
        );
        Ok(rank)
    }

    /// Forms the generation when every allowed worker is present, or the minimum is and the
    /// last call has passed. Returns the world size once formed.
    pub fn try_form(&mut self, now: Instant) -> Option<u32> {
        if self.world.is_none() {
            let n = self.members.len();
            let last_call_over = self
                .first_arrival
                .is_some_and(|t| now.duration_since(t) >= self.last_call);
            if n >= self.max || (n >= self.min && last_call_over) {
                self.world = Some(n as u32);
            }
        }
        self.world
    }

    pub fn check(&self, generation: u64, rank: u32) -> Result<(), Refusal> {
        if generation != self.generation {
            return Err(Refusal::Stale {
                sent: generation,
                current: self.generation,
            });
        }
        if !self.members.contains_key(&rank) {
            return Err(Refusal::UnknownRank(rank));
        }
        Ok(())
    }

    pub fn heartbeat(
        &mut self,
        generation: u64,
        rank: u32,
        step: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.check(generation, rank)?;
        if let Some(m) = self.members.get_mut(&rank) {
            m.last_heartbeat = now;
            m.step = m.step.max(step);
        }
        Ok(())
    }

    /// Ranks whose last heartbeat is older than `timeout`.
    pub fn silent(&self, now: Instant, timeout: Duration) -> Vec<u32> {
        self.members
            .values()
            .filter(|m| !m.done && now.duration_since(m.last_heartbeat) > timeout)
            .map(|m| m.rank)
            .collect()
    }

    pub fn mark_done(&mut self, generation: u64, rank: u32) -> Result<bool, Refusal> {
        self.check(generation, rank)?;
        if let Some(m) = self.members.get_mut(&rank) {
            m.done = true;
        }
        Ok(self.all_done())
    }

    pub fn all_done(&self) -> bool {
        self.world.is_some() && self.members.values().all(|m| m.done)
    }

    /// Every rank's transport address, in rank order.
    pub fn peers(&self) -> Vec<String> {
        self.members
            .values()
            .map(|m| m.transport_addr.clone())
            .collect()
    }

    pub fn rank_of(&self, worker_id: &str) -> Option<u32> {
        self.members
            .values()
            .find(|m| m.worker_id == worker_id)
            .map(|m| m.rank)
    }

    /// Ends the current generation: everyone must rejoin.
    pub fn next_generation(&mut self) {
        self.generation += 1;
        self.members.clear();
        self.world = None;
        self.first_arrival = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joiner(id: &str) -> Joiner {
        Joiner {
            worker_id: id.into(),
            transport_addr: format!("{id}:1"),
            ..Default::default()
        }
    }

    #[test]
    fn forms_at_max_or_at_min_after_last_call() {
        let t0 = Instant::now();
        let mut m = Membership::new(2, 3, Duration::from_secs(10));
        assert_eq!(m.register(&joiner("a"), t0), Ok(0));
        assert_eq!(
            m.register(&joiner("a"), t0),
            Ok(0),
            "re-registering keeps the rank"
        );
        assert_eq!(m.try_form(t0), None);
        assert_eq!(m.register(&joiner("b"), t0), Ok(1));
        assert_eq!(
            m.try_form(t0 + Duration::from_secs(1)),
            None,
            "waits for the last call"
        );
        assert_eq!(m.try_form(t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(m.register(&joiner("c"), t0), Err(Refusal::Full));

        let mut m = Membership::new(1, 2, Duration::from_secs(10));
        m.register(&joiner("a"), t0).expect("a");
        m.register(&joiner("b"), t0).expect("b");
        assert_eq!(m.try_form(t0), Some(2), "all of max present: no waiting");
    }

    #[test]
    fn stale_generations_are_refused_and_silence_is_noticed() {
        let t0 = Instant::now();
        let mut m = Membership::new(1, 1, Duration::ZERO);
        m.register(&joiner("a"), t0).expect("a");
        m.try_form(t0);
        assert!(m.heartbeat(0, 0, 5, t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(
            m.silent(t0 + Duration::from_secs(5), Duration::from_secs(3)),
            vec![0]
        );
        m.next_generation();
        assert_eq!(
            m.heartbeat(0, 0, 6, t0),
            Err(Refusal::Stale {
                sent: 0,
                current: 1
            })
        );
        assert!(Refusal::Stale {
            sent: 0,
            current: 1
        }
        .to_string()
        .contains("generation 0 has ended"));
        m.register(&joiner("a"), t0).expect("rejoin");
        m.try_form(t0);
        assert_eq!(m.mark_done(1, 0), Ok(true));
    }
}
