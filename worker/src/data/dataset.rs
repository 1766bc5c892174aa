//! Sample ids to bytes: an ImageFolder tree on a local disk, or tar shards with an index on
//! any object store (read by byte range, so a worker fetches only the samples it trains on).

use std::path::Path;

use simmim_proto::store::RunStore;

pub use super::image_folder::ImageFolder;
use super::shards::ShardIndex;
use super::DataError;

/// One stored sample, undecoded.
pub struct RawSample {
    pub bytes: Vec<u8>,
    /// For logs and errors: the file path, or `shard:member (original path)`.
    pub name: String,
    pub label: u32,
}

pub enum Dataset {
    Folder(ImageFolder),
    /// Some samples of another dataset, renumbered `0..ids.len()`.
    Subset {
        inner: Box<Dataset>,
        ids: Vec<u32>,
    },
    Shards {
        store: RunStore,
        index: ShardIndex,
        runtime: tokio::runtime::Handle,
    },
}

impl Dataset {
    /// `location` is an ImageFolder directory, or a shard index (`.json`) as a path or URL.
    pub fn open(location: &str, runtime: tokio::runtime::Handle) -> Result<Self, DataError> {
        if location.ends_with(".json") {
            let (dir, file) = location.rsplit_once('/').unwrap_or((".", location));
            let dir_url =
                simmim_proto::store::location_url(dir).map_err(|e| DataError::Dataset {
                    location: location.into(),
                    reason: e.to_string(),
                })?;
            let store = RunStore::open(dir_url.as_str()).map_err(|e| DataError::Dataset {
                location: location.into(),
                reason: e.to_string(),
            })?;
            let bytes = runtime
                .block_on(store.get(file))
                .map_err(|e| DataError::Dataset {
                    location: location.into(),
                    reason: e.to_string(),
                })?;
            let index = ShardIndex::parse(&bytes).map_err(|reason| DataError::Dataset {
                location: location.into(),
                reason,
            })?;
            return Ok(Dataset::Shards {
                store,
                index,
                runtime,
            });
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        Ok(Dataset::Folder(ImageFolder::open(Path::new(path))?))
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Folder(f) => f.files.len(),
            Dataset::Subset { ids, .. } => ids.len(),
            Dataset::Shards { index, .. } => index.samples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn classes(&self) -> &[String] {
        match self {
            Dataset::Folder(f) => &f.classes,
            Dataset::Subset { inner, .. } => inner.classes(),
            Dataset::Shards { index, .. } => &index.classes,
        }
    }

    /// The class of sample `id`, without reading it.
    pub fn label(&self, id: usize) -> u32 {
        match self {
            Dataset::Folder(f) => f.files[id].1,
            Dataset::Subset { inner, ids } => inner.label(ids[id] as usize),
            Dataset::Shards { index, .. } => index.samples[id].label,
        }
    }

    /// `per_class` samples of each class, drawn with `seed` (few-label fine-tuning): the same
    /// images for the same seed on every rank and every run.
    pub fn labels_per_class(self, per_class: usize, seed: u64) -> Result<Self, DataError> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut by_class: Vec<Vec<u32>> = vec![Vec::new(); self.classes().len()];
        for id in 0..self.len() {
            if let Some(ids) = by_class.get_mut(self.label(id) as usize) {
                ids.push(id as u32);
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut chosen = Vec::with_capacity(per_class * by_class.len());
        for (class, mut ids) in by_class.into_iter().enumerate() {
            if ids.len() < per_class {
                return Err(DataError::Dataset {
                    location: format!("class `{}`", self.classes()[class]),
                    reason: format!(
                        "data.labels_per_class is {per_class} but it has only {} images",
                        ids.len()
                    ),
                });
            }
            ids.shuffle(&mut rng);
            chosen.extend_from_slice(&ids[..per_class]);
        }
        chosen.sort_unstable();
        Ok(Dataset::Subset {
            inner: Box::new(self),
            ids: chosen,
        })
    }

    /// At most `count` samples spread evenly over the dataset's order (every class is
    /// represented in a class-sorted ImageFolder).
    pub fn spread(self, count: usize) -> Self {
        let len = self.len();
        if count >= len {
            return self;
        }
        let ids = (0..count).map(|i| (i * len / count) as u32).collect();
        Dataset::Subset {
            inner: Box::new(self),
            ids,
        }
    }

    /// Fails, naming the differences, unless `other` has exactly this dataset's classes in
    /// the same order (labels would silently mean different things otherwise).
    pub fn check_same_classes(&self, other: &Dataset, other_name: &str) -> Result<(), DataError> {
        let (mine, theirs) = (self.classes(), other.classes());
        if mine == theirs {
            return Ok(());
        }
        let missing: Vec<&str> = mine
            .iter()
            .filter(|c| !theirs.contains(c))
            .map(String::as_str)
            .collect();
        let extra: Vec<&str> = theirs
            .iter()
            .filter(|c| !mine.contains(c))
            .map(String::as_str)
            .collect();
        Err(DataError::Dataset {
            location: other_name.to_string(),
            reason: format!(
                "its class folders differ from data.train's: missing [{}], extra [{}]{}",
                missing.join(", "),
                extra.join(", "),
                if missing.is_empty() && extra.is_empty() {
                    " (same names, different order)"
                } else {
                    ""
                }
            ),
        })
    }

    pub fn read(&self, id: usize) -> Result<RawSample, DataError> {
        match self {
            Dataset::Subset { inner, ids } => inner.read(ids[id] as usize),
            Dataset::Folder(f) => {
                let (path, label) = &f.files[id];
                let name = path.display().to_string();
                let bytes = std::fs::read(path).map_err(|e| DataError::Sample {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
                Ok(RawSample {
                    bytes,
                    name,
                    label: *label,
                })
            }
            Dataset::Shards {
                store,
                index,
                runtime,
            } => {
                let entry = &index.samples[id];
                let shard = &index.shards[entry.shard as usize];
                let name = format!("{shard}@{} ({})", entry.offset, entry.name);
                let bytes = runtime
                    .block_on(store.get_range(shard, entry.offset..entry.offset + entry.size))
                    .map_err(|e| DataError::Sample {
                        name: name.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(RawSample {
                    bytes: bytes.to_vec(),
                    name,
                    label: entry.label,
                })
            }
        }
    }
}
