//! The data pipeline on real files: the loader follows the plan (each sample once per epoch,
//! across ranks), tar shards hold exactly the ImageFolder's bytes, and augmentation depends on
//! (seed, epoch, sample) only, whichever rank or loader thread count produces it.

use std::collections::HashMap;
use std::sync::Arc;

use image::{ImageEncoder, Rgb, RgbImage};
use simmim_proto::mask::MaskGeometry;
use simmim_proto::plan::{Cursor, DataPlan};
use simmim_worker::data::augment::Augment;
use simmim_worker::data::dataset::Dataset;
use simmim_worker::data::loader::{Batch, Loader, LoaderSpec};
use simmim_worker::data::shards;

fn folder(root: &std::path::Path, classes: usize, per_class: usize) -> std::path::PathBuf {
    let dir = root.join("images");
    for c in 0..classes {
        let class_dir = dir.join(format!("c{c}"));
        std::fs::create_dir_all(&class_dir).expect("dir");
        for i in 0..per_class {
            let image = RgbImage::from_fn(20 + i as u32, 18, |x, y| {
                Rgb([x as u8 * 9, y as u8 * 9, (c * 60 + i) as u8])
            });
            let mut bytes = Vec::new();
            image::codecs::png::PngEncoder::new(&mut bytes)
                .write_image(
                    &image,
                    image.width(),
                    image.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .expect("png");
            std::fs::write(class_dir.join(format!("{i:02}.png")), bytes).expect("write");
        }
    }
    dir
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn collect(
    dataset: Arc<Dataset>,
    plan: DataPlan,
    rank: usize,
    steps: std::ops::Range<u64>,
    threads: usize,
) -> Vec<Batch> {
    let augment = Arc::new(Augment::new(
        16,
        MaskGeometry::new(16, 4, 2, 0.6).expect("geometry"),
    ));
    let first = (0..steps.start).fold(plan.settle(Cursor::default()), |c, _| plan.advance(c));
    let spec = LoaderSpec {
        plan,
        rank,
        first,
        steps: steps.end - steps.start,
        threads,
        prefetch: 2,
    };
    let loader = Loader::start(dataset, augment, spec).expect("loader");
    let mut out = Vec::new();
    while let Some(batch) = loader.next() {
        out.push(batch.expect("batch"));
    }
    out
}

#[test]
fn each_sample_once_per_epoch_across_ranks_with_identical_pixels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let location = folder(dir.path(), 3, 9);
    let dataset = Arc::new(
        Dataset::open(location.to_str().expect("utf8"), rt.handle().clone()).expect("dataset"),
    );
    assert_eq!(dataset.len(), 27);
    let plan = DataPlan {
        seed: 5,
        dataset_len: 27,
        world_size: 2,
        micro_batch: 3,
        accumulation: 2,
    };
    let spe = plan.steps_per_epoch();
    assert_eq!(spe, 2);
    let mut by_id: HashMap<(u64, u32), Vec<f32>> = HashMap::new();
    for epoch in 0..2 {
        let mut seen = [0u32; 27];
        for rank in 0..2 {
            for batch in collect(
                dataset.clone(),
                plan,
                rank,
                epoch * spe..(epoch + 1) * spe,
                2,
            ) {
                assert_eq!(batch.epoch, epoch);
                assert_eq!(batch.pixels.len(), 3 * 3 * 16 * 16);
                for (k, &id) in batch.ids.iter().enumerate() {
                    seen[id as usize] += 1;
                    by_id.insert((epoch, id), batch.pixels[k * 768..(k + 1) * 768].to_vec());
                }
            }
        }
        assert!(
            seen.iter().all(|&n| n <= 1),
            "epoch {epoch}: a sample was used twice"
        );
        assert_eq!(
            seen.iter().sum::<u32>(),
            24,
            "epoch {epoch}: all 4 windows of 6 used"
        );
    }
    // The same samples through a one-rank plan with another thread count look the same.
    let single = DataPlan {
        world_size: 1,
        micro_batch: 6,
        ..plan
    };
    for batch in collect(dataset, single, 0, 0..2 * spe, 1) {
        for (k, &id) in batch.ids.iter().enumerate() {
            assert_eq!(
                by_id[&(batch.epoch, id)],
                batch.pixels[k * 768..(k + 1) * 768],
                "sample {id}"
            );
        }
    }
}

#[test]
fn shards_hold_the_folder_bytes_and_load_identically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let images = folder(dir.path(), 2, 7);
    let index = shards::pack(&images, &dir.path().join("shards"), 4).expect("pack");
    assert_eq!(index.shards.len(), 4); // 14 samples, 4 per shard
    let handle = rt.handle().clone();
    let folder_set = Dataset::open(images.to_str().expect("utf8"), handle.clone()).expect("folder");
    let index_path = dir.path().join("shards/index.json");
    let shard_set =
        Dataset::open(index_path.to_str().expect("utf8"), handle.clone()).expect("shards");
    assert_eq!(folder_set.len(), shard_set.len());
    assert_eq!(folder_set.classes(), shard_set.classes());
    for id in 0..folder_set.len() {
        let (a, b) = (
            folder_set.read(id).expect("folder"),
            shard_set.read(id).expect("shard"),
        );
        assert_eq!(a.bytes, b.bytes, "sample {id}");
        assert_eq!(a.label, b.label);
    }
    // The shards are plain tar files.
    let file = std::fs::File::open(dir.path().join("shards/shard-00000.tar")).expect("tar");
    assert_eq!(
        tar::Archive::new(file).entries().expect("entries").count(),
        4
    );
    let err = Dataset::open("/no/such/index.json", handle)
        .err()
        .expect("missing index");
    assert!(err.to_string().contains("/no/such/index.json"), "{err}");
}

/// CMYK and grayscale JPEGs (made with Pillow: a pure red CMYK image, a gray one) decode to
/// the RGB they show. Adobe-style CMYK JPEGs store inverted values; either way red must come
/// out red.
#[test]
fn cmyk_and_grayscale_jpegs_become_rgb() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let red = std::fs::read(dir.join("cmyk-red.jpg")).expect("fixture");
    let rgb = simmim_worker::data::augment::decode_rgb(&red, "cmyk-red.jpg").expect("cmyk");
    let [r, g, b] = rgb.get_pixel(5, 5).0;
    assert!(
        r > 200 && g < 60 && b < 60,
        "CMYK red decoded as ({r}, {g}, {b})"
    );
    let gray = std::fs::read(dir.join("gray.jpg")).expect("fixture");
    let rgb = simmim_worker::data::augment::decode_rgb(&gray, "gray.jpg").expect("gray");
    let [r, g, b] = rgb.get_pixel(3, 3).0;
    assert!(
        r == g && g == b && (70..=84).contains(&r),
        "gray decoded as ({r}, {g}, {b})"
    );
}
