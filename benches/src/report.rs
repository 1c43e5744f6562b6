//! The markdown rendering of a [`Report`].

use std::fmt::Write;

use crate::harness::{transfer_summary, Case, CaseReport, Report, ToolSummary};
use crate::stats::Summary;

/// `median (min–max)` with `digits` decimals; the median alone for one sample, `–` for
/// none.
pub(crate) fn med_range(s: Option<Summary>, digits: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits),
        Some(s) => format!("{:.d$}", s.median, d = digits),
        None => "–".into(),
    }
}

fn med(s: Option<Summary>, digits: usize) -> String {
    s.map(|s| format!("{:.d$}", s.median, d = digits))
        .unwrap_or_else(|| "–".into())
}

fn of_limit(limit_s: Option<f64>, side: &ToolSummary) -> String {
    match (limit_s, side.wall_s) {
        (Some(limit), Some(wall)) if wall.median > 0.0 => {
            format!("{:.0} %", 100.0 * limit / wall.median)
        }
        _ => "–".into(),
    }
}

fn side_row(out: &mut String, case: &CaseReport, name: &str, side: &ToolSummary) {
    let status = if side.runs == 0 {
        "not run".to_string()
    } else {
        format!("{}/{}", side.ok_runs, side.runs)
    };
    let _ = writeln!(
        out,
        "| {} | {name} | {status} | {} | {} | {} | {} | {} | {} |",
        case.case.id(),
        med_range(side.wall_s, 2),
        med_range(side.cpu_s, 2),
        med(side.rss_mib, 0),
        med(side.mb_per_s, 0),
        med(side.output_mb, 0),
        of_limit(case.limit_s, side),
    );
}

/// Targets of issue 6 that the harness measures: (target, measured, met).
pub fn targets(report: &Report) -> Vec<(String, String, bool)> {
    let find = |case: Case| report.cases.iter().find(|c| c.case == case);
    let ratio_row =
        |case: Case, what: &str, limit: f64, pick: &dyn Fn(&CaseReport) -> Option<Summary>| {
            let value = find(case).and_then(pick).map(|s| s.median);
            (
                format!("{what} ≤ {limit} × reference"),
                value
                    .map(|v| format!("{v:.2} ×"))
                    .unwrap_or_else(|| "not measured".into()),
                value.is_some_and(|v| v <= limit),
            )
        };
    let rss = find(Case::Plain)
        .and_then(|c| c.ours.rss_mib)
        .map(|s| s.max);
    vec![
        ratio_row(Case::Plain, "durable plain clone: wall", 0.75, &|c| {
            c.ratio_wall
        }),
        ratio_row(Case::Plain, "durable plain clone: client CPU", 0.8, &|c| {
            c.ratio_cpu
        }),
        (
            "durable plain clone: peak RSS ≤ 64 MiB".into(),
            rss.map(|v| format!("{v:.0} MiB (largest run)"))
                .unwrap_or_else(|| "not measured".into()),
            rss.is_some_and(|v| v <= 64.0),
        ),
        ratio_row(Case::NoSync, "no-sync plain clone: wall", 0.9, &|c| {
            c.ratio_wall
        }),
        ratio_row(Case::Wal, "WAL catch-up, CRC checked: wall", 0.8, &|c| {
            c.ratio_wall
        }),
    ]
}

/// Renders the report as markdown.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let s = &report.settings;
    let _ = writeln!(out, "## Comparison run of {}\n", report.started_utc);
    let _ = writeln!(out, "Command: `{}`\n", report.command_line);
    let _ = writeln!(
        out,
        "Machine: {} × {}, {:.1} GiB RAM, Linux {}, targets on {}; {}; {}; checkout {}.\n",
        m.nproc,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.filesystem,
        m.postgres,
        m.pg_basebackup,
        m.git_commit
    );
    let wal = report
        .cases
        .iter()
        .find(|c| c.case == Case::Wal)
        .map(|c| format!(" WAL case streams {:.0} MB.", c.payload_bytes as f64 / 1e6))
        .unwrap_or_default();
    let order = if report.cases.is_empty() {
        ""
    } else {
        " A B then B A alternating."
    };
    let _ = writeln!(
        out,
        "Source: pgbench scale {} at `{}`, loopback TCP. {} round(s).{order}{wal} \
         Setup {:.0} s, total {:.0} s. Priority: {}.\n",
        s.scale,
        report.source_data_dir.display(),
        s.rounds,
        report.setup_s,
        report.total_s,
        s.priority
    );

    if report.cases.is_empty() {
        repo_section(&mut out, report);
        return out;
    }
    let _ = writeln!(out, "### Limits (measured in this run, once per round)\n");
    let _ = writeln!(
        out,
        "| limit | wall s, median (range) | MB/s, median (range) |"
    );
    let _ = writeln!(out, "|---|---|---|");
    let l = &report.limits;
    for (name, samples) in [
        ("server raw send: BASE_BACKUP thrown away", &l.raw_send),
        ("server raw send with server-side zstd", &l.raw_send_zstd),
        (
            "server raw WAL send: the WAL range thrown away",
            &l.raw_wal_send,
        ),
        ("disk: buffered 1 MiB writes + fsync", &l.disk_buffered),
        (
            "disk: buffered, sync_file_range every 8 MiB, + fsync",
            &l.disk_early_writeback,
        ),
        ("disk: O_DIRECT 1 MiB writes + fsync", &l.disk_direct),
    ] {
        if samples.is_empty() {
            continue;
        }
        let (wall, rate) = transfer_summary(samples);
        let _ = writeln!(
            out,
            "| {name} ({:.0} MB) | {} | {} |",
            samples[0].bytes as f64 / 1e6,
            med_range(wall, 2),
            med_range(rate, 0)
        );
    }
    for e in &l.errors {
        let _ = writeln!(out, "\nLimit measurement failed: {e}");
    }

    let _ = writeln!(
        out,
        "\n### Per tool (successful runs; median, range in brackets)\n"
    );
    let _ = writeln!(
        out,
        "| case | tool | ok | wall s | CPU s (user+sys) | peak RSS MiB | MB/s | output MB | limit ÷ wall |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for case in &report.cases {
        side_row(&mut out, case, "clone-standby", &case.ours);
        let reference = if case.case == Case::Wal {
            "pg_receivewal"
        } else {
            "pg_basebackup"
        };
        side_row(&mut out, case, reference, &case.reference);
    }

    let _ = writeln!(
        out,
        "\n### Ours ÷ reference, pair by pair (median, range in brackets; < 1 is better)\n"
    );
    let _ = writeln!(
        out,
        "| case | wall | CPU | peak RSS | pairs | limit basis |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for case in &report.cases {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            case.title,
            med_range(case.ratio_wall, 2),
            med_range(case.ratio_cpu, 2),
            med_range(case.ratio_rss, 2),
            case.ratio_wall.map(|s| s.n).unwrap_or(0),
            match case.limit_s {
                Some(l) => format!("{l:.2} s: {}", case.limit_basis),
                None => "–".into(),
            }
        );
    }

    let _ = writeln!(out, "\n### Targets of issue 6 measured here\n");
    let _ = writeln!(out, "| target | measured | met |");
    let _ = writeln!(out, "|---|---|---|");
    for (what, measured, met) in targets(report) {
        let _ = writeln!(
            out,
            "| {what} | {measured} | {} |",
            if met { "yes" } else { "no" }
        );
    }

    let _ = writeln!(out, "\n### Commands and checks\n");
    for case in &report.cases {
        let _ = writeln!(out, "- {}:", case.title);
        let _ = writeln!(out, "  - ours: `{}`", case.ours.command);
        let _ = writeln!(out, "  - reference: `{}`", case.reference.command);
        for side in [&case.ours, &case.reference] {
            if let Some(e) = &side.first_error {
                let _ = writeln!(out, "  - failure: {e}");
            }
        }
        for check in &case.checks {
            let _ = writeln!(out, "  - check: {check}");
        }
    }
    let _ = writeln!(
        out,
        "\nMB/s is the case's payload (the base backup stream, {:.0} MB; or the WAL range) \
         over wall time. \"limit ÷ wall\" is the fastest the case could go on this machine \
         (see limit basis) over the tool's median wall time.",
        report
            .cases
            .iter()
            .find(|c| c.case != Case::Wal)
            .map(|c| c.payload_bytes as f64 / 1e6)
            .unwrap_or(0.0)
    );
    repo_section(&mut out, report);
    out
}

fn repo_section(out: &mut String, report: &Report) {
    if let Some(repo) = &report.repo {
        let _ = writeln!(out);
        out.push_str(&crate::repo::markdown(repo, report.settings.rounds));
    }
    if let Some(e) = &report.repo_error {
        let _ = writeln!(
            out,
            "\n### Object storage\n\nThe object-storage cases could not run: {e}"
        );
    }
    if let Some(wal) = &report.wal_store {
        let _ = writeln!(out);
        out.push_str(&crate::walbench::markdown(wal));
    }
    if let Some(e) = &report.wal_store_error {
        let _ = writeln!(
            out,
            "\n### WAL archive in object storage\n\nThe WAL-archive cases could not run: {e}"
        );
    }
    if let Some(incremental) = &report.incremental {
        let _ = writeln!(out);
        out.push_str(&crate::incremental::markdown(incremental));
    }
    if let Some(e) = &report.incremental_error {
        let _ = writeln!(
            out,
            "\n### Incremental backup and chain restore\n\nThe incremental case could not run: {e}"
        );
    }
}
