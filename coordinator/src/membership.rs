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
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Stale { sent, current } => write!(
                f,
                "generation {sent} has ended (the run is at generation {current}); rejoin to get a new rank"
            ),
            Refusal::UnknownRank(rank) => write!(f, "rank {rank} is not part of this generation"),
        }
    }
}

/// A worker asking to join, and when it last asked (its register call polls while it waits).
#[derive(Debug, Clone, PartialEq)]
pub struct Waiter {
    pub joiner: Joiner,
    pub since: Instant,
    pub last_seen: Instant,
}

/// What a worker asking to join hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It has this rank in the formed generation.
    Member { rank: u32 },
    /// It waits: for the forming generation to form, or for the next one.
    Waiting,
    /// It is a member of the running generation but registered anew (it left, e.g. across a
    /// partition): that generation must end; meanwhile it waits for the next.
    Left { generation: u64, rank: u32 },
}

#[derive(Debug)]
pub struct Membership {
    pub generation: u64,
    min: usize,
    max: usize,
    /// Workers asking to join, in arrival order; the next generation is formed from them.
    pub waiting: Vec<Waiter>,
    /// The formed generation's ranks.
    pub members: BTreeMap<u32, Member>,
    /// The generation's world size once formed.
    pub world: Option<u32>,
    first_arrival: Option<Instant>,
    last_call: Duration,
    /// A waiter that has not asked for this long has given up and is forgotten.
    patience: Duration,
    /// The running generation was asked to stop after a checkpoint so that waiting workers
    /// can join the next one.
    pub regroup: bool,
}

impl Membership {
    pub fn new(min: usize, max: usize, last_call: Duration) -> Self {
        Self::with_patience(min, max, last_call, Duration::from_secs(10))
    }

    pub fn with_patience(min: usize, max: usize, last_call: Duration, patience: Duration) -> Self {
        Self {
            generation: 0,
            min,
            max,
            waiting: Vec::new(),
            members: BTreeMap::new(),
            world: None,
            first_arrival: None,
            last_call,
            patience,
            regroup: false,
        }
    }

    /// A worker asks to join (and asks again while it waits). Nobody is refused: a worker that
    /// cannot be placed now waits for a generation that has room.
    pub fn ask(&mut self, joiner: &Joiner, now: Instant) -> Admission {
        if let Some(m) = self
            .members
            .values()
            .find(|m| m.worker_id == joiner.worker_id)
        {
            // The same registration asking again gets its rank; a new one (a fresh transport
            // address) means the worker left the generation it is still listed in, unless it
            // reported its part done (a regroup: it waits for the next generation).
            if m.transport_addr == joiner.transport_addr {
                return Admission::Member { rank: m.rank };
            }
            if m.done {
                self.wait(joiner, now);
                return Admission::Waiting;
            }
            let left = Admission::Left {
                generation: self.generation,
                rank: m.rank,
            };
            self.wait(joiner, now);
            return left;
        }
        self.wait(joiner, now);
        if self.world.is_none() {
            self.try_form(now);
            if let Some(rank) = self.rank_of(&joiner.worker_id) {
                return Admission::Member { rank };
            }
        }
        Admission::Waiting
    }

    fn wait(&mut self, joiner: &Joiner, now: Instant) {
        match self
            .waiting
            .iter_mut()
            .find(|w| w.joiner.worker_id == joiner.worker_id)
        {
            Some(w) => {
                w.joiner = joiner.clone();
                w.last_seen = now;
            }
            None => self.waiting.push(Waiter {
                joiner: joiner.clone(),
                since: now,
                last_seen: now,
            }),
        }
        if self.world.is_none() {
            self.first_arrival.get_or_insert(now);
        }
    }

    /// Waiters still asking (the others are forgotten).
    pub fn waiters(&mut self, now: Instant) -> usize {
        let patience = self.patience;
        self.waiting
            .retain(|w| now.duration_since(w.last_seen) <= patience);
        if self.waiting.is_empty() && self.world.is_none() {
            self.first_arrival = None;
        }
        self.waiting.len()
    }

    /// Forms the generation from the waiters (in arrival order, up to `max`) when `max` are
    /// present, or `min` and the last call has passed. Returns the world size once formed.
    pub fn try_form(&mut self, now: Instant) -> Option<u32> {
        if self.world.is_none() {
            let n = self.waiters(now);
            let last_call_over = self
                .first_arrival
                .is_some_and(|t| now.duration_since(t) >= self.last_call);
            if n >= self.max || (n >= self.min && n > 0 && last_call_over) {
                let admitted: Vec<Waiter> = self.waiting.drain(..n.min(self.max)).collect();
                for (rank, w) in admitted.into_iter().enumerate() {
                    let rank = rank as u32;
                    self.members.insert(
                        rank,
                        Member {
                            worker_id: w.joiner.worker_id,
                            hostname: w.joiner.hostname,
                            device: w.joiner.device,
                            pid: w.joiner.pid,
                            transport_addr: w.joiner.transport_addr,
                            rank,
                            last_heartbeat: now,
                            step: 0,
                            done: false,
                            step_seconds: 0.0,
                            data_wait_share: 0.0,
                            allreduce_seconds: 0.0,
                        },
                    );
                }
                self.world = Some(self.members.len() as u32);
            }
        }
        self.world
    }

    /// Whether the running generation should stop and regroup: workers wait and there is
    /// room for them.
    pub fn should_grow(&mut self, now: Instant) -> bool {
        let room = self.world.is_some_and(|w| (w as usize) < self.max);
        room && !self.regroup && self.waiters(now) > 0
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

    /// Ranks of the formed generation whose last heartbeat is older than `timeout`. Workers
    /// waiting for a generation to form send no heartbeats and are never silent here.
    pub fn silent(&self, now: Instant, timeout: Duration) -> Vec<u32> {
        if self.world.is_none() {
            return Vec::new();
        }
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

    /// Whether `worker_id` holds a rank in the current generation and has not reported done.
    pub fn is_active(&self, worker_id: &str) -> bool {
        self.members
            .values()
            .any(|m| m.worker_id == worker_id && !m.done)
    }

    pub fn rank_of(&self, worker_id: &str) -> Option<u32> {
        self.members
            .values()
            .find(|m| m.worker_id == worker_id)
            .map(|m| m.rank)
    }

    /// Ends the current generation: its members and the waiters form the next one.
    pub fn next_generation(&mut self, now: Instant) {
        self.generation += 1;
        self.members.clear();
        self.world = None;
        self.regroup = false;
        self.first_arrival = (!self.waiting.is_empty()).then_some(now);
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
        assert_eq!(m.ask(&joiner("a"), t0), Admission::Waiting);
        assert_eq!(m.ask(&joiner("a"), t0), Admission::Waiting, "asking again");
        assert_eq!(m.ask(&joiner("b"), t0), Admission::Waiting);
        assert_eq!(
            m.try_form(t0 + Duration::from_secs(1)),
            None,
            "waits for the last call"
        );
        let t = t0 + Duration::from_secs(9);
        m.ask(&joiner("a"), t);
        m.ask(&joiner("b"), t);
        assert_eq!(m.try_form(t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(m.ask(&joiner("a"), t), Admission::Member { rank: 0 });
        assert_eq!(m.ask(&joiner("b"), t), Admission::Member { rank: 1 });
        // A late worker waits instead of being refused, and the generation has room for it.
        assert_eq!(m.ask(&joiner("c"), t), Admission::Waiting);
        assert!(m.should_grow(t));

        let mut m = Membership::new(1, 2, Duration::from_secs(10));
        m.ask(&joiner("a"), t0);
        assert_eq!(
            m.ask(&joiner("b"), t0),
            Admission::Member { rank: 1 },
            "all of max present: no waiting"
        );
        assert_eq!(m.world, Some(2));
        assert_eq!(m.ask(&joiner("c"), t0), Admission::Waiting);
        assert!(!m.should_grow(t0), "full: the third waits for a place");
    }

    #[test]
    fn a_worker_that_stops_asking_is_forgotten_and_never_declared_dead() {
        let t0 = Instant::now();
        let mut m =
            Membership::with_patience(2, 2, Duration::from_secs(20), Duration::from_secs(5));
        m.ask(&joiner("a"), t0);
        // Waiting for the generation to form is not silence, however long the last call.
        assert!(m
            .silent(t0 + Duration::from_secs(60), Duration::from_secs(15))
            .is_empty());
        // A waiter that gave up is forgotten: the next one to arrive does not form a
        // generation with a ghost.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(m.ask(&joiner("b"), later), Admission::Waiting);
        assert_eq!(m.waiting.len(), 1);
        assert_eq!(m.ask(&joiner("c"), later), Admission::Member { rank: 1 });
        assert_eq!(m.rank_of("b"), Some(0), "ranks follow arrival order");
    }

    #[test]
    fn a_member_registering_anew_has_left_its_generation() {
        let t0 = Instant::now();
        let mut m = Membership::new(1, 2, Duration::from_secs(10));
        m.ask(&joiner("a"), t0);
        m.ask(&joiner("b"), t0);
        assert_eq!(m.world, Some(2));
        let mut back = joiner("b");
        back.transport_addr = "b:2".into();
        assert_eq!(
            m.ask(&back, t0),
            Admission::Left {
                generation: 0,
                rank: 1
            }
        );
        // It waits in the queue, ahead of the survivor that rejoins after the generation ends.
        m.next_generation(t0);
        assert_eq!(m.ask(&joiner("a"), t0), Admission::Member { rank: 1 });
        assert_eq!(m.ask(&back, t0), Admission::Member { rank: 0 });
    }

    #[test]
    fn stale_generations_are_refused_and_silence_is_noticed() {
        let t0 = Instant::now();
        let mut m = Membership::new(1, 1, Duration::ZERO);
        m.ask(&joiner("a"), t0);
        assert!(m.heartbeat(0, 0, 5, t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(
            m.silent(t0 + Duration::from_secs(5), Duration::from_secs(3)),
            vec![0]
        );
        m.next_generation(t0);
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
        m.ask(&joiner("a"), t0);
        assert_eq!(m.mark_done(1, 0), Ok(true));
    }
}
