//! The results of one `cargo xtask bench` run and what is made of them: the
//! markdown tables (absolute figures and the ratio to the baseline of the same
//! run), the raw JSON kept for comparisons across commits, and the comparison
//! of two such JSON files.
//!
//! A run is a list of [`ScenarioResult`]s, each in a *group* (one table, e.g.
//! "pod -> ClusterIP -> pod"). A row names the row of its group it is compared
//! to ([`ScenarioResult::baseline`]); every metric keeps one sample per
//! repetition, and the tables show the median with the min–max range, the
//! samples themselves, and a flag on metrics whose repetitions differ by
//! more than [`SPREAD_LIMIT`]×.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One run of the harness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// When the run started, e.g. `2026-05-01 14:03 UTC`.
    pub date: String,
    /// `git describe`/commit hash of the tree that was measured.
    pub commit: String,
    /// The exact command line, e.g. `cargo xtask bench --quick`.
    pub command: String,
    pub machine: Machine,
    /// `quick` or `full`.
    pub profile: String,
    /// How long the run took (runs before this field: not recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    pub scenarios: Vec<ScenarioResult>,
}

/// What the figures depend on, shown above the tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs this process may run on (`nproc`).
    pub cpus: usize,
    /// MemTotal of /proc/meminfo, GiB.
    pub memory_gib: f64,
}

/// One row of a table: a data path (with its parameters) and its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The table this row belongs to, e.g. `pod-to-pod, same node`,
    /// `pod -> ClusterIP -> pod`, `service scale`, `control plane`, `CNI`.
    pub group: String,
    /// The data path or implementation, e.g. `Tern socket-LB`.
    pub name: String,
    /// The row of the same group this one is compared to. Either the other
    /// row's full label (`name (k=v, ...)`, see [`ScenarioResult::label`]) or
    /// its name, which picks the row of that name with the same params, else
    /// the first row of that name. `None` for a baseline row itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// Parameters that distinguish rows of the same name, e.g. `services=1000`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    pub metrics: Vec<Metric>,
    /// The metrics whose repetitions differ by more than [`SPREAD_LIMIT`]×
    /// ([`spread_flagged`]), set by [`flag_spreads`]; a row with any is
    /// FLAGGED in the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flagged: Vec<String>,
}

impl ScenarioResult {
    /// The row label: the name, then the params in parentheses, e.g.
    /// `Tern socket-LB (services=1000)`.
    pub fn label(&self) -> String {
        if self.params.is_empty() {
            return self.name.clone();
        }
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{} ({})", self.name, params.join(", "))
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }
}

/// One measured quantity, one sample per repetition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// e.g. `throughput 1 stream`, `RR latency p99`.
    pub name: String,
    /// e.g. `Gbit/s`, `µs`, `req/s`, `ms`, `MiB`.
    pub unit: String,
    pub higher_is_better: bool,
    pub samples: Vec<f64>,
}

impl Metric {
    /// The median of the samples (the mean of the two middle ones for an even
    /// count); NaN when there are none.
    pub fn median(&self) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    /// The smallest sample; NaN when there are none.
    pub fn min(&self) -> f64 {
        self.samples
            .iter()
            .copied()
            .min_by(f64::total_cmp)
            .unwrap_or(f64::NAN)
    }

    /// The largest sample; NaN when there are none.
    pub fn max(&self) -> f64 {
        self.samples
            .iter()
            .copied()
            .max_by(f64::total_cmp)
            .unwrap_or(f64::NAN)
    }

    /// Whether the repetitions differ by more than [`SPREAD_LIMIT`]×. Only
    /// rates and medians count: a tail (p99, p99.9, max) is one or a few
    /// samples and varies by more than that on a shared machine from one
    /// repetition to the next; a stall shows in the rate as well.
    pub fn flagged(&self) -> bool {
        !self.is_tail() && spread_flagged(&self.samples)
    }

    /// A tail: p99, p99.9 or max, wherever it stands in the name
    /// (`connection latency c=1 max, port reuse ~10 s`).
    fn is_tail(&self) -> bool {
        self.name
            .split([' ', ','])
            .any(|word| word == "max" || word.starts_with("p99"))
    }

    fn direction(&self) -> &'static str {
        if self.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        }
    }
}

/// Repetitions of one metric that differ by more than this factor (largest
/// over smallest) make the row FLAGGED: its median stands for unstable
/// measurements.
pub const SPREAD_LIMIT: f64 = 2.0;

/// Whether `samples` spread by more than [`SPREAD_LIMIT`]×: max/min above
/// it, or zero next to a non-zero sample (a ratio without bound). One
/// sample, all zeros, or values that are not finite (no measurement) are
/// not flagged. Magnitudes are compared, so the sign does not matter.
pub fn spread_flagged(samples: &[f64]) -> bool {
    let values: Vec<f64> = samples
        .iter()
        .filter(|v| v.is_finite())
        .map(|v| v.abs())
        .collect();
    if values.len() < 2 {
        return false;
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    if max == 0.0 {
        return false;
    }
    min == 0.0 || max / min > SPREAD_LIMIT
}

/// Sets [`ScenarioResult::flagged`] of every row from its samples.
pub fn flag_spreads(results: &mut Results) {
    for row in &mut results.scenarios {
        row.flagged = row
            .metrics
            .iter()
            .filter(|m| m.flagged())
            .map(|m| m.name.clone())
            .collect();
    }
}

/// The facts of this machine: kernel release, CPU model, CPUs usable by this
/// process and memory. What cannot be read is `unknown` / 0.
pub fn machine_facts() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            tern_lab::host::probe(std::process::Command::new("uname").arg("-r"))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| cpu_model(&s))
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| memory_gib(&s))
        .unwrap_or(0.0);
    Machine {
        kernel,
        cpu_model,
        cpus,
        memory_gib,
    }
}

/// The CPU model of /proc/cpuinfo: `model name` on x86, else `Hardware` or
/// `CPU part` lines some other architectures have.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    for key in ["model name", "Hardware", "Processor", "cpu model"] {
        let found = cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// MemTotal of /proc/meminfo in GiB, rounded to 0.1.
fn memory_gib(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / (1024.0 * 1024.0) * 10.0).round() / 10.0)
}

/// Writes `results` as pretty JSON, creating the parent directory.
pub fn save_json(results: &Results, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut json = serde_json::to_string_pretty(results).context("cannot serialise the results")?;
    json.push('\n');
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads results written by [`save_json`].
pub fn load_json(path: &Path) -> Result<Results> {
    let json =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&json)
        .with_context(|| format!("{} is not a benchmark results file", path.display()))
}

/// The groups in the order they first appear.
pub fn groups(results: &Results) -> Vec<&str> {
    let mut groups: Vec<&str> = Vec::new();
    for s in &results.scenarios {
        if !groups.contains(&s.group.as_str()) {
            groups.push(&s.group);
        }
    }
    groups
}

/// The rows of one group, in run order.
pub fn group_rows<'a>(results: &'a Results, group: &str) -> Vec<&'a ScenarioResult> {
    results
        .scenarios
        .iter()
        .filter(|s| s.group == group)
        .collect()
}

/// The row `row` is compared to, see [`ScenarioResult::baseline`]; `None`
/// for a row without one, whose baseline is not found, or that names itself.
pub fn baseline_of<'a>(
    rows: &[&'a ScenarioResult],
    row: &ScenarioResult,
) -> Option<&'a ScenarioResult> {
    resolve_baseline(rows, row).filter(|b| !std::ptr::eq(*b, row))
}

fn resolve_baseline<'a>(
    rows: &[&'a ScenarioResult],
    row: &ScenarioResult,
) -> Option<&'a ScenarioResult> {
    let want = row.baseline.as_deref()?;
    rows.iter()
        .find(|r| r.label() == want)
        .or_else(|| {
            rows.iter()
                .find(|r| r.name == want && r.params == row.params)
        })
        .or_else(|| rows.iter().find(|r| r.name == want))
        .copied()
}

/// Metric names of a group in the order they first appear, with the first
/// one seen of each (for unit and direction).
fn group_metrics<'a>(rows: &[&'a ScenarioResult]) -> Vec<&'a Metric> {
    let mut metrics: Vec<&Metric> = Vec::new();
    for r in rows {
        for m in &r.metrics {
            if !metrics.iter().any(|x| x.name == m.name) {
                metrics.push(m);
            }
        }
    }
    metrics
}

/// A figure with three significant digits (whole numbers from 100 on).
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        // Three significant digits below 1: 0.0123, 0.123.
        let decimals = (2 - a.log10().floor() as i32).clamp(3, 9) as usize;
        format!("{v:.decimals$}")
    }
}

/// A ratio: three decimals below 10 (0.95 vs 0.98 targets), one above.
fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("×{r:.1}")
    } else {
        format!("×{r:.3}")
    }
}

/// `median (min–max)`, or the single value when there is one sample.
pub fn fmt_cell(m: &Metric) -> String {
    if m.samples.is_empty() {
        return "n/a".into();
    }
    let (med, min, max) = (m.median(), m.min(), m.max());
    if m.samples.len() == 1 || min == max {
        fmt_num(med)
    } else {
        format!("{} ({}–{})", fmt_num(med), fmt_num(min), fmt_num(max))
    }
}

/// `value / baseline` when both are usable.
fn ratio(value: f64, baseline: f64) -> Option<f64> {
    let r = value / baseline;
    (r.is_finite() && baseline != 0.0).then_some(r)
}

/// Escapes what would break a markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn machine_line(m: &Machine) -> String {
    format!(
        "Linux {}, {}, {} CPU{}, {} GiB memory",
        m.kernel,
        m.cpu_model,
        m.cpus,
        if m.cpus == 1 { "" } else { "s" },
        fmt_num(m.memory_gib)
    )
}

/// `n = 5`, or `n = 3–5` when metrics were repeated a different number of
/// times.
fn repetitions(results: &Results) -> String {
    let counts = results
        .scenarios
        .iter()
        .flat_map(|s| &s.metrics)
        .map(|m| m.samples.len())
        .filter(|&n| n > 0);
    let (lo, hi) = counts.fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    match (lo, hi) {
        (usize::MAX, _) => "no samples".into(),
        (lo, hi) if lo == hi => format!("n = {lo}"),
        (lo, hi) => format!("n = {lo}–{hi}"),
    }
}

/// What marks a flagged metric and row ([`spread_flagged`]).
pub const FLAG: &str = "⚠";

/// The report of one run: machine facts, command and date on top, then one
/// table per group with a row per scenario and a column per metric. A cell is
/// `median (min–max)`; a row with a baseline also gets `×ratio`, its median
/// divided by the baseline row's (the header says which direction is better).
/// A metric whose repetitions spread by more than [`SPREAD_LIMIT`]× gets
/// [`FLAG`], its row `FLAGGED`, with a note under the table; with more than
/// one repetition, every sample follows in run order (collapsed).
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Tern network benchmark\n");
    let _ = writeln!(out, "- Date: {}", results.date);
    let _ = writeln!(out, "- Commit: `{}`", results.commit);
    let _ = writeln!(out, "- Command: `{}`", results.command);
    let _ = writeln!(out, "- Profile: {}", results.profile);
    let _ = writeln!(out, "- Machine: {}", machine_line(&results.machine));
    let _ = writeln!(
        out,
        "\nEach cell is the median over the repetitions ({}) with the min–max \
         range in parentheses. `×r` is the row's median divided by the median \
         of its baseline row, measured in the same run: above 1 is better for a \
         \"higher is better\" column, below 1 for a \"lower is better\" one. \
         Rows of a group run their repetitions interleaved (the baseline's first, \
         then each row's, round after round), so drift of the machine hits them \
         alike. {FLAG} marks a metric whose repetitions differ by more than \
         {SPREAD_LIMIT}× (largest / smallest, or zero next to non-zero); its row \
         is FLAGGED.",
        repetitions(results)
    );
    for group in groups(results) {
        let rows = group_rows(results, group);
        let metrics = group_metrics(&rows);
        let _ = writeln!(out, "\n## {group}\n");
        let mut header = String::from("| Scenario |");
        let mut rule = String::from("| --- |");
        for m in &metrics {
            let _ = write!(
                header,
                " {} ({}, {}) |",
                cell(&m.name),
                cell(&m.unit),
                m.direction()
            );
            rule.push_str(" ---: |");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for row in &rows {
            let base = baseline_of(&rows, row);
            let mut label = cell(&row.label());
            let compared_to = rows
                .iter()
                .any(|r| baseline_of(&rows, r).is_some_and(|b| std::ptr::eq(b, *row)));
            if compared_to {
                label.push_str(" (baseline)");
            }
            if row.metrics.iter().any(Metric::flagged) {
                let _ = write!(label, " **{FLAG} FLAGGED**");
            }
            let mut line = format!("| {label} |");
            for m in &metrics {
                let text = match row.metric(&m.name) {
                    None => "—".to_string(),
                    Some(value) => {
                        let mut text = fmt_cell(value);
                        let r = base
                            .and_then(|b| b.metric(&m.name))
                            .and_then(|b| ratio(value.median(), b.median()));
                        if let Some(r) = r {
                            let _ = write!(text, " {}", fmt_ratio(r));
                        }
                        if value.flagged() {
                            let _ = write!(text, " {FLAG}");
                        }
                        text
                    }
                };
                let _ = write!(line, " {text} |");
            }
            let _ = writeln!(out, "{line}");
        }
        // What the ratios are against, once per distinct baseline.
        let mut against: Vec<String> = Vec::new();
        for r in &rows {
            let Some(b) = baseline_of(&rows, r) else {
                continue;
            };
            let text = if b.params == r.params && !r.params.is_empty() {
                format!("{} (same params)", cell(&b.name))
            } else {
                cell(&b.label())
            };
            if !against.contains(&text) {
                against.push(text);
            }
        }
        if !against.is_empty() {
            let _ = writeln!(out, "\nRatios against: {}.", against.join("; "));
        }
        let missing: Vec<String> = rows
            .iter()
            .filter(|r| r.baseline.is_some() && resolve_baseline(&rows, r).is_none())
            .map(|r| cell(&r.label()))
            .collect();
        if !missing.is_empty() {
            let _ = writeln!(out, "\nBaseline row not found for: {}.", missing.join(", "));
        }
        let flagged: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                let names: Vec<&str> = r
                    .metrics
                    .iter()
                    .filter(|m| m.flagged())
                    .map(|m| m.name.as_str())
                    .collect();
                (!names.is_empty())
                    .then(|| format!("{} ({})", cell(&r.label()), cell(&names.join(", "))))
            })
            .collect();
        if !flagged.is_empty() {
            let _ = writeln!(
                out,
                "\n**{FLAG} FLAGGED** — repetitions differ by more than {SPREAD_LIMIT}×, \
                 so the median stands for unstable measurements (a stall, a \
                 retry, a noisy neighbour); see the values per repetition \
                 below: {}.",
                flagged.join("; ")
            );
        }
        out.push_str(&repetition_details(&rows, &metrics));
    }
    out
}

/// Every sample of every row and metric of a group in run order, in a
/// collapsed block; empty when no metric was repeated.
fn repetition_details(rows: &[&ScenarioResult], metrics: &[&Metric]) -> String {
    if rows
        .iter()
        .all(|r| r.metrics.iter().all(|m| m.samples.len() < 2))
    {
        return String::new();
    }
    let mut out = String::from(
        "\n<details><summary>Values per repetition, in run order</summary>\n\n\
         | Scenario | Metric | Repetitions |\n| --- | --- | --- |\n",
    );
    for row in rows {
        for name in metrics.iter().map(|m| &m.name) {
            let Some(m) = row.metric(name) else { continue };
            let values: Vec<String> = m.samples.iter().map(|&v| fmt_num(v)).collect();
            let flag = if m.flagged() {
                format!(" {FLAG}")
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {} ({}) | {}{flag} |",
                cell(&row.label()),
                cell(&m.name),
                cell(&m.unit),
                values.join(", ")
            );
        }
    }
    out.push_str("\n</details>\n");
    out
}

/// Old and new medians of every metric of every scenario, and the change in
/// percent. Rows are matched by group, label and metric name; rows in only
/// one of the runs are listed with `—` on the other side.
pub fn compare_markdown(old: &Results, new: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Tern network benchmark: comparison\n");
    let _ = writeln!(out, "| | Old | New |\n| --- | --- | --- |");
    let _ = writeln!(out, "| Date | {} | {} |", cell(&old.date), cell(&new.date));
    let _ = writeln!(
        out,
        "| Commit | `{}` | `{}` |",
        cell(&old.commit),
        cell(&new.commit)
    );
    let _ = writeln!(
        out,
        "| Profile | {} | {} |",
        cell(&old.profile),
        cell(&new.profile)
    );
    let _ = writeln!(
        out,
        "| Machine | {} | {} |",
        cell(&machine_line(&old.machine)),
        cell(&machine_line(&new.machine))
    );
    if old.machine != new.machine {
        let _ = writeln!(
            out,
            "\n**The runs were made on different machines: the changes compare \
             machines as much as commits.**"
        );
    }
    let _ = writeln!(
        out,
        "\nMedians; change = (new − old) / old. \"better\"/\"worse\" follows each \
         metric's direction; changes within ±1 % are marked \"same\"."
    );

    // Every group of either run, new's order first.
    let mut all_groups = groups(new);
    for g in groups(old) {
        if !all_groups.contains(&g) {
            all_groups.push(g);
        }
    }
    for group in all_groups {
        let _ = writeln!(out, "\n## {group}\n");
        let _ = writeln!(
            out,
            "| Scenario | Metric | Old | New | Change |\n| --- | --- | ---: | ---: | ---: |"
        );
        let new_rows = group_rows(new, group);
        let old_rows = group_rows(old, group);
        // (label, metric name) pairs: new's order, then those only in old.
        let mut keys: Vec<(String, String)> = Vec::new();
        for r in new_rows.iter().chain(&old_rows) {
            for m in &r.metrics {
                let key = (r.label(), m.name.clone());
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        let find = |rows: &[&ScenarioResult], label: &str, metric: &str| -> Option<Metric> {
            rows.iter()
                .find(|r| r.label() == label)
                .and_then(|r| r.metric(metric))
                .cloned()
        };
        for (label, metric) in keys {
            let o = find(&old_rows, &label, &metric);
            let n = find(&new_rows, &label, &metric);
            let Some(m) = n.as_ref().or(o.as_ref()) else {
                continue;
            };
            let fmt = |x: &Option<Metric>| {
                x.as_ref().map_or("—".to_string(), |x| {
                    format!("{} {}", fmt_num(x.median()), x.unit)
                })
            };
            let change = match (&o, &n) {
                (Some(o), Some(n)) => match ratio(n.median() - o.median(), o.median()) {
                    Some(c) => {
                        let pct = c * 100.0;
                        let verdict = if pct.abs() < 1.0 {
                            "same"
                        } else if (pct > 0.0) == m.higher_is_better {
                            "better"
                        } else {
                            "worse"
                        };
                        format!("{pct:+.1} % ({verdict})")
                    }
                    None => "n/a".into(),
                },
                (None, Some(_)) => "new".into(),
                (Some(_), None) => "gone".into(),
                (None, None) => "n/a".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                cell(&label),
                cell(&metric),
                fmt(&o),
                fmt(&n),
                change
            );
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn metric(name: &str, unit: &str, higher: bool, samples: &[f64]) -> Metric {
        Metric {
            name: name.into(),
            unit: unit.into(),
            higher_is_better: higher,
            samples: samples.to_vec(),
        }
    }

    pub(crate) fn row(
        group: &str,
        name: &str,
        baseline: Option<&str>,
        params: &[(&str, &str)],
        metrics: Vec<Metric>,
    ) -> ScenarioResult {
        ScenarioResult {
            group: group.into(),
            name: name.into(),
            baseline: baseline.map(Into::into),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            metrics,
            flagged: Vec::new(),
        }
    }

    /// A small run with every kind of group the harness makes.
    pub(crate) fn sample() -> Results {
        let p2p = "pod-to-pod, same node";
        let svc = "pod -> ClusterIP -> pod";
        let scale = "service scale";
        let mut scenarios = vec![
            row(
                p2p,
                "physical limit (veth)",
                None,
                &[],
                vec![
                    metric(
                        "throughput 1 stream",
                        "Gbit/s",
                        true,
                        &[40.0, 42.0, 41.0, 39.0, 43.0],
                    ),
                    metric(
                        "RR latency p50",
                        "µs",
                        false,
                        &[20.0, 21.0, 19.0, 20.5, 20.0],
                    ),
                ],
            ),
            row(
                p2p,
                "Tern eBPF redirect",
                Some("physical limit (veth)"),
                &[],
                vec![
                    metric(
                        "throughput 1 stream",
                        "Gbit/s",
                        true,
                        &[39.0, 38.0, 40.0, 37.0, 41.0],
                    ),
                    metric(
                        "RR latency p50",
                        "µs",
                        false,
                        &[21.0, 22.0, 20.0, 21.0, 21.5],
                    ),
                ],
            ),
            row(
                svc,
                "direct pod IP",
                None,
                &[],
                vec![metric(
                    "throughput 1 stream",
                    "Gbit/s",
                    true,
                    &[38.0, 39.0, 40.0],
                )],
            ),
            row(
                svc,
                "Tern socket-LB",
                Some("direct pod IP"),
                &[],
                vec![metric(
                    "throughput 1 stream",
                    "Gbit/s",
                    true,
                    &[37.5, 38.5, 39.0],
                )],
            ),
            row(
                svc,
                "kube-proxy iptables",
                Some("direct pod IP"),
                &[],
                vec![metric(
                    "throughput 1 stream",
                    "Gbit/s",
                    true,
                    &[30.0, 31.0, 29.0],
                )],
            ),
        ];
        for (path, grow) in [
            ("Tern socket-LB", 0.0),
            ("Tern per-packet", 0.01),
            ("kube-proxy iptables", 0.5),
            ("kube-proxy nftables", 0.05),
        ] {
            for (i, n) in ["1", "1000", "10000", "100000"].into_iter().enumerate() {
                let base = 30.0 * (1.0 + grow * (i as f64).powi(2));
                scenarios.push(row(
                    scale,
                    path,
                    Some("Tern socket-LB"),
                    &[("services", n)],
                    vec![
                        metric(
                            "connection latency p50",
                            "µs",
                            false,
                            &[base, base * 1.05, base * 0.97],
                        ),
                        metric(
                            "connection rate",
                            "conn/s",
                            true,
                            &[1e6 / base, 1e6 / base * 1.02, 1e6 / base * 0.98],
                        ),
                    ],
                ));
            }
        }
        Results {
            date: "2026-05-01 12:00 UTC".into(),
            commit: "a9ba2a4".into(),
            command: "cargo xtask bench --quick".into(),
            machine: Machine {
                kernel: "6.12.0-test".into(),
                cpu_model: "Test CPU @ 3.0GHz".into(),
                cpus: 2,
                memory_gib: 23.4,
            },
            profile: "quick".into(),
            seconds: None,
            scenarios,
        }
    }

    #[test]
    fn median_min_max() {
        let odd = metric("m", "ms", false, &[5.0, 1.0, 3.0]);
        assert_eq!(odd.median(), 3.0);
        assert_eq!(odd.min(), 1.0);
        assert_eq!(odd.max(), 5.0);
        let even = metric("m", "ms", false, &[4.0, 1.0, 3.0, 10.0]);
        assert_eq!(even.median(), 3.5);
        assert_eq!(even.min(), 1.0);
        assert_eq!(even.max(), 10.0);
        let one = metric("m", "ms", false, &[2.5]);
        assert_eq!((one.median(), one.min(), one.max()), (2.5, 2.5, 2.5));
        let none = metric("m", "ms", false, &[]);
        assert!(none.median().is_nan() && none.min().is_nan() && none.max().is_nan());
        // The samples keep their run order.
        assert_eq!(even.samples, vec![4.0, 1.0, 3.0, 10.0]);
    }

    #[test]
    fn number_formatting() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(123456.7), "123457");
        assert_eq!(fmt_num(41.04), "41.0");
        assert_eq!(fmt_num(9.876), "9.88");
        assert_eq!(fmt_num(0.1234), "0.123");
        assert_eq!(fmt_num(0.01234), "0.0123");
        assert_eq!(fmt_num(f64::NAN), "n/a");
        assert_eq!(fmt_ratio(0.95), "×0.950");
        assert_eq!(fmt_ratio(12.34), "×12.3");
    }

    #[test]
    fn markdown_tables() {
        let md = markdown(&sample());
        // Facts on top.
        assert!(
            md.contains("- Command: `cargo xtask bench --quick`"),
            "{md}"
        );
        assert!(md.contains("- Date: 2026-05-01 12:00 UTC"));
        assert!(md.contains("Linux 6.12.0-test, Test CPU @ 3.0GHz, 2 CPUs, 23.4 GiB memory"));
        assert!(md.contains("(n = 3–5)"));
        // One table per group, in run order.
        let a = md.find("## pod-to-pod, same node").unwrap();
        let b = md.find("## pod -> ClusterIP -> pod").unwrap();
        let c = md.find("## service scale").unwrap();
        assert!(a < b && b < c);
        assert!(md.contains(
            "| Scenario | throughput 1 stream (Gbit/s, higher is better) \
             | RR latency p50 (µs, lower is better) |"
        ));
        // Baseline row: no ratio.
        assert!(
            md.contains(
                "| physical limit (veth) (baseline) | 41.0 (39.0–43.0) | 20.0 (19.0–21.0) |"
            ),
            "{md}"
        );
        // 39/41 and 21/20.
        assert!(md.contains(
            "| Tern eBPF redirect | 39.0 (37.0–41.0) ×0.951 | 21.0 (20.0–22.0) ×1.050 |"
        ));
        assert!(md.contains("| kube-proxy iptables | 30.0 (29.0–31.0) ×0.769 |"));
        // Params in the label, baseline matched on the same params.
        // A row naming itself is a baseline row.
        assert!(
            md.contains(
                "| Tern socket-LB (services=1000) (baseline) | 30.0 (29.1–31.5) \
                 | 33333 (32667–34000) |"
            ),
            "{md}"
        );
        assert!(!md.contains("not found"));
        assert!(md.contains("| kube-proxy iptables (services=100000) | 165 (160–173) ×5.500 |"));
        assert!(md.contains("Ratios against: Tern socket-LB (same params)."));
        assert!(md.contains("Ratios against: direct pod IP."));
    }

    #[test]
    fn markdown_baseline_by_label_and_missing() {
        let mut r = sample();
        r.scenarios.retain(|s| s.group == "service scale");
        for s in &mut r.scenarios {
            s.baseline = (s.params["services"] != "1").then(|| format!("{} (services=1)", s.name));
        }
        r.scenarios.push(row(
            "service scale",
            "orphan",
            Some("nobody"),
            &[],
            vec![metric("connection rate", "conn/s", true, &[1.0])],
        ));
        let md = markdown(&r);
        // iptables at 100k services against itself at 1 service: 165/30.
        assert!(
            md.contains("| kube-proxy iptables (services=100000) | 165 (160–173) ×5.500 |"),
            "{md}"
        );
        assert!(md.contains("| kube-proxy iptables (services=1) (baseline) | 30.0 (29.1–31.5) |"));
        assert!(md.contains("| orphan | — | 1.00 |"));
        assert!(md.contains("Baseline row not found for: orphan."));
    }

    #[test]
    fn spread_flag() {
        assert!(!spread_flagged(&[]));
        assert!(!spread_flagged(&[5.0]));
        assert!(!spread_flagged(&[0.0, 0.0, 0.0]));
        assert!(!spread_flagged(&[10.0, 20.0])); // exactly 2×: not more
        assert!(spread_flagged(&[10.0, 20.1]));
        assert!(spread_flagged(&[6000.0, 50.0, 5900.0]));
        // Zero next to non-zero: no bound on the ratio.
        assert!(spread_flagged(&[0.0, 1.0]));
        assert!(spread_flagged(&[3.0, 0.0, 3.0]));
        // Not measured (NaN) is not a spread; the rest still counts.
        assert!(!spread_flagged(&[f64::NAN, 4.0]));
        assert!(spread_flagged(&[f64::NAN, 4.0, 1.0]));
        assert!(!spread_flagged(&[-2.0, -3.0]));
        let metric = |name: &str| Metric {
            name: name.into(),
            unit: "ms".into(),
            higher_is_better: false,
            samples: vec![1.0, 3.0],
        };
        assert!(metric("connection latency c=1 p50").flagged());
        assert!(!metric("connection latency c=1 p99").flagged());
        assert!(!metric("connection latency c=1 max").flagged());
        assert!(!metric("connection latency c=1 max, port reuse ~10 s").flagged());
        assert!(metric("connections/s c=1, port reuse ~10 s").flagged());
    }

    #[test]
    fn flagged_rows_and_repetitions() {
        let mut r = sample();
        r.scenarios.retain(|s| s.group == "pod -> ClusterIP -> pod");
        r.scenarios[1].metrics.push(metric(
            "connections/s c=1",
            "conn/s",
            true,
            &[6000.0, 50.0, 5900.0],
        ));
        r.scenarios[0].metrics.push(metric(
            "connections/s c=1",
            "conn/s",
            true,
            &[6100.0, 6050.0, 6200.0],
        ));
        flag_spreads(&mut r);
        assert_eq!(r.scenarios[1].flagged, vec!["connections/s c=1"]);
        assert!(r.scenarios[0].flagged.is_empty());
        let md = markdown(&r);
        // The row and the cell carry the flag; the median alone would hide
        // the stalled repetition.
        assert!(
            md.contains(
                "| Tern socket-LB **⚠ FLAGGED** | 38.5 (37.5–39.0) ×0.987 \
                 | 5900 (50.0–6000) ×0.967 ⚠ |"
            ),
            "{md}"
        );
        assert!(md.contains("| direct pod IP (baseline) | 39.0 (38.0–40.0) | 6100 (6050–6200) |"));
        assert!(md.contains(
            "**⚠ FLAGGED** — repetitions differ by more than 2×, so the median \
             stands for unstable measurements"
        ));
        assert!(md.contains(": Tern socket-LB (connections/s c=1)."), "{md}");
        // Every sample, in run order.
        assert!(md.contains("<details><summary>Values per repetition, in run order</summary>"));
        assert!(
            md.contains("| Tern socket-LB | connections/s c=1 (conn/s) | 6000, 50.0, 5900 ⚠ |")
        );
        assert!(md.contains("| direct pod IP | throughput 1 stream (Gbit/s) | 38.0, 39.0, 40.0 |"));
        // In the JSON too.
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""flagged":["connections/s c=1"]"#),
            "{json}"
        );
        // One repetition: nothing to flag, no per-repetition block.
        let mut one = r.clone();
        for s in &mut one.scenarios {
            for m in &mut s.metrics {
                m.samples.truncate(1);
            }
        }
        let md = markdown(&one);
        assert!(
            !md.contains("**⚠ FLAGGED**") && !md.contains("<details>"),
            "{md}"
        );
    }

    #[test]
    fn json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs/run.json");
        let results = sample();
        save_json(&results, &path).unwrap();
        let back = load_json(&path).unwrap();
        assert_eq!(back, results);
        // Optional fields may be left out by hand-written files.
        std::fs::write(
            &path,
            r#"{"date":"d","commit":"c","command":"x","profile":"quick",
                "machine":{"kernel":"k","cpu_model":"m","cpus":1,"memory_gib":1.0},
                "scenarios":[{"group":"g","name":"n","metrics":[]}]}"#,
        )
        .unwrap();
        let r = load_json(&path).unwrap();
        assert_eq!(r.scenarios[0].baseline, None);
        assert!(r.scenarios[0].params.is_empty());
        std::fs::write(&path, "{}").unwrap();
        let err = format!("{:#}", load_json(&path).unwrap_err());
        assert!(err.contains("is not a benchmark results file"), "{err}");
    }

    #[test]
    fn compare() {
        let old = sample();
        let mut new = sample();
        new.commit = "b000000".into();
        for s in &mut new.scenarios {
            for m in &mut s.metrics {
                if s.name == "Tern eBPF redirect" && m.name == "throughput 1 stream" {
                    m.samples = vec![41.0, 41.0, 41.0]; // 39 -> 41: +5.1 %
                }
                if s.name == "Tern eBPF redirect" && m.name == "RR latency p50" {
                    m.samples = vec![23.1]; // 21 -> 23.1: +10 %, worse
                }
            }
        }
        new.scenarios.retain(|s| s.name != "kube-proxy nftables");
        new.scenarios.push(row(
            "CNI",
            "Tern ADD",
            None,
            &[],
            vec![metric("ADD p50", "ms", false, &[3.0])],
        ));
        let md = compare_markdown(&old, &new);
        assert!(md.contains("| Commit | `a9ba2a4` | `b000000` |"), "{md}");
        assert!(!md.contains("different machines"));
        assert!(md.contains(
            "| Tern eBPF redirect | throughput 1 stream | 39.0 Gbit/s | 41.0 Gbit/s | +5.1 % (better) |"
        ));
        assert!(md.contains(
            "| Tern eBPF redirect | RR latency p50 | 21.0 µs | 23.1 µs | +10.0 % (worse) |"
        ));
        assert!(md.contains(
            "| physical limit (veth) | RR latency p50 | 20.0 µs | 20.0 µs | +0.0 % (same) |"
        ));
        assert!(md.contains(
            "| kube-proxy nftables (services=1) | connection rate | 33333 conn/s | — | gone |"
        ));
        assert!(md.contains("## CNI"));
        assert!(md.contains("| Tern ADD | ADD p50 | — | 3.00 ms | new |"));
        let mut moved = new.clone();
        moved.machine.cpus = 8;
        assert!(compare_markdown(&old, &moved).contains("different machines"));
    }

    #[test]
    fn proc_parsing() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(
            cpu_model(cpuinfo).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert_eq!(
            memory_gib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(23.4)
        );
        let m = machine_facts();
        assert!(
            m.cpus >= 1 && m.memory_gib > 0.0 && m.kernel != "unknown",
            "{m:?}"
        );
    }
}
