//! Everything between stored images and the step's tensors: where samples live
//! (`dataset`, `shards`), how one becomes a training input (`augment`), and the prefetching
//! pipeline that feeds the step (`loader`).

pub mod augment;
pub mod dataset;
pub mod image_folder;
pub mod loader;
pub mod mix;
pub mod rand_augment;
pub mod shards;

/// A problem with the training data. Errors name the file or object at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset {location}: {reason}")]
    Dataset { location: String, reason: String },
    #[error("{name}: {reason}")]
    Sample { name: String, reason: String },
}
