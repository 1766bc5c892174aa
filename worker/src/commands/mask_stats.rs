//! `worker mask-stats`: how hard a run's masks are (the SimMIM paper's AvgDist and the true
//! masked share), for the configured mask or as the paper's sweep over strategies, mask
//! patches and ratios, with its plot.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use simmim_proto::mask::{MaskGeometry, MaskStats, MaskStrategy};
use simmim_proto::model_config::SimMimConfig;

/// The sweep's axes: the paper's mask patches and ratios.
pub const SWEEP_PATCHES: [usize; 5] = [4, 8, 16, 32, 64];
pub const SWEEP_RATIOS: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
const STRATEGIES: [MaskStrategy; 3] = [
    MaskStrategy::Random,
    MaskStrategy::Square,
    MaskStrategy::Block,
];

pub struct MaskStatsArgs {
    pub config: PathBuf,
    pub samples: usize,
    pub sweep: bool,
    /// Where the sweep's plot goes.
    pub plot: PathBuf,
}

pub fn mask_stats(args: &MaskStatsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let run = simmim_proto::RunConfig::from_yaml(&text, &args.config.display().to_string())?;
    let model = run.model_config()?;
    let geometry = model.mask_geometry()?;
    let stats = MaskStats::measure(&geometry, run.run.seed, args.samples);
    println!(
        "mask: {} strategy, mask patch {} px, ratio {} asked, {:.3} masked on average; \
         AvgDist {:.2} px over {} masks",
        geometry.strategy().name(),
        geometry.mask_patch(),
        model.mask_ratio(),
        stats.ratio,
        stats.avg_dist,
        stats.samples
    );
    if args.sweep {
        let rows = sweep(&model, run.run.seed, args.samples)?;
        print!("{}", markdown(&rows));
        let top = plot(&rows, &args.plot)?;
        println!(
            "plot: {} (panels: random, square, block; x: ratio 0.1 to 0.9; y: AvgDist 0 to \
             {top:.0} px; one line per mask patch, darker for larger)",
            args.plot.display()
        );
    }
    Ok(())
}

/// One point of the sweep.
pub struct SweepRow {
    pub strategy: MaskStrategy,
    pub patch: usize,
    pub ratio: f64,
    /// `None` where the image size does not divide by the patch or the strategy cannot mask
    /// the grid.
    pub stats: Option<MaskStats>,
}

/// Every strategy x mask patch x ratio on the model's image size.
pub fn sweep(model: &SimMimConfig, seed: u64, samples: usize) -> Result<Vec<SweepRow>> {
    let img = model.encoder.img_size();
    let mut rows = Vec::new();
    for strategy in STRATEGIES {
        for patch in SWEEP_PATCHES {
            for ratio in SWEEP_RATIOS {
                // AvgDist is a property of the pixels, so the model patch does not matter:
                // measure at pixel units (1) wherever the image divides by the mask patch.
                let stats = MaskGeometry::with_strategy(img, patch, 1, ratio, strategy)
                    .ok()
                    .map(|g| MaskStats::measure(&g, seed, samples));
                rows.push(SweepRow {
                    strategy,
                    patch,
                    ratio,
                    stats,
                });
            }
        }
    }
    Ok(rows)
}

/// One table per strategy: mask patch down, ratio across, AvgDist in pixels ("-" where the
/// image does not divide, the strategy cannot mask the grid, or no pixel is left visible).
pub fn markdown(rows: &[SweepRow]) -> String {
    let mut out = String::new();
    for strategy in STRATEGIES {
        let _ = writeln!(out, "\nAvgDist (px), {} masking:\n", strategy.name());
        let header: Vec<String> = SWEEP_RATIOS.iter().map(|r| format!("{r:.1}")).collect();
        let _ = writeln!(out, "| mask patch | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(SWEEP_RATIOS.len()));
        for patch in SWEEP_PATCHES {
            let cells: Vec<String> = rows
                .iter()
                .filter(|r| r.strategy == strategy && r.patch == patch)
                .map(|r| match r.stats {
                    Some(s) if s.avg_dist.is_finite() => format!("{:.1}", s.avg_dist),
                    // Not divisible, not a grid the strategy can mask, or nothing left visible.
                    _ => "-".into(),
                })
                .collect();
            let _ = writeln!(out, "| {patch} | {} |", cells.join(" | "));
        }
    }
    out
}

/// The paper's figure: AvgDist against the ratio, a line per mask patch, one panel per
/// strategy (random left, square middle, block right), lighter lines for smaller patches.
/// Returns the AvgDist at the top of the y axis.
pub fn plot(rows: &[SweepRow], path: &Path) -> Result<f64> {
    const PANEL: u32 = 300;
    const MARGIN: u32 = 20;
    let width = STRATEGIES.len() as u32 * (PANEL + MARGIN) + MARGIN;
    let height = PANEL + 2 * MARGIN;
    let mut picture = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let top = rows
        .iter()
        .filter_map(|r| r.stats.map(|s| s.avg_dist))
        .filter(|d| d.is_finite())
        .fold(1.0f64, f64::max);
    for (panel, strategy) in STRATEGIES.into_iter().enumerate() {
        let x0 = MARGIN + panel as u32 * (PANEL + MARGIN);
        let to_pixel = |ratio: f64, dist: f64| {
            let x = x0 as f64 + (ratio - 0.1) / 0.8 * PANEL as f64;
            let y = (MARGIN + PANEL) as f64 - dist / top * PANEL as f64;
            (x, y)
        };
        // The panel's frame (the axes).
        let grey = Rgb([150, 150, 150]);
        line(
            &mut picture,
            (x0 as f64, MARGIN as f64),
            (x0 as f64, (MARGIN + PANEL) as f64),
            grey,
        );
        let bottom = (MARGIN + PANEL) as f64;
        line(
            &mut picture,
            (x0 as f64, bottom),
            ((x0 + PANEL) as f64, bottom),
            grey,
        );
        for (shade, patch) in SWEEP_PATCHES.into_iter().enumerate() {
            let level = 40 + 50 * shade as u8;
            let colour = match strategy {
                MaskStrategy::Random => Rgb([255 - level, 255 - level, 255]),
                MaskStrategy::Square => Rgb([255, 255 - level, 255 - level]),
                MaskStrategy::Block => Rgb([255 - level, 255, 255 - level]),
            };
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.strategy == strategy && r.patch == patch)
                .filter_map(|r| r.stats.map(|s| to_pixel(r.ratio, s.avg_dist)))
                .filter(|p| p.1.is_finite())
                .collect();
            for pair in points.windows(2) {
                line(&mut picture, pair[0], pair[1], colour);
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    picture
        .save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(top)
}

/// A straight segment, two pixels wide.
fn line(picture: &mut RgbImage, from: (f64, f64), to: (f64, f64), colour: Rgb<u8>) {
    let steps = ((to.0 - from.0).abs().max((to.1 - from.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (from.0 + t * (to.0 - from.0), from.1 + t * (to.1 - from.1));
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < picture.width() && (py as u32) < picture.height()
            {
                picture.put_pixel(px as u32, py as u32, colour);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_shows_the_papers_trends() {
        let model = SimMimConfig::preset("swin_base").expect("preset");
        let rows = sweep(&model, 0, 4).expect("sweep");
        assert_eq!(rows.len(), 3 * 5 * 9);
        let dist = |s: MaskStrategy, p: usize, r: f64| {
            rows.iter()
                .find(|row| row.strategy == s && row.patch == p && (row.ratio - r).abs() < 1e-9)
                .and_then(|row| row.stats)
                .map(|st| st.avg_dist)
        };
        // Random masking, as the paper plots it: up with the ratio, up with the patch.
        for patch in SWEEP_PATCHES {
            // (A 3x3 grid of 64 px units at ratio 0.9 masks all nine: no distance.)
            let line: Vec<f64> = SWEEP_RATIOS
                .iter()
                .map(|&r| dist(MaskStrategy::Random, patch, r).expect("192 divides"))
                .filter(|d| d.is_finite())
                .collect();
            assert!(line.len() >= 8, "patch {patch}: {line:?}");
            assert!(
                line.windows(2).all(|w| w[0] < w[1]),
                "patch {patch}: {line:?}"
            );
        }
        let at_06: Vec<f64> = SWEEP_PATCHES
            .iter()
            .map(|&p| dist(MaskStrategy::Random, p, 0.6).expect("defined"))
            .collect();
        assert!(at_06.windows(2).all(|w| w[0] < w[1]), "{at_06:?}");
        // A 64 px patch on 192 px is a 3x3 grid: too small for a block.
        assert!(dist(MaskStrategy::Block, 64, 0.6).is_none());
        // The square is the hardest mask at one ratio (the paper's "square" has the largest
        // AvgDist of the strategies).
        assert!(dist(MaskStrategy::Square, 4, 0.6) > dist(MaskStrategy::Random, 32, 0.6));
        let table = markdown(&rows);
        assert!(
            table.contains("| 32 |") && table.contains("block masking"),
            "{table}"
        );
    }

    #[test]
    fn the_plot_is_a_png() {
        let model = SimMimConfig::preset("swin_micro").expect("preset");
        let rows = sweep(&model, 0, 2).expect("sweep");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plots/avgdist.png");
        plot(&rows, &path).expect("plot");
        let picture = image::open(&path).expect("png").to_rgb8();
        let coloured = picture.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(coloured > 1000, "{coloured} drawn pixels");
    }
}
