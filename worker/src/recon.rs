//! Reconstruction pictures: one row per image, four columns as the SimMIM paper draws them:
//! the original, the masked input the encoder saw (masked patches grey), the prediction of the
//! masked part pasted into the visible image, and the raw prediction of every pixel (the
//! paper's "reconstruct all": what the head makes of the visible part too).
//! Tiny images are enlarged (nearest neighbour) so each tile is at least 128 px.

use image::{imageops, ImageEncoder, Rgb, RgbImage};

use crate::data::augment::denormalise;

/// `pixels` and `predicted` are `[n, 3, side, side]` normalised; `masks` `[n, grid, grid]`.
pub fn grid_png(
    pixels: &[f32],
    predicted: &[f32],
    masks: &[u8],
    side: usize,
    grid: usize,
) -> Vec<u8> {
    let per_image = 3 * side * side;
    let n = pixels.len() / per_image.max(1);
    let zoom = 128usize.div_ceil(side).max(1) as u32;
    let tile = side as u32 * zoom;
    let gap = 4u32;
    let mut canvas = RgbImage::from_pixel(
        4 * tile + 5 * gap,
        n as u32 * (tile + gap) + gap,
        Rgb([255, 255, 255]),
    );
    let unit = side / grid.max(1);
    for i in 0..n {
        let original = denormalise(&pixels[i * per_image..(i + 1) * per_image], side);
        let prediction = denormalise(&predicted[i * per_image..(i + 1) * per_image], side);
        let mask = &masks[i * grid * grid..(i + 1) * grid * grid];
        let masked_at = |x: u32, y: u32| mask[(y as usize / unit) * grid + x as usize / unit] == 1;
        let masked_input = RgbImage::from_fn(side as u32, side as u32, |x, y| {
            if masked_at(x, y) {
                Rgb([128, 128, 128])
            } else {
                *original.get_pixel(x, y)
            }
        });
        let pasted = RgbImage::from_fn(side as u32, side as u32, |x, y| {
            if masked_at(x, y) {
                *prediction.get_pixel(x, y)
            } else {
                *original.get_pixel(x, y)
            }
        });
        let top = gap + i as u32 * (tile + gap);
        for (col, tile_image) in [original, masked_input, pasted, prediction]
            .iter()
            .enumerate()
        {
            let big = imageops::resize(tile_image, tile, tile, imageops::FilterType::Nearest);
            imageops::replace(
                &mut canvas,
                &big,
                i64::from(gap + col as u32 * (tile + gap)),
                i64::from(top),
            );
        }
    }
    let mut out = Vec::new();
    // Encoding an in-memory RGB image cannot fail except on allocation.
    let _ = image::codecs::png::PngEncoder::new(&mut out).write_image(
        &canvas,
        canvas.width(),
        canvas.height(),
        image::ExtendedColorType::Rgb8,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_patches_show_grey_then_the_prediction() {
        let side = 8;
        let pixels = vec![0.0f32; 3 * side * side];
        let predicted = vec![10.0f32; 3 * side * side];
        let masks = vec![1, 0, 0, 0];
        let png = grid_png(&pixels, &predicted, &masks, side, 2);
        let image = image::load_from_memory(&png).expect("png").to_rgb8();
        let zoom = 16; // 128 / 8
        let tile = (side * zoom) as u32;
        let (gap, at) = (4u32, |col: u32, x: u32, y: u32| {
            (4 + col * (tile + 4) + x, 4 + y)
        });
        let _ = gap;
        let (x, y) = at(1, 2, 2);
        assert_eq!(
            image.get_pixel(x, y).0,
            [128, 128, 128],
            "masked input is grey"
        );
        let (x, y) = at(2, 2, 2);
        assert_eq!(
            image.get_pixel(x, y).0,
            [255, 255, 255],
            "prediction pasted (clamped to 1.0)"
        );
        let (x, y) = at(2, tile - 2, tile - 2);
        assert_eq!(
            image.get_pixel(x, y),
            image.get_pixel(at(0, tile - 2, tile - 2).0, at(0, tile - 2, tile - 2).1),
            "visible part is the original"
        );
        let (x, y) = at(3, tile - 2, tile - 2);
        assert_eq!(
            image.get_pixel(x, y).0,
            [255, 255, 255],
            "the raw prediction covers the visible part too"
        );
        assert_eq!(image.width(), 4 * tile + 5 * 4, "four columns");
    }
}
