//! A description of the machine a run happened on.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// What the results depend on, besides the code.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// The CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory in GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// Filesystem type and device of the work directory (where the targets are written).
    pub filesystem: String,
    /// `postgres --version`.
    pub postgres: String,
    /// `pg_basebackup --version`.
    pub pg_basebackup: String,
    /// The checkout's commit, with `-dirty` when there are uncommitted changes.
    pub git_commit: String,
    /// /proc/loadavg when the description was taken (other work on the machine skews
    /// the timings).
    pub load_average: String,
}

/// The first three fields of /proc/loadavg.
pub fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn command_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The filesystem holding `path`, from /proc/self/mountinfo (longest mount point prefix).
pub fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in read("/proc/self/mountinfo").lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount_point), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        if path.starts_with(mount_point) && best.as_ref().is_none_or(|b| mount_point.len() >= b.0) {
            best = Some((mount_point.len(), format!("{fstype} on {source}")));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "unknown".into())
}

/// Describes this machine; `work_dir` is where targets are written, `bin_dir` holds
/// the PostgreSQL binaries, `repo` is the checkout.
pub fn describe(work_dir: &Path, bin_dir: &Path, repo: &Path) -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let commit = command_line(
        Path::new("git"),
        &[
            "-C",
            &repo.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !command_line(
        Path::new("git"),
        &["-C", &repo.to_string_lossy(), "status", "--porcelain"],
    )
    .is_empty();
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        memory_gib,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        filesystem: filesystem_of(work_dir),
        postgres: command_line(&bin_dir.join("postgres"), &["--version"]),
        pg_basebackup: command_line(&bin_dir.join("pg_basebackup"), &["--version"]),
        load_average: load_average(),
        git_commit: if dirty {
            format!("{commit}-dirty")
        } else {
            commit
        },
    }
}
