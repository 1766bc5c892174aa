//! RandAugment as timm's `rand-m{M}-mstd{S}-inc1` (what the official fine-tuning uses): each
//! image gets `layers` operations drawn from the "increasing" list, each applied with
//! probability 0.5 at a magnitude drawn around `magnitude` (out of 10) with `magnitude_std`.
//! The operations follow PIL's definitions; results are close to, not bit-identical with,
//! PIL's (resampling and rounding differ).

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandAugmentSpec {
    pub layers: usize,
    pub magnitude: f64,
    pub magnitude_std: f64,
}

/// Fill for pixels that geometric operations bring in from outside (timm: the ImageNet
/// mean).
const FILL: Rgb<u8> = Rgb([124, 116, 104]);
const OPS: usize = 15;

impl RandAugmentSpec {
    pub fn apply(&self, image: &mut RgbImage, rng: &mut ChaCha8Rng) {
        for _ in 0..self.layers {
            let op = rng.random_range(0..OPS);
            if !rng.random_bool(0.5) {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                if let Ok(normal) = Normal::new(self.magnitude, self.magnitude_std) {
                    m = normal.sample(rng);
                }
            }
            let level = m.clamp(0.0, 10.0) / 10.0;
            let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
            apply_op(op, image, level, sign);
        }
    }
}

fn apply_op(op: usize, image: &mut RgbImage, level: f64, sign: f64) {
    match op {
        0 => auto_contrast(image),
        1 => equalize(image),
        2 => map_pixels(image, |v| 255 - v),
        3 => rotate(image, sign * level * 30.0),
        4 => {
            let bits = 4 - (level * 4.0) as u32;
            let mask = if bits == 0 {
                0
            } else {
                0xffu8 << (8 - bits.min(8))
            };
            map_pixels(image, |v| v & mask);
        }
        5 => {
            let threshold = 256 - (level * 256.0) as i32;
            map_pixels(image, |v| {
                if i32::from(v) >= threshold {
                    255 - v
                } else {
                    v
                }
            });
        }
        6 => {
            let add = (level * 110.0) as u16;
            map_pixels(image, |v| {
                if v < 128 {
                    (u16::from(v) + add).min(255) as u8
                } else {
                    v
                }
            });
        }
        7..=10 => {
            let factor = (1.0 + sign * level * 0.9) as f32;
            match op {
                7 => blend_with(image, &grayscale(image), factor),
                8 => {
                    let gray = grayscale(image);
                    let mean = gray.pixels().map(|p| f32::from(p[0])).sum::<f32>()
                        / (gray.width() * gray.height()).max(1) as f32;
                    let flat = RgbImage::from_pixel(
                        image.width(),
                        image.height(),
                        Rgb([(mean + 0.5) as u8; 3]),
                    );
                    blend_with(image, &flat, factor);
                }
                9 => blend_with(image, &RgbImage::new(image.width(), image.height()), factor),
                _ => blend_with(image, &smoothed(image), factor),
            }
        }
        11 => affine(image, [1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0]),
        12 => affine(image, [1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0]),
        13 => {
            let dx = sign * level * 0.45 * f64::from(image.width());
            affine(image, [1.0, 0.0, dx, 0.0, 1.0, 0.0]);
        }
        _ => {
            let dy = sign * level * 0.45 * f64::from(image.height());
            affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, dy]);
        }
    }
}

fn map_pixels(image: &mut RgbImage, f: impl Fn(u8) -> u8) {
    for p in image.pixels_mut() {
        for c in 0..3 {
            p[c] = f(p[c]);
        }
    }
}

/// PIL's `ImageOps.autocontrast`: each channel stretched to the full range.
fn auto_contrast(image: &mut RgbImage) {
    for c in 0..3 {
        let (lo, hi) = image
            .pixels()
            .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p[c]), hi.max(p[c])));
        if hi <= lo {
            continue;
        }
        let scale = 255.0 / f32::from(hi - lo);
        for p in image.pixels_mut() {
            p[c] = ((f32::from(p[c] - lo) * scale).round()).clamp(0.0, 255.0) as u8;
        }
    }
}

/// PIL's `ImageOps.equalize`: each channel's histogram flattened.
fn equalize(image: &mut RgbImage) {
    let total = (image.width() * image.height()) as usize;
    for c in 0..3 {
        let mut histogram = [0usize; 256];
        for p in image.pixels() {
            histogram[p[c] as usize] += 1;
        }
        let last = histogram
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, |i| histogram[i]);
        let step = (total - last) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for (value, count) in histogram.iter().enumerate() {
            lut[value] = (n / step).min(255) as u8;
            n += count;
        }
        for p in image.pixels_mut() {
            p[c] = lut[p[c] as usize];
        }
    }
}

fn grayscale(image: &RgbImage) -> RgbImage {
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let p = image.get_pixel(x, y);
        let l =
            (f32::from(p[0]) * 299.0 + f32::from(p[1]) * 587.0 + f32::from(p[2]) * 114.0) / 1000.0;
        Rgb([l.round() as u8; 3])
    })
}

/// PIL's SMOOTH filter (3x3, centre weight 5), borders left as they are.
fn smoothed(image: &RgbImage) -> RgbImage {
    let mut out = image.clone();
    let (w, h) = (image.width(), image.height());
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let mut sum = [0f32; 3];
            for dy in 0..3 {
                for dx in 0..3 {
                    let weight = if dx == 1 && dy == 1 { 5.0 } else { 1.0 };
                    let p = image.get_pixel(x + dx - 1, y + dy - 1);
                    for c in 0..3 {
                        sum[c] += f32::from(p[c]) * weight;
                    }
                }
            }
            out.put_pixel(x, y, Rgb(sum.map(|s| (s / 13.0).round() as u8)));
        }
    }
    out
}

/// PIL's `ImageEnhance`: `other + factor * (image - other)`, clamped.
fn blend_with(image: &mut RgbImage, other: &RgbImage, factor: f32) {
    for (p, q) in image.pixels_mut().zip(other.pixels()) {
        for c in 0..3 {
            let (a, b) = (f32::from(p[c]), f32::from(q[c]));
            p[c] = (b + factor * (a - b)).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// PIL's `Image.transform(AFFINE, (a, b, c, d, e, f))`: output (x, y) takes the input at
/// `(a x + b y + c, d x + e y + f)`, nearest neighbour, `FILL` outside.
fn affine(image: &mut RgbImage, [a, b, c, d, e, f]: [f64; 6]) {
    let source = image.clone();
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    for (x, y, p) in image.enumerate_pixels_mut() {
        let (xf, yf) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        let sx = (a * xf + b * yf + c).floor() as i64;
        let sy = (d * xf + e * yf + f).floor() as i64;
        *p = if (0..w).contains(&sx) && (0..h).contains(&sy) {
            *source.get_pixel(sx as u32, sy as u32)
        } else {
            FILL
        };
    }
}

/// Rotation by `degrees` about the centre (counter-clockwise, as PIL), `FILL` outside.
fn rotate(image: &mut RgbImage, degrees: f64) {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = (
        f64::from(image.width()) / 2.0,
        f64::from(image.height()) / 2.0,
    );
    // Inverse map: output point rotated back by the angle.
    let c = cx - cos * cx - sin * cy;
    let f = cy + sin * cx - cos * cy;
    affine(image, [cos, sin, c, -sin, cos, f]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient() -> RgbImage {
        RgbImage::from_fn(16, 12, |x, y| {
            Rgb([(x * 9) as u8, (y * 11) as u8, ((x + y) * 5) as u8])
        })
    }

    #[test]
    fn neutral_settings_leave_the_image_alone() {
        let original = gradient();
        for (op, level) in [
            (3, 0.0),
            (11, 0.0),
            (12, 0.0),
            (13, 0.0),
            (14, 0.0),
            (7, 0.0),
            (8, 0.0),
            (9, 0.0),
            (10, 0.0),
            (6, 0.0),
        ] {
            let mut image = original.clone();
            apply_op(op, &mut image, level, 1.0);
            assert_eq!(image, original, "op {op} at level 0");
        }
        let mut image = original.clone();
        apply_op(2, &mut image, 0.5, 1.0);
        apply_op(2, &mut image, 0.5, 1.0);
        assert_eq!(image, original, "invert twice");
    }

    #[test]
    fn operations_do_what_they_say() {
        let mut image = gradient();
        auto_contrast(&mut image);
        for c in 0..3 {
            let (lo, hi) = image
                .pixels()
                .fold((255, 0), |(l, h), p| (p[c].min(l), p[c].max(h)));
            assert_eq!((lo, hi), (0, 255), "channel {c} stretched");
        }
        let mut dark = gradient();
        apply_op(9, &mut dark, 0.5, -1.0); // brightness factor 0.55
        assert!(dark
            .pixels()
            .zip(gradient().pixels())
            .all(|(d, o)| d[0] <= o[0]));
        let mut posterized = gradient();
        apply_op(4, &mut posterized, 0.9, 1.0); // 1 bit
        assert!(posterized.pixels().all(|p| p[0] == 0 || p[0] == 128));
        let mut moved = gradient();
        apply_op(13, &mut moved, 1.0, 1.0);
        assert!(
            moved.pixels().any(|p| *p == FILL),
            "translation brings in the fill"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_augmentation() {
        let spec = RandAugmentSpec {
            layers: 2,
            magnitude: 9.0,
            magnitude_std: 0.5,
        };
        let run = |seed| {
            let mut image = gradient();
            spec.apply(&mut image, &mut ChaCha8Rng::seed_from_u64(seed));
            image
        };
        assert_eq!(run(7), run(7));
        assert!((0..20).any(|s| run(s) != gradient()), "it changes images");
    }
}
