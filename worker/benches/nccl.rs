//! The NCCL transport on one GPU (a 1-rank communicator): proves the context, stream and
//! buffer handling on real hardware and reports what the all-reduce moves, host-staged and
//! in place on burn-cuda's memory (the gradient buckets' path); also checks that values
//! written through memory burn-cuda lends are what its tensor reads afterwards.
//! Needs a GPU with NCCL: `cargo bench -p simmim-worker --features cuda --bench nccl`
//! (`scripts/gpu_check.sh` stages and runs it on the GPU machine).

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
    device_buckets(&mut nccl);
}

/// The device path: a burn-cuda tensor's memory reduced in place, as the train loop's buckets.
#[cfg(feature = "cuda")]
fn device_buckets(nccl: &mut simmim_worker::collective::nccl::Nccl) {
    use burn::tensor::{Tensor, TensorData};
    use simmim_model::SimMimBackend;
    use simmim_worker::collective::{Collective, Op};
    use std::time::Instant;
    type C = burn_cuda::Cuda<f32>;

    let device = burn_cuda::CudaDevice::new(0);
    let mut run = |op: Op, bucket: &Tensor<C, 1>| {
        C::with_device_memory(bucket.clone().into_primitive().tensor(), |memory| {
            let (pointer, count) = memory.expect("burn-cuda lends its memory");
            // SAFETY: lent for this call; nothing else uses the bucket meanwhile.
            unsafe { nccl.run_on_device_f32(op, pointer, count) }
                .expect("NCCL works on device memory")
                .unwrap_or_else(|e| panic!("device {}: {e}", op.name()));
        })
    };
    // One op on a fresh bucket of `values`: on one rank it must leave the bucket as it was;
    // then the seconds it takes, over 5 rounds.
    let mut check_and_time = |op: Op, values: &[f32]| {
        let n = values.len();
        let bucket = Tensor::<C, 1>::from_data(TensorData::new(values.to_vec(), [n]), &device);
        run(op, &bucket);
        let back = bucket
            .clone()
            .into_data()
            .to_vec::<f32>()
            .expect("read back");
        assert!(
            back == values,
            "a 1-rank {} must leave the bucket as it was",
            op.name()
        );
        let rounds = 5;
        let started = Instant::now();
        for _ in 0..rounds {
            run(op, &bucket);
        }
        started.elapsed().as_secs_f64() / rounds as f64
    };
    let gb_per_s = |n: usize, seconds: f64| (n * 4) as f64 / seconds / 1e9;
    println!("| MB | all-reduce (in place on the device) ms | GB/s |");
    println!("|---|---|---|");
    for mb in [25usize, 100, 400] {
        let n = mb * 1024 * 1024 / 4;
        let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
        let seconds = check_and_time(Op::AllReduce, &values);
        println!(
            "| {mb} | {:.3} | {:.1} |",
            seconds * 1e3,
            gb_per_s(n, seconds)
        );
    }
    // ZeRO-1's two halves, in place as the sharded step runs them.
    println!("| op (in place on the device, 100 MB) | ms | GB/s |");
    println!("|---|---|---|");
    let n = 100 * 1024 * 1024 / 4;
    let values: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 0.25).collect();
    for op in [Op::ReduceScatter, Op::AllGather] {
        let seconds = check_and_time(op, &values);
        println!(
            "| {} | {:.3} | {:.1} |",
            op.name(),
            seconds * 1e3,
            gb_per_s(n, seconds)
        );
    }
    let ones = Tensor::<C, 1>::ones([4096], &device);
    C::with_device_memory(ones.clone().into_primitive().tensor(), |memory| {
        let (pointer, count) = memory.expect("burn-cuda lends its memory");
        let context = cudarc::driver::CudaContext::new(0).expect("CUDA context");
        context.bind_to_thread().expect("bind the context");
        // SAFETY: `count` f32 values at `pointer`, lent for this call.
        unsafe { cudarc::driver::result::memset_d8_sync(pointer, 0, count * 4) }.expect("memset");
    });
    let sum: f32 = ones.sum().into_scalar();
    assert_eq!(
        sum, 0.0,
        "writes through lent memory must be what the tensor reads"
    );
    println!("writes through lent device memory are visible to burn-cuda: ok");
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("the nccl bench needs the `cuda` feature");
}
