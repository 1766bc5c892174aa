//! Checkpoint of swin_base (88M parameters plus AdamW moments): how long the step loop
//! stalls (taking a snapshot), how long writing the snapshot as safetensors takes on the side,
//! one plain memory copy of the same bytes for scale, the old direct path (serialising in the
//! loop), the peak extra memory while a checkpoint is written as training goes on, and the
//! background upload to a local directory and to a local S3-compatible server (moto_server
//! from .venv-tools) beside boto3 sending the same bytes (the server's own pace).
//!
//! `cargo bench -p simmim-worker --bench checkpoint`

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use bytes::Bytes;
use simmim_model::weights::snapshot::Snapshot;
use simmim_model::weights::{state_dict, to_safetensors};
use simmim_model::{
    loss_and_grads, mask_tensor, AdamW, AdamWConfig, InitModel, SimMim, SimMimConfig,
};
use simmim_proto::store::RunStore;

/// mimalloc, counting the bytes live and their peak (resident memory says little: mimalloc
/// keeps freed pages).
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let grown = new_size as u64;
        let live = LIVE.fetch_add(grown, Ordering::Relaxed) + grown;
        PEAK.fetch_max(live, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type B = Autodiff<Flex>;

/// One SimMIM step of swin_base on one image.
fn step(model: SimMim<B>, optimizer: &mut AdamW<Flex>, config: &SimMimConfig) -> SimMim<B> {
    let device = Default::default();
    let geometry = config.mask_geometry().expect("geometry");
    let mask = mask_tensor::<B>(&geometry.generate(0), 1, geometry.token_grid(), &device);
    let images = Tensor::<B, 4>::random([1, 3, 192, 192], Distribution::Normal(0.0, 1.0), &device);
    let (_, grads) = loss_and_grads(&model, images, mask, 1);
    optimizer.step(1e-4, model, grads).0
}

/// What `f` returns, and the peak of live heap bytes above the start while it ran.
fn peak_extra<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let result = f();
    (
        result,
        PEAK.load(Ordering::Relaxed).saturating_sub(baseline),
    )
}

/// Seconds of one plain copy of `bytes` bytes into a buffer whose pages are already mapped.
fn memcpy_seconds(bytes: usize) -> f64 {
    let source = vec![1u8; bytes];
    let mut target = vec![0u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        target.copy_from_slice(&source);
        best = best.min(started.elapsed().as_secs_f64());
        std::hint::black_box(&target);
    }
    best
}

/// The stall, the write on the side, the memory it takes, and the old in-loop path.
fn stall_table(config: &SimMimConfig) -> (Vec<u8>, Vec<u8>) {
    let device = Default::default();
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let mut model = step(
        config.init::<B>(0, &device).expect("model"),
        &mut optimizer,
        config,
    );

    let started = Instant::now();
    let weights =
        to_safetensors(&state_dict(&model, config).expect("weights"), config).expect("bytes");
    let moments = to_safetensors(
        &optimizer.state_dict::<B, _>(&model).expect("moments"),
        config,
    )
    .expect("bytes");
    let direct = started.elapsed().as_secs_f64();
    let total = weights.len() + moments.len();
    drop((weights, moments));

    // A plain step's own memory, then a step while another thread writes a snapshot.
    let (next, step_extra) = peak_extra(|| step(model, &mut optimizer, config));
    model = next;
    let mut stall = 0.0;
    let (((weights, moments), write), both_extra) = peak_extra(|| {
        let started = Instant::now();
        let snapshot = Snapshot::take(&model, &optimizer, config);
        stall = started.elapsed().as_secs_f64();
        let writer = std::thread::spawn(move || {
            let started = Instant::now();
            let bytes = snapshot.into_safetensors().expect("snapshot bytes");
            (bytes, started.elapsed().as_secs_f64())
        });
        model = step(model.clone(), &mut optimizer, config);
        writer.join().expect("writer")
    });
    std::hint::black_box(&model);
    let extra = both_extra.saturating_sub(step_extra);
    let memcpy = memcpy_seconds(total);
    println!(
        "checkpoint: model {:.0} MB + AdamW state {:.0} MB = {:.0} MB",
        weights.len() as f64 / 1e6,
        moments.len() as f64 / 1e6,
        total as f64 / 1e6
    );
    println!();
    println!("| what | seconds | x one memcpy |");
    println!("|---|---|---|");
    println!("| one plain memcpy of the same bytes | {memcpy:.3} | 1.00 |");
    println!(
        "| training stall: snapshot | {stall:.4} | {:.3} |",
        stall / memcpy
    );
    println!(
        "| writing the snapshot, off the step loop (training went on) | {write:.2} | {:.1} |",
        write / memcpy
    );
    println!(
        "| before: serialising in the step loop | {direct:.2} | {:.1} |",
        direct / memcpy
    );
    println!();
    println!(
        "peak extra heap of a checkpoint written while a step runs: {:.0} MB = {:.2} x the state \
         (peak over the step alone: {:.0} MB; with the checkpoint: {:.0} MB)",
        extra as f64 / 1e6,
        extra as f64 / total as f64,
        step_extra as f64 / 1e6,
        both_extra as f64 / 1e6
    );
    println!();
    (weights, moments)
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = SimMimConfig::preset("swin_base").expect("preset");
    let (weights, moments) = stall_table(&config);
    let total = (weights.len() + moments.len()) as f64 / 1e6;
    println!("| target | upload s | MB/s |");
    println!("|---|---|---|");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (weights, moments) = (Bytes::from(weights), Bytes::from(moments));
    let upload = |store: &RunStore| {
        let started = Instant::now();
        runtime.block_on(async {
            // Both objects at once, as the worker's checkpoint upload does.
            let (a, b) = futures::join!(
                store.put_large("checkpoints/0000000001/model.safetensors", weights.clone()),
                store.put_large(
                    "checkpoints/0000000001/optimizer.safetensors",
                    moments.clone()
                )
            );
            a.expect("model");
            b.expect("moments");
        });
        started.elapsed().as_secs_f64()
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let local = RunStore::open(
        url::Url::from_directory_path(dir.path())
            .expect("url")
            .as_str(),
    )
    .expect("local");
    let seconds = upload(&local);
    println!(
        "| local directory (file://) | {seconds:.2} | {:.0} |",
        total / seconds
    );

    s3_rows(&root, &upload, (&weights, &moments), dir.path());
}

/// The upload to moto_server (ours, then boto3's own pace on the same bytes).
fn s3_rows(
    root: &std::path::Path,
    upload: &dyn Fn(&RunStore) -> f64,
    (weights, moments): (&Bytes, &Bytes),
    dir: &std::path::Path,
) {
    let total = (weights.len() + moments.len()) as f64 / 1e6;
    let moto = root.join(".venv-tools/bin/moto_server");
    if !moto.exists() {
        println!(
            "| S3 (moto_server) | not run: {} missing (scripts/test.sh installs it) | |",
            moto.display()
        );
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut server = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        // SAFETY-free: set before any other thread reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let python = root.join(".venv-tools/bin/python");
    let boto = |script: &str| {
        Command::new(&python)
            .args(["-c", script])
            .output()
            .expect("python")
    };
    let wait = Instant::now();
    while wait.elapsed() < Duration::from_secs(60) {
        if boto(&format!("import boto3; boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='b', aws_secret_access_key='b').create_bucket(Bucket='bench')")).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let s3 = RunStore::open("s3://bench/run").expect("s3");
    let seconds = upload(&s3);
    println!("| S3 (moto_server on loopback), ours: multipart, 8 MB parts, 8 in flight | {seconds:.2} | {:.0} |", total / seconds);

    let file = dir.join("blob");
    std::fs::write(&file, [&weights[..], &moments[..]].concat()).expect("blob");
    let script = format!(
        "import boto3, time\nc = boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='b', aws_secret_access_key='b')\nt = time.time()\nc.upload_file('{}', 'bench', 'boto/blob')\nprint(time.time() - t)",
        file.display()
    );
    let out = boto(&script);
    let seconds: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    println!(
        "| S3 (moto_server on loopback), boto3 upload_file (its defaults) | {seconds:.2} | {:.0} |",
        total / seconds
    );
    let _ = server.kill();
    let _ = server.wait();
}
