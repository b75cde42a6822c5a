//! Charts of a benchmark run, as PNG and SVG: bars per data path with the
//! min–max range, and figures against the number of services on a log axis.
//!
//! Text is drawn by plotters' `ab_glyph` feature with DejaVu Sans read at run
//! time from Debian's fonts-dejavu-core, so no fontconfig or freetype is
//! involved; [`ensure_font`] installs the package when the file is missing
//! (the chart functions call it themselves).

use std::path::Path;
use std::sync::Mutex;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use tern_lab::host;

use super::report::{self, Results, ScenarioResult, fmt_num};

/// The regular and bold faces, from Debian's fonts-dejavu-core.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
pub const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
/// The family name the fonts are registered under with plotters.
const FAMILY: &str = "sans-serif";

/// Makes sure the chart font is there and registered with plotters: installs
/// fonts-dejavu-core with apt-get when [`FONT`] is missing (needs root).
pub fn ensure_font() -> Result<()> {
    if !Path::new(FONT).exists() {
        host::apt(&["fonts-dejavu-core"])?;
        if !Path::new(FONT).exists() {
            bail!("fonts-dejavu-core is installed but {FONT} is still missing");
        }
    }
    register_fonts()
}

/// The faces the PNG backend draws text with, set by [`register_fonts`].
struct Faces {
    regular: FontRef<'static>,
    bold: Option<FontRef<'static>>,
}

static FACES: Mutex<Option<Faces>> = Mutex::new(None);

/// Registers the fonts with plotters once per process.
fn register_fonts() -> Result<()> {
    let mut faces = FACES.lock().unwrap_or_else(|e| e.into_inner());
    if faces.is_some() {
        return Ok(());
    }
    let load = |path: &str, style: FontStyle| -> Result<FontRef<'static>> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        // plotters keeps a &'static reference; this happens once per face.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, style, bytes)
            .map_err(|_| anyhow::anyhow!("{path} is not a font plotters can read"))?;
        FontRef::try_from_slice(bytes).with_context(|| format!("{path} is not a font"))
    };
    let regular = load(FONT, FontStyle::Normal)?;
    // The bold face is optional: plotters falls back to the regular one.
    let bold = if Path::new(FONT_BOLD).exists() {
        Some(load(FONT_BOLD, FontStyle::Bold)?)
    } else {
        None
    };
    *faces = Some(Faces { regular, bold });
    Ok(())
}

/// The face to draw `style` with, once the fonts are registered.
fn face(style: FontStyle) -> Option<FontRef<'static>> {
    let faces = FACES.lock().unwrap_or_else(|e| e.into_inner());
    let faces = faces.as_ref()?;
    Some(match (style, &faces.bold) {
        (FontStyle::Bold, Some(bold)) => bold.clone(),
        _ => faces.regular.clone(),
    })
}

/// plotters' bitmap backend with its own text drawing. plotters 0.3.7 draws
/// `ab_glyph` text without each glyph's left side bearing, so letters crowd
/// ("Tern" reads "Tem") and points drift; this draws every glyph where the
/// font puts it, in plotters' layout box (same anchors and rotations), and
/// leaves everything else to [`BitMapBackend`].
struct PngBackend<'a>(BitMapBackend<'a>);

impl DrawingBackend for PngBackend<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.fill_polygon(vert, style)
    }
    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        self.0.estimate_text_size(text, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        let Some(font) = face(style.style()) else {
            return self.0.draw_text(text, style, pos);
        };
        if color.alpha == 0.0 {
            return Ok(());
        }
        // plotters' layout box, anchored as its default draw_text does.
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let (w, h) = self.get_size();
        let font = font.into_scaled(PxScale::from(style.size() as f32));
        // Capitals centred in the box: the baseline half a cap height below
        // its middle.
        let cap = font
            .outline_glyph(font.scaled_glyph('H'))
            .map_or(height as f32 * 0.75, |g| g.px_bounds().height());
        let baseline = (height as f32 + cap) / 2.0;
        let mut caret = 0.0f32;
        let mut prev = None;
        let mut error = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(prev) = prev {
                caret += font.kern(prev, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(font.scale(), point(caret, baseline));
            caret += font.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                if coverage <= 0.0 || error.is_some() {
                    return;
                }
                let x = bounds.min.x as i32 + gx as i32 + dx - min_x;
                let y = bounds.min.y as i32 + gy as i32 + dy - min_y;
                let (x, y) = trans.transform(x, y);
                let (x, y) = (pos.0 + x, pos.1 + y);
                if x >= 0 && x < w as i32 && y >= 0 && y < h as i32 {
                    let color = BackendColor {
                        alpha: color.alpha * f64::from(coverage.min(1.0)),
                        rgb: color.rgb,
                    };
                    if let Err(e) = self.0.draw_pixel((x, y), color) {
                        error = Some(e);
                    }
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Colours that stay apart on screen and in print (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0xba, 0xb0, 0xac),
];

/// One colour per data path (scenario name), the same in every chart of a run.
fn color_of(results: &Results, name: &str) -> RGBColor {
    let mut names: Vec<&str> = Vec::new();
    for s in &results.scenarios {
        if !names.contains(&s.name.as_str()) {
            names.push(&s.name);
        }
    }
    let i = names.iter().position(|n| *n == name).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

fn bold(size: u32) -> TextStyle<'static> {
    (FAMILY, size)
        .into_font()
        .style(FontStyle::Bold)
        .color(&BLACK)
}

fn direction(higher_is_better: bool) -> &'static str {
    if higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    }
}

/// A chart that can be drawn on any backend.
trait Chart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Draws `chart` into `<out_dir>/<stem>.png` and `<out_dir>/<stem>.svg`.
fn render(out_dir: &Path, file_stem: &str, size: (u32, u32), chart: &impl Chart) -> Result<()> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let png = out_dir.join(format!("{file_stem}.png"));
    {
        let root = PngBackend(BitMapBackend::new(&png, size)).into_drawing_area();
        chart
            .draw(&root)
            .with_context(|| format!("cannot draw {}", png.display()))?;
        root.present()
            .with_context(|| format!("cannot write {}", png.display()))?;
    }
    let svg = out_dir.join(format!("{file_stem}.svg"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        chart
            .draw(&root)
            .with_context(|| format!("cannot draw {}", svg.display()))?;
        root.present()
            .with_context(|| format!("cannot write {}", svg.display()))?;
    }
    Ok(())
}

/// One bar of a bar chart.
struct Bar {
    label: String,
    median: f64,
    min: f64,
    max: f64,
    /// `×r` to the baseline row, when the row has one.
    ratio: Option<f64>,
    color: RGBColor,
}

struct BarChart {
    title: String,
    axis: String,
    unit: String,
    bars: Vec<Bar>,
}

/// Horizontal bars, one per scenario of `group` that has `metric`, in run
/// order from the top: the median, a whisker from min to max, and the value
/// (with the ratio to the row's baseline) at the end. Writes
/// `<out_dir>/<file_stem>.png` and `.svg`.
pub fn bar_chart(
    results: &Results,
    group: &str,
    metric: &str,
    out_dir: &Path,
    file_stem: &str,
) -> Result<()> {
    ensure_font()?;
    let rows = report::group_rows(results, group);
    let mut bars = Vec::new();
    let mut first = None;
    for row in &rows {
        let Some(m) = row.metric(metric).filter(|m| !m.samples.is_empty()) else {
            continue;
        };
        first.get_or_insert(m);
        let ratio = report::baseline_of(&rows, row)
            .and_then(|b| b.metric(metric))
            .map(|b| m.median() / b.median())
            .filter(|r| r.is_finite());
        bars.push(Bar {
            label: row.label(),
            median: m.median(),
            min: m.min(),
            max: m.max(),
            ratio,
            color: color_of(results, &row.name),
        });
    }
    let Some(m) = first else {
        bail!("no scenario of group {group:?} has samples of {metric:?}");
    };
    let chart = BarChart {
        title: format!("{group}: {metric}"),
        axis: format!(
            "{} ({}) — {}",
            m.name,
            m.unit,
            direction(m.higher_is_better)
        ),
        unit: m.unit.clone(),
        bars,
    };
    let height = (150 + 48 * chart.bars.len() as u32).max(320);
    render(out_dir, file_stem, (1100, height), &chart)
}

impl Chart for BarChart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        draw_bars(root, self)
    }
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &BarChart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let n = chart.bars.len() as u32;
    let label_font = font(16);
    let mut label_width = 0;
    for b in &chart.bars {
        label_width = label_width.max(root.estimate_text_size(&b.label, &label_font)?.0);
    }
    let top = chart
        .bars
        .iter()
        .map(|b| b.max.max(b.median))
        .fold(0.0, f64::max);
    // Room right of the longest whisker for its value label.
    let x_end = if top > 0.0 { top * 1.3 } else { 1.0 };
    // In hundredths of a row: row i spans [100k, 100k+100) with k = n-1-i,
    // so the first row is at the top; its label sits at 100k + 50. (Integer
    // coordinates: plotters formats key points of integers, not of f64.)
    let slot = |i: usize| 100 * (n - 1 - i as u32);
    let centres: Vec<u32> = (0..n).map(|k| 100 * k + 50).collect();
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, bold(22))
        .margin(16)
        .margin_right(30)
        .x_label_area_size(50)
        .y_label_area_size(label_width + 16)
        .build_cartesian_2d(0.0..x_end, (0..100 * n).with_key_points(centres))?;
    ctx.configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .y_label_style(label_font.clone())
        .x_label_style(font(14))
        .y_label_formatter(&|v| {
            let k = *v / 100;
            if k < n {
                chart.bars[(n - 1 - k) as usize].label.clone()
            } else {
                String::new()
            }
        })
        .x_label_formatter(&|v| fmt_tick(*v))
        .x_desc(&chart.axis)
        .axis_desc_style(font(16))
        .draw()?;

    let whisker = BLACK.stroke_width(2);
    for (i, b) in chart.bars.iter().enumerate() {
        let k = slot(i);
        let bar = Rectangle::new([(0.0, k + 14), (b.median, k + 86)], b.color.filled());
        ctx.draw_series(std::iter::once(bar))?;
        let y = k + 50;
        if b.max > b.min {
            ctx.draw_series(std::iter::once(PathElement::new(
                vec![(b.min, y), (b.max, y)],
                whisker,
            )))?;
            for x in [b.min, b.max] {
                ctx.draw_series(std::iter::once(
                    EmptyElement::at((x, y)) + PathElement::new(vec![(0, -7), (0, 7)], whisker),
                ))?;
            }
        }
        let mut text = format!("{} {}", fmt_num(b.median), chart.unit);
        if let Some(r) = b.ratio {
            text.push_str(&format!("  ×{r:.3}"));
        }
        ctx.draw_series(std::iter::once(
            EmptyElement::at((b.max.max(b.median), y))
                + Text::new(
                    text,
                    (10, 0),
                    font(15).pos(Pos::new(HPos::Left, VPos::Center)),
                ),
        ))?;
    }
    Ok(())
}

/// One point of a scale chart.
#[derive(Clone, Copy)]
struct Point {
    x: f64,
    median: f64,
    min: f64,
    max: f64,
}

struct ScaleChart {
    title: String,
    x_desc: String,
    y_desc: String,
    /// One line per data path, in run order.
    lines: Vec<(String, RGBColor, Vec<Point>)>,
}

/// One line per data path (scenario name) of `group`: the median of `metric`
/// (with its min–max range) against the numeric parameter `param`, e.g.
/// `services`, on a log axis. Rows without that parameter are left out.
/// Writes `<out_dir>/<file_stem>.png` and `.svg`.
pub fn scale_chart(
    results: &Results,
    group: &str,
    metric: &str,
    param: &str,
    out_dir: &Path,
    file_stem: &str,
) -> Result<()> {
    ensure_font()?;
    let mut lines: Vec<(String, RGBColor, Vec<Point>)> = Vec::new();
    let mut first = None;
    for row in report::group_rows(results, group) {
        let Some(m) = row.metric(metric).filter(|m| !m.samples.is_empty()) else {
            continue;
        };
        let Some(x) = param_value(row, param) else {
            continue;
        };
        first.get_or_insert(m);
        let point = Point {
            x,
            median: m.median(),
            min: m.min(),
            max: m.max(),
        };
        match lines.iter_mut().find(|(name, _, _)| *name == row.name) {
            Some((_, _, points)) => points.push(point),
            None => lines.push((row.name.clone(), color_of(results, &row.name), vec![point])),
        }
    }
    let Some(m) = first else {
        bail!("no scenario of group {group:?} has {metric:?} and a numeric {param:?}");
    };
    for (_, _, points) in &mut lines {
        points.sort_by(|a, b| a.x.total_cmp(&b.x));
    }
    let chart = ScaleChart {
        title: format!("{group}: {metric} vs {param}"),
        x_desc: format!("{param} (log scale)"),
        y_desc: format!(
            "{} ({}) — {}",
            m.name,
            m.unit,
            direction(m.higher_is_better)
        ),
        lines,
    };
    render(out_dir, file_stem, (1100, 650), &chart)
}

/// A positive numeric parameter, `1000`, `1e5` or `10k`-style.
fn param_value(row: &ScenarioResult, param: &str) -> Option<f64> {
    let v = row.params.get(param)?.trim().replace('_', "");
    let (num, mult) = match v.strip_suffix(['k', 'K']) {
        Some(n) => (n.to_string(), 1e3),
        None => match v.strip_suffix('M') {
            Some(n) => (n.to_string(), 1e6),
            None => (v, 1.0),
        },
    };
    let x = num.parse::<f64>().ok()? * mult;
    (x.is_finite() && x > 0.0).then_some(x)
}

/// An axis tick: plain digits, no trailing zeros (`0`, `2.5`, `35000`).
fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// `1`, `500`, `1k`, `10k`, `1.5M`: tick labels of a count axis.
fn fmt_count(v: f64) -> String {
    let (v, suffix) = if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{v:.1}");
    format!("{}{suffix}", s.trim_end_matches('0').trim_end_matches('.'))
}

/// The corner of the plot where the legend hides the fewest points of the
/// lines (sampled along each segment, in plot fractions).
fn legend_corner(samples: &[(f64, f64)]) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperLeft, 0.0, 1.0),
        (SeriesLabelPosition::UpperRight, 1.0, 1.0),
        (SeriesLabelPosition::LowerRight, 1.0, 0.0),
        (SeriesLabelPosition::LowerLeft, 0.0, 0.0),
    ];
    let hidden = |cx: f64, cy: f64| {
        samples
            .iter()
            .filter(|(x, y)| (x - cx).abs() < 0.4 && (y - cy).abs() < 0.4)
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|(_, cx, cy)| hidden(*cx, *cy))
        .map_or(SeriesLabelPosition::UpperLeft, |(p, _, _)| p)
}

impl Chart for ScaleChart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        draw_scale(root, self)
    }
}

fn draw_scale<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &ScaleChart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let points = chart.lines.iter().flat_map(|(_, _, p)| p);
    let (x_lo, x_hi) = points.clone().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.x), hi.max(p.x))
    });
    let y_top = points.map(|p| p.max.max(p.median)).fold(0.0, f64::max);
    // Half a decade of room on each side so end points are not on the frame.
    let (x_lo, x_hi) = (x_lo / 2.0, x_hi * 2.0);
    let y_end = if y_top > 0.0 { y_top * 1.15 } else { 1.0 };

    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, bold(22))
        .margin(16)
        .margin_right(30)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_end)?;
    ctx.configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .x_label_formatter(&|v| fmt_count(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .x_label_style(font(14))
        .y_label_style(font(14))
        .x_desc(&chart.x_desc)
        .y_desc(&chart.y_desc)
        .axis_desc_style(font(16))
        .draw()?;

    let whisker = |c: RGBColor| c.stroke_width(2);
    for (name, color, points) in &chart.lines {
        let color = *color;
        ctx.draw_series(LineSeries::new(
            points.iter().map(|p| (p.x, p.median)),
            color.stroke_width(3),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        ctx.draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.x, p.median), 5, color.filled())),
        )?;
        for p in points.iter().filter(|p| p.max > p.min) {
            ctx.draw_series(std::iter::once(PathElement::new(
                vec![(p.x, p.min), (p.x, p.max)],
                whisker(color),
            )))?;
            for y in [p.min, p.max] {
                ctx.draw_series(std::iter::once(
                    EmptyElement::at((p.x, y))
                        + PathElement::new(vec![(-5, 0), (5, 0)], whisker(color)),
                ))?;
            }
        }
    }

    // Where the lines run, in fractions of the plot, to keep the legend clear.
    let (lx_lo, lx_hi) = (x_lo.ln(), x_hi.ln());
    let frac = |x: f64, y: f64| ((x.ln() - lx_lo) / (lx_hi - lx_lo), y / y_end);
    let mut samples = Vec::new();
    for (_, _, points) in &chart.lines {
        for w in points.windows(2) {
            let (a, b) = (frac(w[0].x, w[0].median), frac(w[1].x, w[1].median));
            samples.extend((0..=20).map(|t| {
                let t = f64::from(t) / 20.0;
                (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t)
            }));
        }
        samples.extend(points.iter().map(|p| frac(p.x, p.median)));
    }
    ctx.configure_series_labels()
        .position(legend_corner(&samples))
        .margin(12)
        .legend_area_size(32)
        .label_font(font(15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    fn assert_written(dir: &Path, stem: &str) {
        let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5_000,
            "{stem}.png: {} bytes",
            png.len()
        );
        let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.len() > 2_000,
            "{stem}.svg: {} bytes",
            svg.len()
        );
        assert!(svg.contains("<text"), "{stem}.svg has no text");
    }

    #[test]
    fn renders_bar_and_scale_charts() {
        let dir = tempfile::tempdir().unwrap();
        // TERN_CHART_DIR keeps the pictures for a look.
        let keep = std::env::var_os("TERN_CHART_DIR");
        let out = keep.as_deref().map_or(dir.path(), Path::new);
        let r = sample();
        bar_chart(
            &r,
            "pod-to-pod, same node",
            "throughput 1 stream",
            out,
            "p2p-throughput",
        )
        .unwrap();
        assert_written(out, "p2p-throughput");
        bar_chart(
            &r,
            "pod -> ClusterIP -> pod",
            "throughput 1 stream",
            out,
            "svc",
        )
        .unwrap();
        assert_written(out, "svc");
        let svg = std::fs::read_to_string(out.join("svc.svg")).unwrap();
        assert!(
            svg.contains("kube-proxy iptables") && svg.contains("×0.769"),
            "{svg}"
        );
        // Bars of the service scale group, labelled with their params.
        bar_chart(&r, "service scale", "connection rate", out, "scale-bars").unwrap();
        assert_written(out, "scale-bars");
        scale_chart(
            &r,
            "service scale",
            "connection latency p50",
            "services",
            out,
            "latency",
        )
        .unwrap();
        assert_written(out, "latency");
        let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
        for label in [
            "Tern socket-LB",
            "kube-proxy nftables",
            "100k",
            "services (log scale)",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        scale_chart(
            &r,
            "service scale",
            "connection rate",
            "services",
            out,
            "rate",
        )
        .unwrap();
        assert_written(out, "rate");
        // A single row, a single sample.
        let mut one = r.clone();
        one.scenarios.truncate(1);
        one.scenarios[0].metrics[0].samples.truncate(1);
        bar_chart(
            &one,
            "pod-to-pod, same node",
            "throughput 1 stream",
            out,
            "one",
        )
        .unwrap();
        assert_written(out, "one");
    }

    #[test]
    fn missing_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample();
        let err = bar_chart(&r, "nope", "throughput 1 stream", dir.path(), "x").unwrap_err();
        assert!(err.to_string().contains("no scenario"), "{err}");
        let err = scale_chart(
            &r,
            "pod-to-pod, same node",
            "throughput 1 stream",
            "services",
            dir.path(),
            "x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("numeric"), "{err}");
    }

    #[test]
    fn helpers() {
        assert_eq!(fmt_tick(0.0), "0");
        assert_eq!(fmt_tick(5.0), "5");
        assert_eq!(fmt_tick(2.5), "2.5");
        assert_eq!(fmt_tick(35000.0), "35000");
        assert_eq!(fmt_count(1.0), "1");
        assert_eq!(fmt_count(1000.0), "1k");
        assert_eq!(fmt_count(100_000.0), "100k");
        assert_eq!(fmt_count(1_500_000.0), "1.5M");
        let mut row = report::tests::row("g", "n", None, &[("services", "10k")], vec![]);
        assert_eq!(param_value(&row, "services"), Some(10_000.0));
        row.params.insert("services".into(), "100_000".into());
        assert_eq!(param_value(&row, "services"), Some(100_000.0));
        row.params.insert("services".into(), "0".into());
        assert_eq!(param_value(&row, "services"), None);
        assert_eq!(param_value(&row, "pods"), None);
        // A line along the bottom: the legend goes up.
        let bottom: Vec<_> = (0..10).map(|i| (f64::from(i) / 10.0, 0.1)).collect();
        assert!(matches!(
            legend_corner(&bottom),
            SeriesLabelPosition::UpperLeft
        ));
    }
}
