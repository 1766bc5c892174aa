//! One stored image to one training input: decode, RandomResizedCrop, flip, normalise, mask,
//! as the official SimMIM transform does. All randomness comes from `(seed, epoch, sample id)`
//! so a sample gets the same crop and mask whichever worker loads it, after any restart.

use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use simmim_proto::mask::MaskGeometry;
use simmim_proto::plan::mix;

use super::DataError;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The official pretraining transform's settings.
#[derive(Debug, Clone)]
pub struct Augment {
    pub img_size: usize,
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    pub geometry: MaskGeometry,
    /// Fine-tuning only (pretraining uses crop and flip alone, as the official code).
    pub rand_augment: Option<super::rand_augment::RandAugmentSpec>,
}

/// A decoded, augmented, normalised sample: `[3, H, W]` floats and its token mask.
pub struct Prepared {
    pub pixels: Vec<f32>,
    pub mask: Vec<u8>,
    pub label: u32,
}

impl Augment {
    pub fn new(img_size: usize, geometry: MaskGeometry) -> Self {
        Self {
            img_size,
            scale: (0.67, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            geometry,
            rand_augment: None,
        }
    }

    pub fn sample_rng(seed: u64, epoch: u64, id: u32) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(mix(mix(seed, epoch), u64::from(id) + 1))
    }

    /// The training input for `bytes`, drawn from `rng`.
    pub fn prepare(
        &self,
        bytes: &[u8],
        name: &str,
        rng: &mut ChaCha8Rng,
    ) -> Result<Prepared, DataError> {
        let image = decode_rgb(bytes, name)?;
        let crop = self.crop_box(image.width(), image.height(), rng);
        let mut resized = crop_resize(&image, crop, self.img_size as u32, name)?;
        if rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut resized);
        }
        if let Some(spec) = &self.rand_augment {
            spec.apply(&mut resized, rng);
        }
        let mask = self.geometry.generate_with(rng);
        Ok(Prepared {
            pixels: normalise(&resized),
            mask,
            label: 0,
        })
    }

    /// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area and aspect
    /// ratio, then a centre crop at the nearest allowed ratio.
    fn crop_box(&self, width: u32, height: u32, rng: &mut ChaCha8Rng) -> (u32, u32, u32, u32) {
        let (w_img, h_img) = (f64::from(width), f64::from(height));
        let area = w_img * h_img;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.random_range(self.scale.0..=self.scale.1);
            let aspect = rng.random_range(log_lo..=log_hi).exp();
            let w = (target * aspect).sqrt().round();
            let h = (target / aspect).sqrt().round();
            if w > 0.0 && h > 0.0 && w <= w_img && h <= h_img {
                let (w, h) = (w as u32, h as u32);
                let y = rng.random_range(0..=height - h);
                let x = rng.random_range(0..=width - w);
                return (x, y, w, h);
            }
        }
        let in_ratio = w_img / h_img;
        let (w, h) = if in_ratio < self.ratio.0 {
            (w_img, (w_img / self.ratio.0).round())
        } else if in_ratio > self.ratio.1 {
            ((h_img * self.ratio.1).round(), h_img)
        } else {
            (w_img, h_img)
        };
        let (w, h) = ((w as u32).clamp(1, width), (h as u32).clamp(1, height));
        ((width - w) / 2, (height - h) / 2, w, h)
    }

    /// Deterministic input for inspecting a model: shorter side resized to the model's size,
    /// then a centre crop; the mask comes from `mask_seed`.
    pub fn center(&self, bytes: &[u8], name: &str, mask_seed: u64) -> Result<Prepared, DataError> {
        let image = decode_rgb(bytes, name)?;
        let side = image.width().min(image.height());
        let crop = image::imageops::crop_imm(
            &image,
            (image.width() - side) / 2,
            (image.height() - side) / 2,
            side,
            side,
        )
        .to_image();
        let resized = image::imageops::resize(
            &crop,
            self.img_size as u32,
            self.img_size as u32,
            FilterType::Triangle,
        );
        Ok(Prepared {
            pixels: normalise(&resized),
            mask: self.geometry.generate(mask_seed),
            label: 0,
        })
    }
}

/// The `(x, y, w, h)` region of `image` resized to `side x side` with a bilinear filter
/// widened by the scale factor when shrinking (what PIL's bilinear resize does for
/// torchvision's RandomResizedCrop), in one SIMD pass without copying the crop out first.
fn crop_resize(
    image: &RgbImage,
    (x, y, w, h): (u32, u32, u32, u32),
    side: u32,
    name: &str,
) -> Result<RgbImage, DataError> {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{FilterType as Filter, PixelType, ResizeAlg, ResizeOptions, Resizer};
    thread_local! {
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    let bad = |reason: String| DataError::Sample {
        name: name.to_string(),
        reason,
    };
    let source = ImageRef::new(
        image.width(),
        image.height(),
        image.as_raw(),
        PixelType::U8x3,
    )
    .map_err(|e| bad(format!("resizing: {e}")))?;
    let mut target = Image::new(side, side, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(Filter::Bilinear))
        .crop(f64::from(x), f64::from(y), f64::from(w), f64::from(h));
    RESIZER
        .with(|resizer| resizer.borrow_mut().resize(&source, &mut target, &options))
        .map_err(|e| bad(format!("resizing: {e}")))?;
    RgbImage::from_raw(side, side, target.into_vec())
        .ok_or_else(|| bad("resized buffer of the wrong size".into()))
}

/// The official evaluation transform: shorter side resized to `img_size / crop_pct`
/// (bicubic), then a centre crop of `img_size`; without `crop_pct` a plain resize to
/// `img_size x img_size`. Returns normalised `[3, H, W]`.
pub fn evaluation_pixels(
    bytes: &[u8],
    name: &str,
    img_size: usize,
    crop_pct: Option<f64>,
) -> Result<Vec<f32>, DataError> {
    let image = decode_rgb(bytes, name)?;
    let side = img_size as u32;
    let Some(pct) = crop_pct else {
        return Ok(normalise(&image::imageops::resize(
            &image,
            side,
            side,
            FilterType::CatmullRom,
        )));
    };
    let short = ((img_size as f64) / pct).floor().max(img_size as f64) as u32;
    let (w, h) = (image.width(), image.height());
    let (rw, rh) = if w <= h {
        (
            short,
            ((u64::from(h) * u64::from(short)) / u64::from(w)) as u32,
        )
    } else {
        (
            ((u64::from(w) * u64::from(short)) / u64::from(h)) as u32,
            short,
        )
    };
    let resized =
        image::imageops::resize(&image, rw.max(side), rh.max(side), FilterType::CatmullRom);
    let crop = image::imageops::crop_imm(
        &resized,
        (resized.width() - side) / 2,
        (resized.height() - side) / 2,
        side,
        side,
    )
    .to_image();
    Ok(normalise(&crop))
}

impl Augment {
    /// The same transform with another RandomResizedCrop area range (fine-tuning uses
    /// `[0.08, 1]` where pretraining uses `[0.67, 1]`).
    pub fn with_scale(mut self, scale: (f64, f64)) -> Self {
        self.scale = scale;
        self
    }

    pub fn with_rand_augment(mut self, spec: Option<super::rand_augment::RandAugmentSpec>) -> Self {
        self.rand_augment = spec;
        self
    }
}

/// JPEG or PNG of any colour type (grayscale, CMYK, palette, 16-bit, alpha) as 8-bit RGB.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage, DataError> {
    let image: DynamicImage = image::load_from_memory(bytes).map_err(|e| DataError::Sample {
        name: name.to_string(),
        reason: format!("cannot decode image: {e}"),
    })?;
    if image.width() == 0 || image.height() == 0 {
        return Err(DataError::Sample {
            name: name.to_string(),
            reason: "image has no pixels".into(),
        });
    }
    Ok(image.to_rgb8())
}

/// `[3, H, W]` with ImageNet normalisation.
fn normalise(image: &RgbImage) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut out = vec![0.0f32; 3 * w * h];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (f32::from(pixel[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    out
}

/// Back from normalised `[3, H, W]` to 8-bit RGB (clamped), for pictures.
pub fn denormalise(pixels: &[f32], side: usize) -> RgbImage {
    let plane = side * side;
    RgbImage::from_fn(side as u32, side as u32, |x, y| {
        let i = y as usize * side + x as usize;
        let mut rgb = [0u8; 3];
        for c in 0..3 {
            let v = pixels[c * plane + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c];
            rgb[c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        }
        image::Rgb(rgb)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder;

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        let rgba = image.to_rgba8();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                &rgba,
                rgba.width(),
                rgba.height(),
                image::ExtendedColorType::Rgba8,
            )
            .expect("encode");
        out
    }

    fn augment() -> Augment {
        Augment::new(32, MaskGeometry::new(32, 8, 2, 0.6).expect("geometry"))
    }

    #[test]
    fn same_seed_epoch_and_id_give_the_same_input() {
        let bytes = png(DynamicImage::ImageRgb8(RgbImage::from_fn(
            50,
            40,
            |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 100]),
        )));
        let a = augment()
            .prepare(&bytes, "a", &mut Augment::sample_rng(1, 2, 3))
            .expect("a");
        let b = augment()
            .prepare(&bytes, "a", &mut Augment::sample_rng(1, 2, 3))
            .expect("b");
        let c = augment()
            .prepare(&bytes, "a", &mut Augment::sample_rng(1, 3, 3))
            .expect("c");
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.mask, b.mask);
        assert!(a.pixels != c.pixels || a.mask != c.mask);
        assert_eq!(a.pixels.len(), 3 * 32 * 32);
        // 10 of 4x4 mask units, each 4x4 tokens of the 16x16 token grid.
        assert_eq!(a.mask.iter().filter(|&&m| m == 1).count(), 160);
    }

    #[test]
    fn crops_stay_inside_with_allowed_area_and_ratio() {
        let a = augment();
        let mut rng = Augment::sample_rng(0, 0, 0);
        for _ in 0..500 {
            let (x, y, w, h) = a.crop_box(300, 200, &mut rng);
            assert!(x + w <= 300 && y + h <= 200 && w > 0 && h > 0);
            let area = f64::from(w * h) / 60000.0;
            assert!((0.6..=1.0).contains(&area), "area share {area}");
        }
    }

    #[test]
    fn grayscale_and_alpha_become_rgb_and_garbage_is_a_named_error() {
        let gray = png(DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
            20,
            20,
            image::Luma([200]),
        )));
        let rgb = decode_rgb(&gray, "gray.png").expect("gray");
        assert_eq!(rgb.get_pixel(3, 3).0, [200, 200, 200]);
        let err = decode_rgb(b"\xff\xd8\xff\xe0 not really a jpeg", "bad.jpg").expect_err("bad");
        assert!(err.to_string().contains("bad.jpg"), "{err}");
    }

    #[test]
    fn normalise_round_trips() {
        let image = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
        assert_eq!(denormalise(&normalise(&image), 8), image);
    }
}
