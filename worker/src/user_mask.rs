//! Masks a user draws for `worker reconstruct`, as the SimMIM paper's figures mask most of an
//! object or the whole of it: a PNG (white = masked, any size) and boxes in the model's input
//! pixels, snapped to mask units (a unit is masked when at least half of its pixels are).

use std::path::Path;
use std::str::FromStr;

use simmim_proto::mask::masked_in;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UserMaskError {
    #[error("--mask {path}: {reason}")]
    Png { path: String, reason: String },
    #[error("--mask-box `{text}`: {reason}")]
    Box { text: String, reason: String },
    #[error("the drawn mask covers no mask unit (at least half of a {patch} px unit must be masked); draw a larger area")]
    Empty { patch: usize },
    #[error("the drawn mask covers every mask unit: nothing is left visible to reconstruct from")]
    Full,
}

/// `x,y,w,h` in pixels of the model's input (after the centre crop and resize).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskBox {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

impl FromStr for MaskBox {
    type Err = UserMaskError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| UserMaskError::Box {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let numbers: Vec<usize> = text
            .split(',')
            .map(|n| n.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("expected x,y,w,h as four whole numbers of pixels"))?;
        let [x, y, w, h] = numbers[..] else {
            return Err(bad("expected x,y,w,h as four whole numbers of pixels"));
        };
        if w == 0 || h == 0 {
            return Err(bad("width and height must be at least 1"));
        }
        Ok(Self { x, y, w, h })
    }
}

/// A `side x side` pixel mask (1 = masked) from a PNG, resized to the model's input (nearest).
pub fn pixels_from_png(path: &Path, side: usize) -> Result<Vec<u8>, UserMaskError> {
    let picture = image::open(path).map_err(|e| UserMaskError::Png {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let gray = image::imageops::resize(
        &picture.to_luma8(),
        side as u32,
        side as u32,
        image::imageops::FilterType::Nearest,
    );
    Ok(gray.pixels().map(|p| u8::from(p.0[0] >= 128)).collect())
}

/// Adds `boxes` (clipped to the image) to a `side x side` pixel mask.
pub fn add_boxes(pixels: &mut [u8], side: usize, boxes: &[MaskBox]) {
    for b in boxes {
        for row in b.y.min(side)..(b.y + b.h).min(side) {
            for col in b.x.min(side)..(b.x + b.w).min(side) {
                pixels[row * side + col] = 1;
            }
        }
    }
}

/// The unit mask (`side / patch` per side) of a pixel mask: a unit is masked when at least half
/// of its pixels are.
pub fn snap_to_units(pixels: &[u8], side: usize, patch: usize) -> Result<Vec<u8>, UserMaskError> {
    let per_side = side / patch;
    let mut units = vec![0u8; per_side * per_side];
    for (index, unit) in units.iter_mut().enumerate() {
        let (top, left) = ((index / per_side) * patch, (index % per_side) * patch);
        let masked = masked_in(pixels, side, (top, left), (patch, patch));
        *unit = u8::from(2 * masked >= patch * patch);
    }
    match units.iter().filter(|&&u| u == 1).count() {
        0 => Err(UserMaskError::Empty { patch }),
        n if n == units.len() => Err(UserMaskError::Full),
        _ => Ok(units),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_parse_and_name_what_is_wrong() {
        assert_eq!(
            "8, 16,32,40".parse::<MaskBox>().expect("box"),
            MaskBox {
                x: 8,
                y: 16,
                w: 32,
                h: 40
            }
        );
        for bad in ["1,2,3", "a,b,c,d", "1,2,0,4", "1,2,3,4,5"] {
            let err = bad.parse::<MaskBox>().expect_err(bad).to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn a_box_snaps_to_the_units_it_mostly_covers() {
        // 32 px, 8 px units: a box over x 4..20, y 0..8 covers half of unit 0, all of unit 1,
        // and a half of unit 2 (16..20 is half of 16..24).
        let mut pixels = vec![0u8; 32 * 32];
        add_boxes(
            &mut pixels,
            32,
            &[MaskBox {
                x: 4,
                y: 0,
                w: 16,
                h: 8,
            }],
        );
        let units = snap_to_units(&pixels, 32, 8).expect("units");
        assert_eq!(&units[..4], &[1, 1, 1, 0]);
        assert!(units[4..].iter().all(|&u| u == 0));
        // Less than half of every unit: nothing to reconstruct, a named error.
        let mut thin = vec![0u8; 32 * 32];
        add_boxes(
            &mut thin,
            32,
            &[MaskBox {
                x: 0,
                y: 0,
                w: 32,
                h: 3,
            }],
        );
        assert!(matches!(
            snap_to_units(&thin, 32, 8),
            Err(UserMaskError::Empty { patch: 8 })
        ));
        let mut all = vec![0u8; 32 * 32];
        add_boxes(
            &mut all,
            32,
            &[MaskBox {
                x: 0,
                y: 0,
                w: 99,
                h: 99,
            }],
        );
        assert!(matches!(
            snap_to_units(&all, 32, 8),
            Err(UserMaskError::Full)
        ));
    }

    #[test]
    fn a_png_of_any_size_is_resized_to_the_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mask.png");
        // 100x100, white on the left half.
        let picture =
            image::GrayImage::from_fn(100, 100, |x, _| image::Luma([if x < 50 { 255 } else { 0 }]));
        picture.save(&path).expect("save");
        let pixels = pixels_from_png(&path, 32).expect("png");
        let units = snap_to_units(&pixels, 32, 8).expect("units");
        for row in 0..4 {
            assert_eq!(&units[row * 4..row * 4 + 4], &[1, 1, 0, 0], "row {row}");
        }
        let err = pixels_from_png(&dir.path().join("missing.png"), 32).expect_err("missing");
        assert!(err.to_string().contains("missing.png"), "{err}");
    }
}
