//! Data pipeline throughput: images/s decoded and augmented (RandomResizedCrop, flip,
//! normalise, mask), per core and through the prefetching loader with every core, for the
//! photos in ../shared/datasets/photos at 192 px and for CIFAR-10 at 32 px.
//!
//! `cargo bench -p simmim-worker --bench data [-- --seconds 3]`

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cases = [
        ("photos (ImageNet-size JPEG)", PathBuf::new(), 192, 32, 4),
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
        let location = if label.starts_with("photos") {
            // The photos sit in one flat folder; give them a class folder of their own.
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
        } else {
            location
        };
        let Ok(dataset) = Dataset::open(
            location.to_str().unwrap_or_default(),
            runtime.handle().clone(),
        ) else {
            println!("| {label} | {side} | (missing: {}) | |", location.display());
            continue;
        };
        let dataset = Arc::new(dataset);
        let geometry = MaskGeometry::new(side, mask_patch, patch, 0.6).expect("geometry");
        let augment = Arc::new(Augment::new(side, geometry));
        let skipped = AtomicU64::new(0);

        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed().as_secs_f64() < seconds {
            let id = (done % dataset.len() as u64) as u32;
            load_sample(
                &dataset,
                &augment,
                0,
                done / dataset.len() as u64,
                id,
                &skipped,
            )
            .expect("sample");
            done += 1;
        }
        let single = done as f64 / started.elapsed().as_secs_f64();

        let micro_batch = 64;
        let plan = DataPlan {
            seed: 0,
            dataset_len: dataset.len().max(micro_batch),
            world_size: 1,
            micro_batch,
            accumulation: 1,
        };
        let dataset_len = dataset.len();
        let plan = if dataset_len < micro_batch {
            // Few photos: repeat them through a modulo view of the ids.
            DataPlan {
                dataset_len: micro_batch * 4,
                ..plan
            }
        } else {
            plan
        };
        let wrapped = if dataset_len < micro_batch {
            repeat(&dataset, micro_batch * 4)
        } else {
            dataset.clone()
        };
        let loader = Loader::start(
            wrapped,
            augment,
            LoaderSpec {
                plan,
                rank: 0,
                first: Default::default(),
                steps: u64::MAX,
                threads: cores,
                prefetch: 4,
            },
        )
        .expect("loader");
        let started = Instant::now();
        let mut images = 0usize;
        while started.elapsed().as_secs_f64() < seconds {
            images += loader.next().expect("batch").expect("batch").ids.len();
        }
        let parallel = images as f64 / started.elapsed().as_secs_f64();
        println!("| {label} | {side} | {single:.0} | {parallel:.0} |");
    }
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
