//! The loss curve of a run as a PNG (`loss.png` beside `metrics.jsonl`): training loss per
//! logged step as a blue line, eval loss as orange squares, the loss range and the last step
//! written on the axes with a built-in 3×5 digit font (no font files needed).
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};

const W: u32 = 640;
const H: u32 = 400;
const LEFT: u32 = 70;
const RIGHT: u32 = 20;
const TOP: u32 = 20;
const BOTTOM: u32 = 40;
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const EVAL: Rgb<u8> = Rgb([255, 127, 14]);

/// `(step, loss)` points of a curve.
pub type Points = Vec<(f64, f64)>;

/// Points `(step, loss)` of the training and eval losses in a metrics.jsonl text.
pub fn losses(metrics_jsonl: &str) -> (Points, Points) {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in metrics_jsonl.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64().filter(|l| l.is_finite()) {
            eval.push((step, l));
        }
    }
    (train, eval)
}

/// Draws the losses of `metrics` (a metrics.jsonl file) into the PNG file `out`.
pub fn write_loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let (train, eval) = losses(&text);
    if train.is_empty() && eval.is_empty() {
        bail!("{} has no loss values to plot", metrics.display());
    }
    let img = render(&train, &eval);
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
}

/// The plot as an image.
pub fn render(train: &[(f64, f64)], eval: &[(f64, f64)]) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let all = train.iter().chain(eval);
    let max_step = all.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let (mut lo, mut hi) =
        all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if !(hi > lo) {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let x = |s: f64| LEFT as f64 + s / max_step * pw;
    let y = |l: f64| TOP as f64 + (hi - l) / (hi - lo) * ph;
    for k in 1..4 {
        let gy = TOP + (H - TOP - BOTTOM) * k / 4;
        line(&mut img, (LEFT as f64, gy as f64), ((W - RIGHT) as f64, gy as f64), GRID);
    }
    line(&mut img, (LEFT as f64, TOP as f64), (LEFT as f64, (H - BOTTOM) as f64), AXIS);
    line(
        &mut img,
        (LEFT as f64, (H - BOTTOM) as f64),
        ((W - RIGHT) as f64, (H - BOTTOM) as f64),
        AXIS,
    );
    for pair in train.windows(2) {
        line(&mut img, (x(pair[0].0), y(pair[0].1)), (x(pair[1].0), y(pair[1].1)), TRAIN);
    }
    if let [only] = train {
        square(&mut img, x(only.0), y(only.1), 1, TRAIN);
    }
    for p in eval {
        square(&mut img, x(p.0), y(p.1), 3, EVAL);
    }
    text(&mut img, 4, TOP - 2, &format!("{hi:.3}"), AXIS);
    text(&mut img, 4, H - BOTTOM - 8, &format!("{lo:.3}"), AXIS);
    text(&mut img, LEFT - 4, H - BOTTOM + 8, "0", AXIS);
    let last = format!("{}", max_step as u64);
    text(&mut img, W - RIGHT - 8 * last.len() as u32, H - BOTTOM + 8, &last, AXIS);
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A 2-pixel-wide line.
fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as i64).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (px, py) =
            ((a.0 + (b.0 - a.0) * t).round() as i64, (a.1 + (b.1 - a.1) * t).round() as i64);
        put(img, px, py, c);
        put(img, px, py + 1, c);
    }
}

fn square(img: &mut RgbImage, cx: f64, cy: f64, r: i64, c: Rgb<u8>) {
    let (cx, cy) = (cx.round() as i64, cy.round() as i64);
    for dy in -r..=r {
        for dx in -r..=r {
            put(img, cx + dx, cy + dy, c);
        }
    }
}

/// Digits, `.` and `-` in a 3×5 font drawn at scale 2.
fn text(img: &mut RgbImage, x0: u32, y0: u32, s: &str, c: Rgb<u8>) {
    const GLYPHS: [(char, [u8; 5]); 12] = [
        ('0', [7, 5, 5, 5, 7]),
        ('1', [2, 6, 2, 2, 7]),
        ('2', [7, 1, 7, 4, 7]),
        ('3', [7, 1, 7, 1, 7]),
        ('4', [5, 5, 7, 1, 1]),
        ('5', [7, 4, 7, 1, 7]),
        ('6', [7, 4, 7, 5, 7]),
        ('7', [7, 1, 1, 1, 1]),
        ('8', [7, 5, 7, 5, 7]),
        ('9', [7, 5, 7, 1, 7]),
        ('.', [0, 0, 0, 0, 2]),
        ('-', [0, 0, 7, 0, 0]),
    ];
    for (k, ch) in s.chars().enumerate() {
        let Some((_, rows)) = GLYPHS.iter().find(|(g, _)| *g == ch) else { continue };
        for (ry, bits) in rows.iter().enumerate() {
            for rx in 0..3 {
                if bits & (4 >> rx) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(
                            img,
                            (x0 + k as u32 * 8 + rx * 2 + dx) as i64,
                            (y0 + ry as u32 * 2 + dy) as i64,
                            c,
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_losses_and_draws_a_falling_curve() {
        let m = "{\"step\":1,\"loss\":4.0}\n{\"step\":2,\"loss\":2.0,\"eval_loss\":2.5}\ntorn{\n{\"step\":3,\"loss\":1.0}\n";
        let (train, eval) = losses(m);
        assert_eq!(train, vec![(1.0, 4.0), (2.0, 2.0), (3.0, 1.0)]);
        assert_eq!(eval, vec![(2.0, 2.5)]);
        let img = render(&train, &eval);
        // The line starts high on the left and ends low on the right.
        let blue_rows =
            |x: u32| (0..H).filter(|&y| *img.get_pixel(x, y) == TRAIN).collect::<Vec<_>>();
        let start = blue_rows(LEFT + (W - LEFT - RIGHT) / 3 + 1);
        let end = blue_rows(W - RIGHT - 1);
        assert!(!start.is_empty() && !end.is_empty());
        assert!(start[0] < end[0], "{start:?} vs {end:?}");
        assert!(img.pixels().any(|p| *p == EVAL));
    }
}
