//! CPU ring all-reduce throughput on loopback, beside plain loopback TCP: MB/s for 1, 16 and
//! 100 MB buffers on 2 and 4 local ranks (threads in one process, each with its own sockets).
//!
//! `cargo bench -p simmim-worker --bench allreduce`
//!
//! "algorithm MB/s" is buffer size / time; "bus MB/s" is what each link carried
//! (`2 (n-1)/n` of the buffer) / time, comparable with the plain TCP line.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use simmim_worker::collective::{Collective, Ring, RingListener};

fn main() {
    let repeats = 3;
    println!("| what | ranks | MB | median ms | algorithm MB/s | bus MB/s |");
    println!("|---|---|---|---|---|---|");
    for mb in [1usize, 16, 100] {
        let ms = tcp_copy(mb);
        println!(
            "| plain loopback TCP, one stream | 2 | {mb} | {ms:.1} | {:.0} | {:.0} |",
            mb as f64 / ms * 1e3,
            mb as f64 / ms * 1e3
        );
    }
    for world in [2usize, 4] {
        for mb in [1usize, 16, 100] {
            let times = ring_times(world, mb, repeats);
            let ms = times[times.len() / 2];
            let algorithm = mb as f64 / ms * 1e3;
            let bus = algorithm * 2.0 * (world - 1) as f64 / world as f64;
            println!("| ring all-reduce | {world} | {mb} | {ms:.1} | {algorithm:.0} | {bus:.0} |");
        }
    }
}

fn ring_times(world: usize, mb: usize, repeats: usize) -> Vec<f64> {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1", 0, "127.0.0.1").expect("bind"))
        .collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.address().to_string()).collect();
    let len = mb * 1024 * 1024 / 4;
    let per_rank: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                scope.spawn(move || {
                    let mut ring = Ring::establish(
                        listener,
                        rank,
                        &peers,
                        b"bench",
                        0,
                        Duration::from_secs(30),
                    )
                    .expect("ring");
                    let mut data = vec![1.0f32; len];
                    let mut times = Vec::new();
                    for _ in 0..repeats {
                        let started = Instant::now();
                        ring.all_reduce_sum(&mut data).expect("all-reduce");
                        times.push(started.elapsed().as_secs_f64() * 1e3);
                    }
                    times
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    let mut times: Vec<f64> = (0..repeats)
        .map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// Milliseconds to push `mb` MB through one loopback TCP connection.
fn tcp_copy(mb: usize) -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("addr");
    let bytes = mb * 1024 * 1024;
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buffer = vec![0u8; bytes];
        stream.read_exact(&mut buffer).expect("read");
    });
    let data = vec![7u8; bytes];
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.write_all(&data).expect("write");
    receiver.join().expect("receiver");
    started.elapsed().as_secs_f64() * 1e3
}
