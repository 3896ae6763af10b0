//! SVG plots (plotters' SVG backend; text is left to the SVG viewer's fonts, so nothing beyond
//! Rust is needed to build or draw): line plots with a legend, and an accuracy heatmap.

use std::path::Path;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::error::EvalError;
use crate::fsutil::write_atomic;

/// Plot area and legend panel widths, and the least height, in pixels.
const PLOT_W: u32 = 900;
const LEGEND_W: u32 = 220;
const MIN_H: u32 = 600;
/// Vertical pitch of legend entries.
const LEGEND_ROW: i32 = 22;

/// How a legend entry is marked.
#[derive(Debug, Clone, Copy)]
enum Mark {
    Line(RGBAColor, bool),
    Swatch(RGBColor),
}

/// Draw the legend in its own panel right of the plot (so it never hides data, however many
/// series there are): a heading, then one mark and label per entry.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, Mark)],
) -> Result<(), DrawError> {
    let left = |y: i32, text: &str, size: u32| {
        Text::new(
            text.to_string(),
            (44, y),
            ("sans-serif", size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        )
    };
    area.draw(&left(60, "legend", 17)).map_err(err)?;
    for (i, (label, mark)) in entries.iter().enumerate() {
        let y = 60 + LEGEND_ROW * (i as i32 + 1);
        match *mark {
            Mark::Line(c, false) => area
                .draw(&PathElement::new(vec![(8, y), (36, y)], c.stroke_width(2)))
                .map_err(err)?,
            Mark::Line(c, true) => {
                for x in [8, 24] {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + 10, y)],
                        c.stroke_width(2),
                    ))
                    .map_err(err)?;
                }
            }
            Mark::Swatch(c) => area
                .draw(&Rectangle::new([(8, y - 7), (36, y + 7)], c.filled()))
                .map_err(err)?,
        }
        area.draw(&left(y, label, 15)).map_err(err)?;
    }
    Ok(())
}

/// Canvas size for a legend of `entries` rows.
fn canvas(entries: usize) -> (u32, u32) {
    let rows = 100 + LEGEND_ROW as u32 * (entries as u32 + 1);
    (PLOT_W + LEGEND_W, rows.max(MIN_H))
}

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    /// `(x, y)`; points with a non-finite y are left out.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// A line plot.
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Draw x on a log2 axis with ticks at the data's x values (lengths, positions).
    pub log2_x: bool,
    pub series: Vec<Series>,
}

/// A linear f64 axis whose ticks are exactly the given values (the measured lengths or
/// positions, or the centres of heatmap cells) rather than plotters' round numbers.
#[derive(Debug, Clone)]
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Bold ticks only: the same values as light grid lines would just be drawn twice.
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// plotters' drawing error, as text: its error type is generic over the drawing backend.
#[derive(Debug, thiserror::Error)]
#[error("drawing: {0}")]
pub struct DrawError(pub String);

fn err(e: impl std::fmt::Display) -> DrawError {
    DrawError(e.to_string())
}

fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.06 } else { 0.5 };
    (lo - pad, hi + pad)
}

/// Render `plot` as an SVG document.
pub fn line_plot(plot: &LinePlot) -> Result<String, DrawError> {
    let tx = |x: f64| if plot.log2_x { x.max(1e-12).log2() } else { x };
    let points: Vec<Vec<(f64, f64)>> = plot
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|p| p.1.is_finite() && p.0.is_finite())
                .map(|&(x, y)| (tx(x), y))
                .collect()
        })
        .collect();
    let all = || points.iter().flatten();
    let (x0, x1) = span(all().map(|p| p.0));
    let (y0, y1) = span(all().map(|p| p.1));
    let mut ticks: Vec<f64> = all().map(|p| p.0).collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let log2 = plot.log2_x;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, canvas(plot.series.len())).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (main, side) = root.split_horizontally(PLOT_W);
        let mut entries = Vec::new();
        let mut chart = ChartBuilder::on(&main)
            .caption(&plot.title, ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                Ticked {
                    lo: x0,
                    hi: x1,
                    ticks,
                },
                y0..y1,
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(&plot.x_label)
            .y_desc(&plot.y_label)
            .x_label_formatter(&|v| {
                if log2 {
                    format!("{}", 2f64.powf(*v).round())
                } else {
                    format!("{v}")
                }
            })
            .y_label_formatter(&|v| format!("{v:.3}"))
            .draw()
            .map_err(err)?;
        for (i, (s, pts)) in plot.series.iter().zip(points).enumerate() {
            let color = if s.dashed {
                BLACK.to_rgba()
            } else {
                Palette99::pick(i).to_rgba()
            };
            let style = color.stroke_width(2);
            if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts, 8, 5, style))
                    .map_err(err)?;
            } else {
                chart
                    .draw_series(LineSeries::new(pts, style).point_size(3))
                    .map_err(err)?;
            }
            entries.push((s.label.clone(), Mark::Line(color, s.dashed)));
        }
        draw_legend(&side, &entries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A heatmap of values in `[0, 1]`: `values[row][col]`, columns along x, rows along y, each cell
/// coloured from red (0) to green (1) and labelled with its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub cols: Vec<String>,
    pub rows: Vec<String>,
    pub values: Vec<Vec<f64>>,
}

fn heat(v: f64) -> RGBColor {
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    RGBColor((220.0 * (1.0 - v)) as u8 + 20, (180.0 * v) as u8 + 40, 60)
}

/// Render `map` as an SVG document.
pub fn heatmap(map: &Heatmap) -> Result<String, DrawError> {
    let (nc, nr) = (map.cols.len().max(1), map.rows.len().max(1));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, canvas(2)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (main, side) = root.split_horizontally(PLOT_W);
        let centers = |n: usize| (0..n).map(|i| i as f64 + 0.5).collect::<Vec<_>>();
        let mut chart = ChartBuilder::on(&main)
            .caption(&map.title, ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                Ticked {
                    lo: 0.0,
                    hi: nc as f64,
                    ticks: centers(nc),
                },
                Ticked {
                    lo: 0.0,
                    hi: nr as f64,
                    ticks: centers(nr),
                },
            )
            .map_err(err)?;
        let label = |names: &[String], v: f64| {
            names
                .get(v.floor().max(0.0) as usize)
                .cloned()
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(&map.x_label)
            .y_desc(&map.y_label)
            .x_label_formatter(&|v| label(&map.cols, *v))
            .y_label_formatter(&|v| label(&map.rows, *v))
            .draw()
            .map_err(err)?;
        let mut cells = Vec::new();
        let mut texts = Vec::new();
        for (r, row) in map.values.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let (x, y) = (c as f64, r as f64);
                cells.push(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    heat(v).filled(),
                ));
                texts.push(Text::new(
                    format!("{v:.2}"),
                    (x + 0.5, y + 0.5),
                    ("sans-serif", 16)
                        .into_font()
                        .color(&WHITE)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ));
            }
        }
        chart.draw_series(cells).map_err(err)?;
        chart.draw_series(texts).map_err(err)?;
        // Legend: the colour scale from 0 to 1.
        let entries: Vec<(String, Mark)> = [0.0, 0.5, 1.0]
            .iter()
            .map(|&v| (format!("accuracy {v}"), Mark::Swatch(heat(v))))
            .collect();
        draw_legend(&side, &entries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Refuse a plot path that is not `.svg` (checked before any work is done).
pub fn check_plot_path(path: &Path) -> Result<(), EvalError> {
    let is_svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    if !is_svg {
        return Err(EvalError::Plot {
            path: path.to_path_buf(),
            message: "plots are written as SVG: give a .svg file name".into(),
        });
    }
    Ok(())
}

/// Write an SVG document to `path` (atomically; an existing plot is replaced). Only `.svg` names
/// are accepted.
pub fn write_svg(path: &Path, svg: &str) -> Result<(), EvalError> {
    check_plot_path(path)?;
    write_atomic(path, svg.as_bytes(), true).map_err(|e| EvalError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Render with `render` and write to `path`, naming the plot on error.
pub fn render_to(
    path: &Path,
    render: impl FnOnce() -> Result<String, DrawError>,
) -> Result<(), EvalError> {
    let svg = render().map_err(|e| EvalError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_svg(path, &svg)
}
