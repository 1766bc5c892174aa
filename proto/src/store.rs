//! A run directory on any object store: `file://` (the default, for local paths too),
//! `memory://` for unit tests, and the cloud stores object_store supports. Every error names
//! the object's full URL, so a user knows which file or key is wrong.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use url::Url;

use crate::manifest::{Manifest, LATEST_FILE, MANIFEST_FILE};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("`{0}` is neither an absolute URL nor a usable local path: {1}")]
    BadLocation(String, String),
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{url}: {reason}")]
    Invalid { url: String, reason: String },
}

/// One run's directory.
#[derive(Clone)]
pub struct RunStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

/// A local path or an object-store URL as a URL (relative paths resolve against the current
/// directory, which is created if missing so `file://` can address it).
pub fn location_url(location: &str) -> Result<Url, StoreError> {
    if let Ok(url) = Url::parse(location) {
        if url.scheme().len() > 1 {
            return Ok(url);
        }
    }
    let path = std::path::Path::new(location);
    std::fs::create_dir_all(path)
        .map_err(|e| StoreError::BadLocation(location.into(), e.to_string()))?;
    let absolute = std::fs::canonicalize(path)
        .map_err(|e| StoreError::BadLocation(location.into(), e.to_string()))?;
    Url::from_directory_path(&absolute)
        .map_err(|()| StoreError::BadLocation(location.into(), "not an absolute path".into()))
}

/// Joins a root location and a run name into the run's URL.
pub fn run_url(root: &str, run: &str) -> Result<Url, StoreError> {
    let mut url = location_url(root)?;
    let path = format!("{}/{run}/", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

impl RunStore {
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let parsed =
            Url::parse(url).map_err(|e| StoreError::BadLocation(url.into(), e.to_string()))?;
        if parsed.scheme() == "file" {
            let dir = parsed
                .to_file_path()
                .map_err(|()| StoreError::BadLocation(url.into(), "not a local path".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| StoreError::BadLocation(url.into(), e.to_string()))?;
        }
        let (store, prefix) = object_store::parse_url(&parsed)
            .map_err(|e| StoreError::BadLocation(url.into(), e.to_string()))?;
        Ok(Self {
            store: Arc::from(store),
            prefix,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The local directory behind a `file://` run, for writers that append (metrics).
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        Url::parse(&self.url).ok()?.to_file_path().ok()
    }

    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    fn path(&self, key: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    fn io(&self, key: &str) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
        let url = self.url_of(key);
        move |source| StoreError::Io { url, source }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await
            .map_err(self.io(key))?;
        Ok(())
    }

    /// Writes only if nothing is there yet; `Ok(false)` when the object already exists.
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from_bytes(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.io(key)(e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self
            .store
            .get(&self.path(key))
            .await
            .map_err(self.io(key))?;
        result.bytes().await.map_err(self.io(key))
    }

    /// `None` when the object does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.store.get(&self.path(key)).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(self.io(key))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io(key)(e)),
        }
    }

    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        self.store
            .get_range(&self.path(key), range)
            .await
            .map_err(self.io(key))
    }

    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io(key)(e)),
        }
    }

    /// Keys (relative to the run) under `dir`.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let base = self.path(dir);
        let objects: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(self.io(dir))?;
        let skip = self.prefix.parts().count();
        let mut keys: Vec<String> = objects
            .into_iter()
            .map(|meta| {
                meta.location
                    .parts()
                    .skip(skip)
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The manifest `latest` points at, if any.
    pub async fn latest_manifest(&self) -> Result<Option<(String, Manifest)>, StoreError> {
        let Some(pointer) = self.get_opt(LATEST_FILE).await? else {
            return Ok(None);
        };
        let key = String::from_utf8_lossy(&pointer).trim().to_string();
        let manifest = self.read_manifest(&key).await?;
        Ok(Some((key, manifest)))
    }

    pub async fn read_manifest(&self, key: &str) -> Result<Manifest, StoreError> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
            url: self.url_of(key),
            reason: format!("not a checkpoint manifest: {e}"),
        })
    }

    /// Every committed manifest, newest step first.
    pub async fn manifests(&self) -> Result<Vec<String>, StoreError> {
        let mut keys: Vec<String> = self
            .list("checkpoints")
            .await?
            .into_iter()
            .filter(|k| k.ends_with(&format!("/{MANIFEST_FILE}")))
            .collect();
        keys.sort();
        keys.reverse();
        Ok(keys)
    }

    /// Checks that every object the manifest names exists with its recorded size (a cheap
    /// check; readers verify checksums as they load).
    pub async fn verify_sizes(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let dir = Manifest::dir_for(manifest.step);
        for file in &manifest.files {
            let key = format!("{dir}/{}", file.path);
            match self.size(&key).await? {
                Some(size) if size == file.size => {}
                Some(size) => {
                    return Err(StoreError::Invalid {
                        url: self.url_of(&key),
                        reason: format!("{size} bytes, the manifest says {}", file.size),
                    })
                }
                None => {
                    return Err(StoreError::Invalid {
                        url: self.url_of(&key),
                        reason: "missing, though the manifest lists it".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads one object of a checkpoint and checks it against the manifest.
    pub async fn read_checked(&self, manifest: &Manifest, name: &str) -> Result<Bytes, StoreError> {
        let key = format!("{}/{name}", Manifest::dir_for(manifest.step));
        let Some(entry) = manifest.files.iter().find(|f| f.path == name) else {
            return Err(StoreError::Invalid {
                url: self.url_of(&key),
                reason: "not listed in the checkpoint's manifest".into(),
            });
        };
        let bytes = self.get(&key).await?;
        let sha = sha256_hex(&bytes);
        if bytes.len() as u64 != entry.size || sha != entry.sha256 {
            return Err(StoreError::Invalid {
                url: self.url_of(&key),
                reason: format!(
                    "corrupt: {} bytes with sha256 {sha}, the manifest says {} bytes with {}",
                    bytes.len(),
                    entry.size,
                    entry.sha256
                ),
            });
        }
        Ok(bytes)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hash of what determines a run's numbers (seed, model, data, optimisation), leaving out what
/// may change on resume (`max_steps`, thread counts, output cadence, worker counts).
pub fn config_hash(config: &crate::RunConfig) -> String {
    let mut train = config.train.clone();
    train.max_steps = None;
    train.compute_threads = None;
    let key = serde_json::json!({
        "seed": config.run.seed,
        "model": config.model_config().ok(),
        "data": [&config.data.train, &config.data.limit],
        "train": train,
    });
    sha256_hex(key.to_string().as_bytes())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestFile;

    #[tokio::test]
    async fn manifests_list_newest_first_and_checks_catch_corruption() {
        let store = RunStore::open("memory:///runs/t").expect("memory store");
        let data = Bytes::from_static(b"weights");
        let manifest = Manifest {
            format_version: 1,
            run: "t".into(),
            step: 20,
            epoch: 0,
            epoch_offset: 0,
            samples_seen: 0,
            generation: 0,
            world_size: 1,
            config_hash: "h".into(),
            created_unix_ms: 0,
            files: vec![ManifestFile {
                path: "model.safetensors".into(),
                size: data.len() as u64,
                sha256: sha256_hex(&data),
            }],
        };
        for step in [10u64, 20] {
            store
                .put(
                    &format!("{}/model.safetensors", Manifest::dir_for(step)),
                    data.clone(),
                )
                .await
                .expect("put");
            let json = serde_json::to_vec(&Manifest {
                step,
                ..manifest.clone()
            })
            .expect("json");
            assert!(store
                .put_new(&Manifest::path_for(step), json.clone().into())
                .await
                .expect("put"));
            assert!(!store
                .put_new(&Manifest::path_for(step), json.into())
                .await
                .expect("put"));
        }
        let keys = store.manifests().await.expect("list");
        assert_eq!(keys, vec![Manifest::path_for(20), Manifest::path_for(10)]);
        store.verify_sizes(&manifest).await.expect("sizes");
        assert_eq!(
            store
                .read_checked(&manifest, "model.safetensors")
                .await
                .expect("read"),
            data
        );

        let key = format!("{}/model.safetensors", Manifest::dir_for(20));
        store
            .put(&key, Bytes::from_static(b"weightz"))
            .await
            .expect("put");
        let err = store
            .read_checked(&manifest, "model.safetensors")
            .await
            .expect_err("corrupt");
        assert!(
            err.to_string().contains("corrupt") && err.to_string().contains(&key),
            "{err}"
        );
        store
            .put(&key, Bytes::from_static(b"weigh"))
            .await
            .expect("put");
        assert!(store.verify_sizes(&manifest).await.is_err());
    }

    #[test]
    fn local_paths_become_file_urls() {
        let dir = std::env::temp_dir().join("simmim-store-test");
        let url = run_url(dir.to_str().expect("utf8"), "demo").expect("url");
        assert_eq!(url.scheme(), "file");
        assert!(url.path().ends_with("/simmim-store-test/demo/"));
    }
}
