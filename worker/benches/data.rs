//! Data pipeline throughput: images/s decoded and augmented (RandomResizedCrop, flip,
//! normalise, mask), per core and through the prefetching loader with every core, for the
//! photos in ../shared/datasets/photos at 192 px and for CIFAR-10 at 32 px.
//!
//! `cargo bench -p simmim-worker --bench data [-- --seconds 3]`; with `--folder DIR --size N
//! --threads T` one JSON line for that folder, as `scripts/bench-loader.sh` compares with
//! torchvision.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use simmim_proto::mask::MaskGeometry;
use simmim_proto::plan::DataPlan;
use simmim_worker::data::augment::Augment;
use simmim_worker::data::dataset::Dataset;
use simmim_worker::data::loader::{load_sample, Loader, LoaderSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = arg(&args, "--seconds").unwrap_or(3.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Side by side with tools/bench/torch_loader.py (scripts/bench-loader.sh): one folder,
    // one thread count, one JSON line.
    if let Some(folder) = arg::<String>(&args, "--folder") {
        let side = arg(&args, "--size").unwrap_or(192);
        let threads = arg(&args, "--threads").unwrap_or(1);
        let dataset = Arc::new(Dataset::open(&folder, runtime.handle().clone()).expect("folder"));
        let rate = loader_rate(&dataset, side, (32, 4), threads, seconds);
        println!(
            "{{\"impl\":\"simmim-rs\",\"size\":{side},\"threads\":{threads},\"images_per_s\":{rate:.1}}}"
        );
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cases = [
        (
            "photos (ImageNet-size JPEG)",
            photo_folder(&root),
            192,
            32,
            4,
        ),
        (
            "CIFAR-10 train (32 px JPEG)",
            root.join("data/cifar10/train"),
            32,
            8,
            2,
        ),
    ];
    println!("| data | output px | 1 thread img/s | loader, {cores} threads img/s |");
    println!("|---|---|---|---|");
    for (label, location, side, mask_patch, patch) in cases {
        let Ok(dataset) = Dataset::open(
            location.to_str().unwrap_or_default(),
            runtime.handle().clone(),
        ) else {
            println!("| {label} | {side} | (missing: {}) | |", location.display());
            continue;
        };
        let dataset = Arc::new(dataset);
        let single = single_rate(&dataset, side, (mask_patch, patch), seconds);
        let parallel = loader_rate(&dataset, side, (mask_patch, patch), cores, seconds);
        println!("| {label} | {side} | {single:.0} | {parallel:.0} |");
    }
}

/// The shared photos sit in one flat folder; give them a class folder of their own.
fn photo_folder(root: &std::path::Path) -> PathBuf {
    let dir = std::env::temp_dir().join("simmim-bench-photos");
    let class = dir.join("photos");
    let _ = std::fs::create_dir_all(&class);
    for entry in std::fs::read_dir(root.join("../shared/datasets/photos"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::copy(entry.path(), class.join(entry.file_name()));
    }
    dir
}

/// Samples per second decoded and augmented on this thread alone.
fn single_rate(
    dataset: &Arc<Dataset>,
    side: usize,
    (mask_patch, patch): (usize, usize),
    seconds: f64,
) -> f64 {
    let geometry = MaskGeometry::new(side, mask_patch, patch, 0.6).expect("geometry");
    let augment = Augment::new(side, geometry);
    let skipped = AtomicU64::new(0);
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let id = (done % dataset.len() as u64) as u32;
        let epoch = done / dataset.len() as u64;
        load_sample(dataset, &augment, 0, epoch, id, &skipped).expect("sample");
        done += 1;
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// Images per second through the prefetching loader with `threads` decoding threads,
/// micro-batches of 64, after two warm-up batches.
fn loader_rate(
    dataset: &Arc<Dataset>,
    side: usize,
    (mask_patch, patch): (usize, usize),
    threads: usize,
    seconds: f64,
) -> f64 {
    let geometry = MaskGeometry::new(side, mask_patch, patch, 0.6).expect("geometry");
    let augment = Arc::new(Augment::new(side, geometry));
    let micro_batch = 64;
    let len = dataset.len().max(4 * micro_batch);
    let plan = DataPlan {
        seed: 0,
        dataset_len: len,
        world_size: 1,
        micro_batch,
        accumulation: 1,
    };
    // Few files: list them again and again.
    let wrapped = if dataset.len() < len {
        repeat(dataset, len)
    } else {
        dataset.clone()
    };
    let spec = LoaderSpec {
        plan,
        rank: 0,
        first: Default::default(),
        steps: u64::MAX,
        threads,
        prefetch: 4,
    };
    let loader = Loader::start(wrapped, augment, spec).expect("loader");
    for _ in 0..2 {
        loader.next().expect("batch").expect("batch");
    }
    let started = Instant::now();
    let mut images = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        images += loader.next().expect("batch").expect("batch").ids.len();
    }
    images as f64 / started.elapsed().as_secs_f64()
}

/// A folder dataset with the few photos listed again and again.
fn repeat(dataset: &Arc<Dataset>, len: usize) -> Arc<Dataset> {
    match dataset.as_ref() {
        Dataset::Folder(folder) => {
            let mut files = Vec::with_capacity(len);
            while files.len() < len {
                files.extend(folder.files.iter().cloned());
            }
            files.truncate(len);
            Arc::new(Dataset::Folder(simmim_worker::data::dataset::ImageFolder {
                root: folder.root.clone(),
                classes: folder.classes.clone(),
                files,
            }))
        }
        Dataset::Shards { .. } | Dataset::Subset { .. } => dataset.clone(),
    }
}
