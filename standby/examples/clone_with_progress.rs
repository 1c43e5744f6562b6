//! Clones a standby through the library API, reporting progress through a callback,
//! then prints where it starts and ends. Ctrl-C stops it and removes what it wrote.
//!
//! ```text
//! cargo run -p standby --example clone_with_progress -- "host=primary user=replicator" /srv/standby
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use standby::clone::{clone, CloneEvent, CloneOptions, CloneSummary};

/// Clones `conninfo`'s server into `target`; returns the summary and how many progress
/// reports the callback received.
pub async fn clone_with_progress(
    conninfo: &str,
    target: &Path,
) -> standby::Result<(CloneSummary, u64)> {
    let source = pgwire_repl::Config::parse_with_env(conninfo)?;
    let options = CloneOptions::new(source, target);
    let reports = Arc::new(AtomicU64::new(0));
    let counter = reports.clone();
    let events = Box::new(move |event: CloneEvent| match event {
        CloneEvent::Started {
            start_lsn,
            timeline,
        } => {
            eprintln!("backup started at {start_lsn} on timeline {timeline}")
        }
        CloneEvent::Progress { done, total } => {
            counter.fetch_add(1, Ordering::Relaxed);
            match total {
                Some(total) => eprintln!("{} of ~{} MB", done >> 20, total >> 20),
                None => eprintln!("{} MB", done >> 20),
            }
        }
        CloneEvent::WaitingForWal { end_lsn } => {
            eprintln!("archive verified; waiting for WAL up to {end_lsn}")
        }
    });
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let summary = clone(options, events, interrupt).await.map_err(|failure| {
        // The failure also says what the clean-up removed and left.
        eprintln!("{failure}");
        failure.error
    })?;
    Ok((summary, reports.load(Ordering::Relaxed)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [conninfo, target] = args.as_slice() else {
        eprintln!("usage: clone_with_progress CONNINFO TARGET_DIRECTORY");
        return std::process::ExitCode::FAILURE;
    };
    match clone_with_progress(conninfo, Path::new(target)).await {
        Ok((summary, _)) => {
            println!(
                "cloned {} bytes, {} files verified, WAL {} to {}",
                summary.bytes, summary.verified_files, summary.start_lsn, summary.end_lsn
            );
            std::process::ExitCode::SUCCESS
        }
        Err(_) => std::process::ExitCode::FAILURE,
    }
}
