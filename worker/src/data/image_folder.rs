//! An ImageFolder tree on a local disk: one folder per class, as torchvision reads it.

use std::path::{Path, PathBuf};

use super::DataError;

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
