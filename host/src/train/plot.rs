//! The loss curve of a run as a PNG (`loss.png` beside `metrics.jsonl`), as LLaMA-Factory's
//! `plot_loss` draws it: the training loss per logged step (light), its smoothed curve
//! (LLaMA-Factory's `smooth`, an exponential moving average whose weight grows with the
//! number of points), the eval loss, axis titles (`step`, `loss`), a title and a legend.
//!
//! Drawn with `plotters` into an RGB buffer that `image` writes. The text uses DejaVu Sans
//! (cut down to Latin-1, `host/assets/fonts`, with its licence), embedded in the binary and
//! registered with plotters' `ab_glyph` backend: no system font is looked up at run time.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use plotters::prelude::*;

/// Width and height of `loss.png` in pixels.
pub const W: u32 = 800;
pub const H: u32 = 500;
/// The raw training loss (drawn at 40% over white), its smoothed curve, the eval loss
/// (matplotlib's first two colours, as LLaMA-Factory's plot).
pub const TRAIN: RGBColor = RGBColor(31, 119, 180);
pub const EVAL: RGBColor = RGBColor(255, 127, 14);

/// DejaVu Sans, Latin-1 only (see `host/assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-Latin1.ttf");
const FAMILY: &str = "sans-serif";

/// Registers [`FONT`] as plotters' `sans-serif`, once per process.
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        bail!("the embedded font DejaVuSans-Latin1.ttf cannot be read")
    }
}

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

/// LLaMA-Factory's `smooth` (`extras/ploting.py`): an exponential moving average started at
/// the first value, with weight `1.8 * (sigmoid(0.05 * n) - 0.5)` for `n` values.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(&first) = values.first() else { return Vec::new() };
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = first;
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

/// Draws the losses of `metrics` (a metrics.jsonl file) into the PNG file `out`, titled with
/// the name of the folder that holds `metrics`.
pub fn write_loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let (train, eval) = losses(&text);
    if train.is_empty() && eval.is_empty() {
        bail!("{} has no loss values to plot", metrics.display());
    }
    let run = metrics
        .parent()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let title = match run {
        Some(name) => format!("Training loss of {name}"),
        None => "Training loss".to_string(),
    };
    let img = render(&train, &eval, &title)?;
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
}

/// The plot as a `W`×`H` image.
pub fn render(train: &[(f64, f64)], eval: &[(f64, f64)], title: &str) -> Result<RgbImage> {
    register_font()?;
    let mut buf = vec![255u8; (W * H * 3) as usize];
    draw(&mut buf, train, eval, title).map_err(|e| anyhow!("cannot draw the loss curve: {e}"))?;
    RgbImage::from_raw(W, H, buf).context("the loss curve's buffer has the wrong size")
}

fn draw(
    buf: &mut [u8],
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    title: &str,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = || train.iter().chain(eval);
    // Steps are whole numbers: an integer axis puts its ticks on them.
    let (x0, x1) =
        all().fold((i64::MAX, i64::MIN), |(a, b), p| (a.min(p.0 as i64), b.max(p.0 as i64)));
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 1, x1 + 1) };
    let at = |p: &(f64, f64)| (p.0 as i64, p.1);
    let (lo, hi) =
        all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .axis_desc_style((FAMILY, 16))
        .label_style((FAMILY, 13))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(225, 225, 225))
        .x_labels(10)
        .y_labels(8)
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()?;
    if !train.is_empty() {
        let raw = TRAIN.mix(0.4).stroke_width(2);
        chart
            .draw_series(LineSeries::new(train.iter().map(at), raw))?
            .label("original")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], raw));
        let smoothed: Vec<f64> = smooth(&train.iter().map(|p| p.1).collect::<Vec<_>>());
        let line = TRAIN.stroke_width(2);
        chart
            .draw_series(LineSeries::new(
                train.iter().zip(smoothed).map(|(p, s)| (p.0 as i64, s)),
                line,
            ))?
            .label("smoothed")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], line));
        if let [only] = train {
            chart.draw_series([Circle::new(at(only), 3, TRAIN.filled())])?;
        }
    }
    if !eval.is_empty() {
        let line = EVAL.stroke_width(2);
        chart.draw_series(LineSeries::new(eval.iter().map(at), line))?;
        chart
            .draw_series(eval.iter().map(|p| Circle::new(at(p), 4, EVAL.filled())))?
            .label("eval")
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, EVAL.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_is_llama_factorys_moving_average() {
        assert!(smooth(&[]).is_empty());
        // Two values: weight w = 1.8 * (sigmoid(0.1) - 0.5); [a, b] -> [a, a w + (1 - w) b].
        let w = 1.8 * (1.0 / (1.0 + (-0.1f64).exp()) - 0.5);
        let s = smooth(&[4.0, 2.0]);
        assert_eq!(s[0], 4.0);
        assert!((s[1] - (4.0 * w + 2.0 * (1.0 - w))).abs() < 1e-12, "{s:?} {w}");
        // The weight grows toward 0.9 with more points: 200 points smooth harder than 2.
        let many = smooth(&[[4.0, 2.0]; 100].concat());
        let w200 = 1.8 * (1.0 / (1.0 + (-10.0f64).exp()) - 0.5);
        assert!((many[1] - (4.0 * w200 + 2.0 * (1.0 - w200))).abs() < 1e-12);
        assert!(w200 > 0.89 && w < 0.05);
    }

    #[test]
    fn reads_losses_and_draws_a_falling_curve_with_text() {
        let m = "{\"step\":1,\"loss\":4.0}\n{\"step\":2,\"loss\":2.0,\"eval_loss\":2.5}\ntorn{\n{\"step\":3,\"loss\":1.0}\n";
        let (train, eval) = losses(m);
        assert_eq!(train, vec![(1.0, 4.0), (2.0, 2.0), (3.0, 1.0)]);
        assert_eq!(eval, vec![(2.0, 2.5)]);
        let img = render(&train, &eval, "Training loss of t").unwrap();
        assert_eq!(img.dimensions(), (W, H));
        let at = |c: RGBColor, keep: &dyn Fn(u32, u32) -> bool| {
            img.enumerate_pixels()
                .filter(|(x, y, p)| p.0 == [c.0, c.1, c.2] && keep(*x, *y))
                .count()
        };
        // The smoothed line starts high on the left and ends low on the right (the legend's
        // sample of it sits at the top right).
        assert!(at(TRAIN, &|x, y| x < W / 3 && y < H / 2) > 0);
        assert!(at(TRAIN, &|x, y| x > 2 * W / 3 && y > H / 2) > 0);
        assert!(at(EVAL, &|_, _| true) > 10);
        // The title, the axis titles and the tick labels are drawn in dark text: the top
        // band (title) and the bottom band (step axis title) hold dark pixels.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            img.enumerate_pixels()
                .filter(|(x, y, p)| {
                    (x0..x1).contains(x) && (y0..y1).contains(y) && p.0.iter().all(|&c| c < 100)
                })
                .count()
        };
        assert!(dark(0, W, 0, 36) > 50, "no title");
        assert!(dark(0, W, H - 24, H) > 20, "no x axis title");
        assert!(dark(0, 24, 0, H) > 20, "no y axis title");
    }

    #[test]
    fn one_point_and_eval_only_plots_draw() {
        assert!(render(&[(5.0, 1.0)], &[], "one").is_ok());
        assert!(render(&[], &[(5.0, 1.0), (6.0, 1.0)], "eval only").is_ok());
    }
}
