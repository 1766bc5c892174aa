//! Sample ids to bytes: an ImageFolder tree on a local disk, or tar shards with an index on
//! any object store (read by byte range, so a worker fetches only the samples it trains on).

use std::path::{Path, PathBuf};

use simmim_proto::store::RunStore;

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
    Shards {
        store: RunStore,
        index: ShardIndex,
        runtime: tokio::runtime::Handle,
    },
}

pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub files: Vec<(PathBuf, u32)>,
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

impl ImageFolder {
    /// Class folders in sorted order (label = position), images in each sorted by name, as
    /// torchvision's ImageFolder orders them.
    pub fn open(root: &Path) -> Result<Self, DataError> {
        let error = |reason: String| DataError::Dataset {
            location: root.display().to_string(),
            reason,
        };
        let entries = std::fs::read_dir(root).map_err(|e| {
            error(format!(
                "cannot read the directory ({e}); for the demo dataset run scripts/setup.sh first"
            ))
        })?;
        let mut class_dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        class_dirs.sort();
        if class_dirs.is_empty() {
            return Err(error(
                "no class folders inside (expected <root>/<class>/<image>.jpg)".into(),
            ));
        }
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for (label, dir) in class_dirs.iter().enumerate() {
            let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| error(format!("cannot read {}: {e}", dir.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            images.sort();
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            files.extend(images.into_iter().map(|p| (p, label as u32)));
        }
        if files.is_empty() {
            return Err(error(
                "no .jpg/.jpeg/.png images in any class folder".into(),
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            files,
        })
    }
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
            Dataset::Shards { index, .. } => index.samples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn classes(&self) -> &[String] {
        match self {
            Dataset::Folder(f) => &f.classes,
            Dataset::Shards { index, .. } => &index.classes,
        }
    }

    pub fn read(&self, id: usize) -> Result<RawSample, DataError> {
        match self {
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
