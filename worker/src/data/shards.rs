//! Tar shards: an ImageFolder packed into `.tar` files plus `index.json` giving each sample's
//! shard, byte offset and size. Plain tar, so `tar -tf` and any WebDataset-style tool can read
//! the shards; the index lets a worker fetch one sample with one ranged GET.

use std::io::{Seek, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::image_folder::ImageFolder;
use super::DataError;

pub const INDEX_FORMAT: &str = "simmim-shards/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub shard: u32,
    /// Byte offset of the member's data inside the shard.
    pub offset: u64,
    pub size: u64,
    pub label: u32,
    /// The original path relative to the ImageFolder root.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub classes: Vec<String>,
    /// Shard file names, relative to the index.
    pub shards: Vec<String>,
    pub samples: Vec<ShardEntry>,
}

impl ShardIndex {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let index: ShardIndex =
            serde_json::from_slice(bytes).map_err(|e| format!("not a shard index: {e}"))?;
        if index.format != INDEX_FORMAT {
            return Err(format!(
                "format `{}`, expected `{INDEX_FORMAT}`",
                index.format
            ));
        }
        if let Some(bad) = index
            .samples
            .iter()
            .find(|s| s.shard as usize >= index.shards.len())
        {
            return Err(format!(
                "sample {} names shard {} of {}",
                bad.name,
                bad.shard,
                index.shards.len()
            ));
        }
        Ok(index)
    }
}

/// Packs `input` (an ImageFolder) into tar shards of at most `per_shard` samples under
/// `output`, writing `index.json` last (an index exists only for complete shards).
pub fn pack(input: &Path, output: &Path, per_shard: usize) -> Result<ShardIndex, DataError> {
    let folder = ImageFolder::open(input)?;
    let fail = |reason: String| DataError::Dataset {
        location: output.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(output).map_err(|e| fail(e.to_string()))?;
    let mut index = ShardIndex {
        format: INDEX_FORMAT.into(),
        classes: folder.classes.clone(),
        shards: Vec::new(),
        samples: Vec::with_capacity(folder.files.len()),
    };
    for (shard_no, chunk) in folder.files.chunks(per_shard.max(1)).enumerate() {
        let name = format!("shard-{shard_no:05}.tar");
        let file =
            std::fs::File::create(output.join(&name)).map_err(|e| fail(format!("{name}: {e}")))?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        for (i, (path, label)) in chunk.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| DataError::Sample {
                name: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("bin");
            // Short member names keep every header one 512-byte block, so the data offset is
            // the header's position plus 512.
            let member = format!(
                "{:08}.{}",
                shard_no * per_shard + i,
                ext.to_ascii_lowercase()
            );
            let header_at = builder
                .get_mut()
                .stream_position()
                .map_err(|e| fail(e.to_string()))?;
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, &member, bytes.as_slice())
                .map_err(|e| fail(format!("{name}: {e}")))?;
            index.samples.push(ShardEntry {
                shard: shard_no as u32,
                offset: header_at + 512,
                size: bytes.len() as u64,
                label: *label,
                name: path
                    .strip_prefix(&folder.root)
                    .unwrap_or(path)
                    .display()
                    .to_string(),
            });
        }
        let mut writer = builder.into_inner().map_err(|e| fail(e.to_string()))?;
        writer.flush().map_err(|e| fail(e.to_string()))?;
        index.shards.push(name);
    }
    let json = serde_json::to_vec_pretty(&index).map_err(|e| fail(e.to_string()))?;
    std::fs::write(output.join("index.json"), json).map_err(|e| fail(e.to_string()))?;
    Ok(index)
}
