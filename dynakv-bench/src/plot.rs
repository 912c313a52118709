//! Quality-against-memory plots (SVG and PNG, plotters): one line per cache
//! family, retained fraction on x, a quality figure on y, the command that
//! produced the data in the caption.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Registers the embedded DejaVu fonts under the family names the plots use
/// (a bitmap needs glyphs, and a machine may have no fonts installed).
fn register_fonts() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for (name, bytes) in [
            ("sans-serif", dejavu::sans::regular()),
            ("monospace", dejavu::sans_mono::regular()),
        ] {
            register_font(name, FontStyle::Normal, bytes)
                .map_err(|_| format!("embedded font `{name}` did not load"))?;
        }
        Ok(())
    })
    .clone()
}

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// `(retained fraction, value)`, drawn in ascending x.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 16] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 0),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
];

/// Quality against KV bytes per token as a fraction of an f16 dense cache's,
/// on a log axis (the frontier spans 3% to 200%).
pub fn bytes_plot(
    path: &Path,
    title: &str,
    y_label: &str,
    caption: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), String> {
    let (lo, hi) = range(series, |p| p.0).ok_or("nothing to plot")?;
    draw_plot(
        path,
        title,
        (
            "KV bytes per token, fraction of an f16 dense cache (log)",
            lo * 0.8,
            hi * 1.25,
        ),
        y_label,
        caption,
        series,
        (true, log_y),
    )
}

/// Writes a line plot as SVG at `path` and as PNG beside it (same stem),
/// each atomically (temp file, then rename).
///
/// `x` is `(label, min, max)`.
pub fn line_plot(
    path: &Path,
    title: &str,
    x: (&str, f64, f64),
    y_label: &str,
    caption: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), String> {
    draw_plot(path, title, x, y_label, caption, series, (false, log_y))
}

/// Smallest and largest finite coordinate (`pick`: x or y) over every
/// point; `None` when there is none.
fn range(series: &[Series], pick: fn(&(f64, f64)) -> f64) -> Option<(f64, f64)> {
    series
        .iter()
        .flat_map(|s| s.points.iter().map(pick))
        .filter(|v| v.is_finite())
        .fold(None, |r, v| match r {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}

/// [`line_plot`] with a choice of log axes `(x, y)`.
fn draw_plot(
    path: &Path,
    title: &str,
    x: (&str, f64, f64),
    y_label: &str,
    caption: &str,
    series: &[Series],
    (log_x, log_y): (bool, bool),
) -> Result<(), String> {
    let (x_label, x_lo, x_hi) = x;
    let (lo, hi) = range(series, |p| p.1).ok_or("nothing to plot")?;
    let (lo, hi) = if log_y {
        (lo.max(1e-6) * 0.9, hi * 1.1)
    } else {
        (
            lo - 0.05 * (hi - lo).max(1e-6),
            hi + 0.05 * (hi - lo).max(1e-6),
        )
    };
    register_fonts()?;
    let plot = Plot {
        title,
        x: (x_label, x_lo, x_hi),
        y: (y_label, lo, hi),
        caption,
        series,
        log_x,
        log_y,
    };
    write_atomic(path, |tmp| {
        plot.draw(SVGBackend::new(tmp, SIZE).into_drawing_area())
    })?;
    write_atomic(&path.with_extension("png"), |tmp| {
        plot.draw(BitMapBackend::new(tmp, SIZE).into_drawing_area())
    })
}

const SIZE: (u32, u32) = (900, 560);

/// A tick label without float noise (0.7, not 0.70000000001).
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Writes `path` all or nothing ([`dynakv_core::io::write_atomically`]).
fn write_atomic(path: &Path, draw: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    let mut failure = None;
    dynakv_core::io::write_atomically(path, |tmp| {
        draw(tmp).map_err(|e| {
            failure = Some(e);
            std::io::Error::other("drawing failed")
        })
    })
    .map_err(|e| {
        failure
            .take()
            .unwrap_or_else(|| format!("{}: {e}", path.display()))
    })
}

/// Everything one plot shows, drawn on any plotters backend.
struct Plot<'a> {
    title: &'a str,
    x: (&'a str, f64, f64),
    /// `(label, low, high)`, the range already padded.
    y: (&'a str, f64, f64),
    caption: &'a str,
    series: &'a [Series],
    log_x: bool,
    log_y: bool,
}

impl Plot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), String> {
        let (x_label, x_lo, x_hi) = self.x;
        let (y_label, lo, hi) = self.y;
        let e = |e: &dyn std::fmt::Display| e.to_string();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        // The caption (a command) wrapped to the width, one line per 130 chars.
        let chars: Vec<char> = self.caption.chars().collect();
        let lines: Vec<String> = chars.chunks(130).map(|c| c.iter().collect()).collect();
        let (top, body) = root.split_vertically(16 + 14 * lines.len() as u32);
        for (i, line) in lines.iter().enumerate() {
            top.draw(&Text::new(
                line.clone(),
                (10, 8 + 14 * i as i32),
                ("monospace", 11),
            ))
            .map_err(|x| e(&x))?;
        }
        let mut builder = ChartBuilder::on(&body);
        builder
            .caption(self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60);
        macro_rules! body {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .draw()
                    .map_err(|x| e(&x))?;
                for (i, s) in self.series.iter().enumerate() {
                    let c = COLORS[i % COLORS.len()];
                    let mut pts = s.points.clone();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    chart
                        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                        .map_err(|x| e(&x))?
                        .label(s.name.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                        });
                    chart
                        .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                        .map_err(|x| e(&x))?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|x| e(&x))?;
            }};
        }
        match (self.log_x, self.log_y) {
            (false, true) => body!(builder
                .build_cartesian_2d(x_lo..x_hi, (lo..hi).log_scale())
                .map_err(|x| e(&x))?),
            (false, false) => body!(builder
                .build_cartesian_2d(x_lo..x_hi, lo..hi)
                .map_err(|x| e(&x))?),
            (true, true) => body!(builder
                .build_cartesian_2d((x_lo..x_hi).log_scale(), (lo..hi).log_scale())
                .map_err(|x| e(&x))?),
            (true, false) => body!(builder
                .build_cartesian_2d((x_lo..x_hi).log_scale(), lo..hi)
                .map_err(|x| e(&x))?),
        }
        root.present().map_err(|x| e(&x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_and_png_with_every_series_and_the_caption() {
        let dir = std::env::temp_dir().join(format!("dynakv-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.svg");
        let series = vec![
            Series {
                name: "energy".into(),
                points: vec![(0.47, 1.1), (0.3, 1.4)],
            },
            Series {
                name: "uniform".into(),
                points: vec![(0.47, 1.4), (0.3, 2.4)],
            },
        ];
        let x = ("retained fraction of the KV cache", 0.0, 1.02);
        line_plot(
            &path,
            "PPL",
            x,
            "PPL ratio",
            "dynakv eval sweep --x",
            &series,
            true,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        for s in ["energy", "uniform", "dynakv eval sweep --x"] {
            assert!(svg.contains(s), "{s}");
        }
        let png = std::fs::read(path.with_extension("png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // text was drawn: the caption's strip is not blank
        assert!(png.len() > 10_000, "{} bytes", png.len());
        assert!(line_plot(&path, "t", x, "y", "c", &[], false).is_err());
        let bytes = dir.join("b.svg");
        bytes_plot(&bytes, "PPL", "PPL ratio", "c", &series, false).unwrap();
        assert!(std::fs::read_to_string(&bytes)
            .unwrap()
            .contains("f16 dense"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
