//! The NCCL transport on one GPU (a 1-rank communicator): proves the context, stream and
//! buffer handling on real hardware and reports what the host-staged all-reduce moves.
//! Needs a GPU with NCCL: `cargo bench -p simmim-worker --features cuda --bench nccl`
//! (scripts/gpu_bench.sh stages and runs it on the GPU machine).

#[cfg(feature = "cuda")]
fn main() {
    use simmim_worker::collective::nccl::{unique_id, Nccl};
    use simmim_worker::collective::Collective;
    use std::time::{Duration, Instant};

    let id = unique_id().expect("ncclGetUniqueId");
    let mut nccl = Nccl::connect(0, 0, 1, id, Duration::from_secs(120)).expect("communicator");
    println!("| MB | all-reduce (host-staged) ms | GB/s |");
    println!("|---|---|---|");
    for mb in [1usize, 16, 100, 400] {
        let n = mb * 1024 * 1024 / 4;
        let mut data: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
        let expected = data.clone();
        nccl.all_reduce_sum(&mut data).expect("warm-up all-reduce");
        assert_eq!(data, expected, "a 1-rank sum must return the input");
        let rounds = 5;
        let started = Instant::now();
        for _ in 0..rounds {
            nccl.all_reduce_sum(&mut data).expect("all-reduce");
        }
        let seconds = started.elapsed().as_secs_f64() / rounds as f64;
        println!(
            "| {mb} | {:.2} | {:.2} |",
            seconds * 1e3,
            (n * 4) as f64 / seconds / 1e9
        );
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("the nccl bench needs the `cuda` feature");
}
