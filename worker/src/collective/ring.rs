//! Ring all-reduce over TCP between CPU workers: reduce-scatter then all-gather, each rank
//! sending to its successor while receiving from its predecessor, so every link carries
//! `2 (n-1)/n` of the buffer. A neighbour must prove it knows the run token (an HMAC-like
//! answer to a random challenge) and belong to this generation before it is accepted; anything
//! else on the port is dropped. The listener closes once the ring stands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Collective, CollectiveError};

const MAGIC: &[u8; 8] = b"SIMMIMR1";
const HELLO_LEN: usize = 8 + 8 + 4 + 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound transport port, opened before registering so its address can be announced.
pub struct RingListener {
    listener: TcpListener,
    address: String,
}

impl RingListener {
    /// Binds `bind_host:port` (port 0: any free one) and announces `advertise_host:port`.
    pub fn bind(bind_host: &str, port: u16, advertise_host: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind((bind_host, port))?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            listener,
            address: format!("{advertise_host}:{port}"),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

pub struct Ring {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
    next_address: String,
    prev_address: String,
}

fn proof(token: &[u8], nonce: &[u8], generation: u64, rank: u32) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(token);
    hash.update(nonce);
    hash.update(generation.to_le_bytes());
    hash.update(rank.to_le_bytes());
    hash.finalize().into()
}

impl Ring {
    /// Connects to the successor and accepts the predecessor (both within `timeout`).
    pub fn establish(
        listener: RingListener,
        rank: usize,
        peers: &[String],
        token: &[u8],
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let world = peers.len();
        if world < 2 || rank >= world {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} of {world}: a ring needs two ranks or more"
            )));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_address = peers[next_rank].clone();
        let deadline = Instant::now() + timeout;
        let (next, prev) = std::thread::scope(|scope| {
            let connector = scope.spawn(|| {
                connect(
                    &next_address,
                    next_rank,
                    rank as u32,
                    token,
                    generation,
                    deadline,
                )
            });
            let prev = accept(
                &listener.listener,
                prev_rank as u32,
                token,
                generation,
                deadline,
            );
            let next = connector.join().unwrap_or_else(|_| {
                Err(CollectiveError::Setup("connector thread panicked".into()))
            });
            (next, prev)
        });
        let (next, prev) = (next?, prev?);
        for stream in [&next, &prev] {
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(timeout));
            let _ = stream.set_write_timeout(Some(timeout));
        }
        Ok(Self {
            rank,
            world,
            next,
            prev,
            next_address,
            prev_address: peers[prev_rank].clone(),
        })
    }

    fn peer_error(&self, to_next: bool, e: std::io::Error) -> CollectiveError {
        let (rank, address) = if to_next {
            ((self.rank + 1) % self.world, self.next_address.clone())
        } else {
            (
                (self.rank + self.world - 1) % self.world,
                self.prev_address.clone(),
            )
        };
        let reason = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "timed out".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => "connection closed (peer gone)".to_string(),
            _ => e.to_string(),
        };
        CollectiveError::Peer {
            rank,
            address,
            reason,
        }
    }

    /// Sends `outgoing` to the successor while receiving `incoming.len()` floats from the
    /// predecessor.
    fn exchange(&mut self, outgoing: &[f32], incoming: &mut [f32]) -> Result<(), CollectiveError> {
        let bytes: Vec<u8> = outgoing.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut received = vec![0u8; incoming.len() * 4];
        let next = &mut self.next;
        let prev = &mut self.prev;
        let (sent, got) = std::thread::scope(|scope| {
            let sender = scope.spawn(move || next.write_all(&bytes));
            let got = prev.read_exact(&mut received);
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            (sent, got)
        });
        got.map_err(|e| self.peer_error(false, e))?;
        sent.map_err(|e| self.peer_error(true, e))?;
        for (value, chunk) in incoming.iter_mut().zip(received.chunks_exact(4)) {
            *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Ok(())
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let bounds = chunk_bounds(data.len(), self.world);
        // Rank r finishes the sum of chunk r+1 and passes it on first: the classic schedule.
        self.reduce_scatter_rounds(data, &bounds, 1)?;
        self.all_gather_rounds(data, &bounds, 1)
    }

    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let bounds = chunk_bounds(data.len(), self.world);
        self.reduce_scatter_rounds(data, &bounds, 0)
    }

    fn all_gather(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let bounds = chunk_bounds(data.len(), self.world);
        self.all_gather_rounds(data, &bounds, 0)
    }
}

/// `n + 1` chunk boundaries cutting `len` values into `n` nearly equal chunks.
fn chunk_bounds(len: usize, n: usize) -> Vec<usize> {
    (0..=n).map(|i| i * len / n).collect()
}

impl Ring {
    /// The reduce-scatter half of a ring all-reduce: after `n - 1` rounds rank `r` holds the
    /// full sum of chunk `(r + holder) % n`. Each round sends one chunk to the successor and
    /// adds the one received from the predecessor.
    fn reduce_scatter_rounds(
        &mut self,
        data: &mut [f32],
        bounds: &[usize],
        holder: usize,
    ) -> Result<(), CollectiveError> {
        let n = self.world;
        let chunk = |i: usize| bounds[i % n]..bounds[i % n + 1];
        let mut incoming = vec![0f32; data.len() / n + 1];
        let base = self.rank + holder + 2 * n;
        for round in 0..n - 1 {
            let send = chunk(base - 1 - round);
            let recv = chunk(base - 2 - round);
            let incoming = &mut incoming[..recv.len()];
            let outgoing = data[send].to_vec();
            self.exchange(&outgoing, incoming)?;
            for (d, v) in data[recv].iter_mut().zip(incoming.iter()) {
                *d += v;
            }
        }
        Ok(())
    }

    /// The all-gather half: rank `r` starts with chunk `(r + holder) % n` final and, after
    /// `n - 1` rounds of passing finished chunks on, holds them all.
    fn all_gather_rounds(
        &mut self,
        data: &mut [f32],
        bounds: &[usize],
        holder: usize,
    ) -> Result<(), CollectiveError> {
        let n = self.world;
        let chunk = |i: usize| bounds[i % n]..bounds[i % n + 1];
        let mut incoming = vec![0f32; data.len() / n + 1];
        let base = self.rank + holder + 2 * n;
        for round in 0..n - 1 {
            let send = chunk(base - round);
            let recv = chunk(base - 1 - round);
            let incoming = &mut incoming[..recv.len()];
            let outgoing = data[send].to_vec();
            self.exchange(&outgoing, incoming)?;
            data[recv].copy_from_slice(incoming);
        }
        Ok(())
    }
}

fn connect(
    address: &str,
    peer_rank: usize,
    my_rank: u32,
    token: &[u8],
    generation: u64,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let fail = |reason: String| CollectiveError::Peer {
        rank: peer_rank,
        address: address.to_string(),
        reason,
    };
    loop {
        let attempt = (|| -> std::io::Result<TcpStream> {
            let target: SocketAddr = address
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let mut stream = TcpStream::connect_timeout(&target, HANDSHAKE_TIMEOUT)?;
            stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
            let mut nonce = [0u8; 32];
            stream.read_exact(&mut nonce)?;
            let mut hello = Vec::with_capacity(HELLO_LEN);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&generation.to_le_bytes());
            hello.extend_from_slice(&my_rank.to_le_bytes());
            hello.extend_from_slice(&proof(token, &nonce, generation, my_rank));
            stream.write_all(&hello)?;
            let mut ok = [0u8; 1];
            stream.read_exact(&mut ok)?;
            if ok[0] != 1 {
                return Err(std::io::Error::other("the peer refused the handshake"));
            }
            Ok(stream)
        })();
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connecting to rank {peer_rank} at {address}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(fail(format!("cannot connect: {e}"))),
        }
    }
}

/// Accepts connections until the expected predecessor authenticates; every other connection
/// (wrong token, wrong generation or rank, garbage) is logged and dropped.
fn accept(
    listener: &TcpListener,
    expected_rank: u32,
    token: &[u8],
    generation: u64,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Setup(e.to_string()))?;
    loop {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let _ = stream.set_nonblocking(false);
                match check_hello(&mut stream, expected_rank, token, generation) {
                    Ok(()) => return Ok(stream),
                    Err(reason) => {
                        tracing::warn!("refused a transport connection from {from}: {reason}")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(CollectiveError::Setup(format!(
                        "rank {expected_rank} did not connect in time"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(CollectiveError::Setup(format!("accepting: {e}"))),
        }
    }
}

fn check_hello(
    stream: &mut TcpStream,
    expected_rank: u32,
    token: &[u8],
    generation: u64,
) -> Result<(), String> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    stream.write_all(&nonce).map_err(|e| e.to_string())?;
    let mut hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("incomplete handshake: {e}"))?;
    if &hello[..8] != MAGIC {
        return Err("not a simmim-rs transport handshake".into());
    }
    let their_generation = u64::from_le_bytes(hello[8..16].try_into().unwrap_or_default());
    let their_rank = u32::from_le_bytes(hello[16..20].try_into().unwrap_or_default());
    let expected = proof(token, &nonce, their_generation, their_rank);
    if !simmim_proto::auth::same_token(&hello[20..], &expected) {
        return Err("wrong run token".into());
    }
    if their_generation != generation || their_rank != expected_rank {
        return Err(format!(
            "generation {their_generation} rank {their_rank}, expected generation {generation} rank {expected_rank}"
        ));
    }
    stream.write_all(&[1]).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(n: usize, token: &'static [u8]) -> (Vec<RingListener>, Vec<String>) {
        let listeners: Vec<RingListener> = (0..n)
            .map(|_| RingListener::bind("127.0.0.1", 0, "127.0.0.1").expect("bind"))
            .collect();
        let peers = listeners.iter().map(|l| l.address().to_string()).collect();
        let _ = token;
        (listeners, peers)
    }

    /// `body` on every rank of a ring of `n` on loopback, each rank on its own thread; what
    /// each returned, in rank order.
    fn on_ring<T: Send>(n: usize, body: impl Fn(usize, &mut Ring) -> T + Sync) -> Vec<T> {
        let (listeners, peers) = ring_of(n, b"t");
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (peers, body) = (peers.clone(), &body);
                    scope.spawn(move || {
                        let timeout = Duration::from_secs(10);
                        let mut ring = Ring::establish(listener, rank, &peers, b"t", 3, timeout)
                            .expect("ring");
                        body(rank, &mut ring)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        })
    }

    #[test]
    fn sums_match_and_every_rank_gets_the_same_values() {
        for n in [2usize, 3, 4] {
            let len = 1001;
            let results = on_ring(n, |rank, ring| {
                let mut data: Vec<f32> = (0..len).map(|i| (i * (rank + 1)) as f32 * 0.5).collect();
                ring.all_reduce_sum(&mut data).expect("all-reduce");
                data
            });
            let factor: f32 = (1..=n).map(|r| r as f32).sum();
            for data in &results {
                assert_eq!(data, &results[0], "identical on every rank");
                for (i, v) in data.iter().enumerate() {
                    assert!(
                        (v - i as f32 * 0.5 * factor).abs() <= 1e-3 * v.abs().max(1.0),
                        "n={n} i={i}: {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_leaves_each_rank_its_own_chunk_and_all_gather_shares_them() {
        for n in [2usize, 3, 4] {
            let len = 12 * 7;
            let results = on_ring(n, |rank, ring| {
                let mut data: Vec<f32> = (0..len).map(|i| (i * (rank + 1)) as f32).collect();
                ring.reduce_scatter_sum(&mut data).expect("reduce-scatter");
                let scattered = data.clone();
                let mine = chunk_bounds(len, n);
                let mut gathered = vec![-1f32; len];
                let own = mine[rank]..mine[rank + 1];
                for (i, value) in gathered.iter_mut().enumerate() {
                    if own.contains(&i) {
                        *value = (1000 * rank + i) as f32;
                    }
                }
                ring.all_gather(&mut gathered).expect("all-gather");
                (scattered, gathered)
            });
            let factor: f32 = (1..=n).map(|r| r as f32).sum();
            let bounds = chunk_bounds(len, n);
            let owner = |i: usize| (0..n).find(|&r| i < bounds[r + 1]).unwrap_or(n);
            let everyones: Vec<f32> = (0..len).map(|i| (1000 * owner(i) + i) as f32).collect();
            for (rank, (scattered, gathered)) in results.iter().enumerate() {
                let own = bounds[rank]..bounds[rank + 1];
                let sums: Vec<f32> = own.clone().map(|i| i as f32 * factor).collect();
                assert_eq!(scattered[own], sums[..], "n={n} rank {rank}");
                assert_eq!(gathered, &everyones, "n={n} rank {rank}");
            }
        }
    }

    #[test]
    fn intruders_are_refused_and_the_ring_still_forms() {
        let (listeners, peers) = ring_of(2, b"secret");
        // Garbage and a wrong token arrive at rank 0's port before rank 1 does.
        let target = peers[0].clone();
        let mut garbage = TcpStream::connect(&target).expect("connect");
        let _ = garbage.write_all(&[0xde; 100]);
        let wrong = std::thread::spawn(move || connect(&target, 0, 1, b"wrong", 0, Instant::now()));
        let results: Vec<f32> = std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let peers = peers.clone();
                    scope.spawn(move || {
                        std::thread::sleep(Duration::from_millis(if rank == 1 { 300 } else { 0 }));
                        let mut ring = Ring::establish(
                            listener,
                            rank,
                            &peers,
                            b"secret",
                            0,
                            Duration::from_secs(20),
                        )
                        .expect("ring");
                        let mut data = vec![rank as f32 + 1.0; 8];
                        ring.all_reduce_sum(&mut data).expect("all-reduce");
                        data[0]
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        assert_eq!(results, vec![3.0, 3.0]);
        assert!(
            wrong.join().expect("thread").is_err(),
            "a wrong token is refused"
        );
    }

    #[test]
    fn a_dead_peer_is_an_error_naming_it() {
        let (listeners, peers) = ring_of(2, b"t");
        let mut it = listeners.into_iter();
        let (l0, l1) = (it.next().expect("l0"), it.next().expect("l1"));
        let peers1 = peers.clone();
        let other = std::thread::spawn(move || {
            let ring =
                Ring::establish(l1, 1, &peers1, b"t", 0, Duration::from_secs(10)).expect("ring");
            drop(ring); // the peer dies
        });
        let mut ring =
            Ring::establish(l0, 0, &peers, b"t", 0, Duration::from_secs(10)).expect("ring");
        other.join().expect("peer");
        let err = ring.all_reduce_sum(&mut [1.0; 64]).expect_err("peer gone");
        assert!(err.to_string().contains("rank 1"), "{err}");
    }
}
