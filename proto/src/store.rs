//! A run directory on any object store: `file://` (the default, for local paths too),
//! `memory://` for unit tests, and the cloud stores object_store supports. Every error names
//! the object's full URL, so a user knows which file or key is wrong.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
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
    /// The same store when it is S3: multipart uploads with ids we can record and abort.
    s3: Option<Arc<AmazonS3>>,
    prefix: Path,
    url: String,
}

/// Multipart parts: S3 needs at least 5 MiB per part except the last.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Objects at least this large are streamed as multipart uploads.
const MULTIPART_THRESHOLD: usize = 32 * 1024 * 1024;
/// Parts in flight at once per upload.
const PARTS_IN_FLIGHT: usize = 8;

/// Settings for S3-compatible stores, read from the environment: the standard `AWS_*`
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, ...) and
/// `SIMMIM_STORE_TIMEOUT_S` (per request, default 30) and `SIMMIM_STORE_RETRY_S` (how long
/// one operation keeps retrying with backoff, default 120). Nothing here is ever logged.
fn s3_from_env(url: &str) -> Result<AmazonS3, StoreError> {
    let seconds = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(default)
    };
    let timeout = std::time::Duration::from_secs_f64(seconds("SIMMIM_STORE_TIMEOUT_S", 30.0));
    let retry = RetryConfig {
        retry_timeout: std::time::Duration::from_secs_f64(seconds("SIMMIM_STORE_RETRY_S", 120.0)),
        max_retries: 10,
        ..Default::default()
    };
    // Set single client options (not a whole ClientOptions) so what from_env read stays.
    let mut builder = AmazonS3Builder::from_env()
        .with_url(url)
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            format!("{}ms", timeout.as_millis()),
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            format!(
                "{}ms",
                timeout.min(std::time::Duration::from_secs(10)).as_millis()
            ),
        )
        .with_retry(retry);
    // object_store reads most AWS_* names itself, but not this one.
    if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
        builder = builder.with_allow_http(true);
    }
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    builder
        .build()
        .map_err(|e| StoreError::BadLocation(url.into(), e.to_string()))
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
        if parsed.scheme() == "s3" || parsed.scheme() == "s3a" {
            let s3 = Arc::new(s3_from_env(url)?);
            let prefix = Path::parse(parsed.path().trim_matches('/'))
                .map_err(|e| StoreError::BadLocation(url.into(), e.to_string()))?;
            return Ok(Self {
                store: s3.clone(),
                s3: Some(s3),
                prefix,
                url: url.trim_end_matches('/').to_string(),
            });
        }
        let (store, prefix) = object_store::parse_url(&parsed)
            .map_err(|e| StoreError::BadLocation(url.into(), e.to_string()))?;
        Ok(Self {
            store: Arc::from(store),
            s3: None,
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
        let Some((key, _)) = self.latest_pointer().await? else {
            return Ok(None);
        };
        let manifest = self.read_manifest(&key).await?;
        Ok(Some((key, manifest)))
    }

    /// What `latest` says, and the version it was read at (for a conditional update).
    pub async fn latest_pointer(&self) -> Result<Option<(String, UpdateVersion)>, StoreError> {
        match self.store.get(&self.path(LATEST_FILE)).await {
            Ok(result) => {
                let version = UpdateVersion {
                    e_tag: result.meta.e_tag.clone(),
                    version: result.meta.version.clone(),
                };
                let bytes = result.bytes().await.map_err(self.io(LATEST_FILE))?;
                Ok(Some((
                    String::from_utf8_lossy(&bytes).trim().to_string(),
                    version,
                )))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io(LATEST_FILE)(e)),
        }
    }

    /// Points `latest` at `manifest_key`, only if `latest` is still at `seen` (or absent when
    /// `seen` is `None`): a coordinator that lost track of the run cannot move it back. Local
    /// directories cannot compare versions; there the write is unconditional.
    pub async fn move_latest(
        &self,
        manifest_key: &str,
        seen: Option<UpdateVersion>,
    ) -> Result<UpdateVersion, StoreError> {
        let payload = PutPayload::from_bytes(Bytes::from(manifest_key.to_string()));
        let mode = if self.local_dir().is_some() {
            PutMode::Overwrite
        } else {
            match seen {
                Some(version) => PutMode::Update(version),
                None => PutMode::Create,
            }
        };
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(LATEST_FILE), payload, options)
            .await
        {
            Ok(result) => Ok(UpdateVersion {
                e_tag: result.e_tag,
                version: result.version,
            }),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::Invalid {
                url: self.url_of(LATEST_FILE),
                reason: "moved by another writer since this coordinator read it; \
                         refusing to overwrite (is a second coordinator running this run?)"
                    .into(),
            }),
            Err(e) => Err(self.io(LATEST_FILE)(e)),
        }
    }

    /// Writes a large object as a multipart upload, `PARTS_IN_FLIGHT` parts at a time, from
    /// memory (no local file); small ones in one request. On S3 the upload id is recorded under
    /// `uploads/` until the upload completes, so a crash leaves something to abort.
    pub async fn put_large(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        if bytes.len() < MULTIPART_THRESHOLD {
            return self.put(key, bytes).await;
        }
        let path = self.path(key);
        let Some(s3) = &self.s3 else {
            let mut upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(self.io(key))?;
            for chunk in chunks(&bytes) {
                upload
                    .put_part(PutPayload::from_bytes(chunk))
                    .await
                    .map_err(self.io(key))?;
            }
            upload.complete().await.map_err(self.io(key))?;
            return Ok(());
        };
        let id = s3.create_multipart(&path).await.map_err(self.io(key))?;
        let marker = upload_marker(key);
        let record = serde_json::json!({ "key": key, "upload_id": id }).to_string();
        self.put(&marker, Bytes::from(record)).await?;
        let uploads =
            futures::stream::iter(chunks(&bytes).into_iter().enumerate().map(|(i, chunk)| {
                let (s3, path, id) = (s3.clone(), path.clone(), id.clone());
                async move {
                    s3.put_part(&path, &id, i, PutPayload::from_bytes(chunk))
                        .await
                        .map(|p| (i, p))
                }
            }));
        let parts: Result<Vec<(usize, PartId)>, object_store::Error> =
            futures::StreamExt::buffer_unordered(uploads, PARTS_IN_FLIGHT)
                .try_collect()
                .await;
        let completed = match parts {
            Ok(mut parts) => {
                parts.sort_by_key(|(i, _)| *i);
                let parts: Vec<PartId> = parts.into_iter().map(|(_, p)| p).collect();
                s3.complete_multipart(&path, &id, parts).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = completed {
            let _ = s3.abort_multipart(&path, &id).await;
            let _ = self.delete(&marker).await;
            return Err(self.io(key)(e));
        }
        self.delete(&marker).await
    }

    /// Aborts multipart uploads a crashed writer left behind (recorded under `uploads/`).
    pub async fn abort_stale_uploads(&self) -> Result<usize, StoreError> {
        let Some(s3) = &self.s3 else {
            return Ok(0);
        };
        let mut aborted = 0;
        for marker in self.list("uploads").await? {
            let record: serde_json::Value = match self.get_opt(&marker).await? {
                Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
                None => continue,
            };
            if let (Some(key), Some(id)) = (record["key"].as_str(), record["upload_id"].as_str()) {
                match s3.abort_multipart(&self.path(key), &id.to_string()).await {
                    Ok(()) => aborted += 1,
                    Err(e) => tracing::warn!("aborting the upload of {}: {e}", self.url_of(key)),
                }
            }
            self.delete(&marker).await?;
        }
        Ok(aborted)
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io(key)(e)),
        }
    }

    /// Deletes a checkpoint: its manifest first (so it stops existing), then its objects.
    pub async fn delete_checkpoint(&self, step: u64) -> Result<(), StoreError> {
        let dir = Manifest::dir_for(step);
        self.delete(&Manifest::path_for(step)).await?;
        for key in self.list(&dir).await? {
            self.delete(&key).await?;
        }
        Ok(())
    }

    /// Reads every object of a checkpoint and checks its size and SHA-256.
    pub async fn verify_checksums(&self, manifest: &Manifest) -> Result<(), StoreError> {
        for file in &manifest.files {
            self.read_checked(manifest, &file.path).await?;
        }
        Ok(())
    }

    pub async fn read_manifest(&self, key: &str) -> Result<Manifest, StoreError> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
            url: self.url_of(key),
            reason: format!("not a checkpoint manifest: {e}"),
        })
    }

    /// Every checkpoint directory, oldest first, with whether its manifest exists (committed
    /// or at least written): one listing.
    pub async fn checkpoints(&self) -> Result<Vec<(u64, bool)>, StoreError> {
        let mut found: std::collections::BTreeMap<u64, bool> = Default::default();
        for key in self.list("checkpoints").await? {
            if let Some(step) = Manifest::step_of(&key) {
                *found.entry(step).or_default() |= key.ends_with(&format!("/{MANIFEST_FILE}"));
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Every manifest's key, newest step first.
    #[cfg(test)]
    async fn manifests(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .checkpoints()
            .await?
            .into_iter()
            .rev()
            .filter(|(_, has_manifest)| *has_manifest)
            .map(|(step, _)| Manifest::path_for(step))
            .collect())
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

fn chunks(bytes: &Bytes) -> Vec<Bytes> {
    (0..bytes.len())
        .step_by(PART_SIZE)
        .map(|start| bytes.slice(start..(start + PART_SIZE).min(bytes.len())))
        .collect()
}

fn upload_marker(key: &str) -> String {
    format!("uploads/{}.json", key.replace('/', "__"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hash of what determines a run's numbers (seed, model, data, optimisation), leaving out what
/// may change on resume (`max_steps`, thread counts, optimizer-state sharding, output cadence,
/// worker counts).
pub fn config_hash(config: &crate::RunConfig) -> String {
    let mut train = config.train.clone();
    train.max_steps = None;
    train.compute_threads = None;
    let mut train = serde_json::to_value(&train).unwrap_or_default();
    if let Some(fields) = train.as_object_mut() {
        // Added after runs were hashed without it; sharding changes no number.
        fields.remove("zero");
    }
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

    #[test]
    fn sharding_and_step_limits_leave_the_hash_alone_and_the_numbers_do_not() {
        let demo = crate::RunConfig::demo();
        let hash = config_hash(&demo);
        let mut sharded = demo.clone();
        sharded.train.zero = 1;
        sharded.train.max_steps = Some(3);
        assert_eq!(config_hash(&sharded), hash);
        let mut other = demo;
        other.train.base_lr *= 2.0;
        assert_ne!(config_hash(&other), hash);
    }

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
