//! `clone-standby`: make a machine a streaming PostgreSQL standby over the replication
//! protocol alone.
//!
//! Commands: `identify`, `check`, `status`. `clone`, `receive-wal` and `verify` arrive
//! with the basebackup and walstream crates.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use clone_standby::{check, status};
use pgwire_repl::connection::AuthMethod;
use pgwire_repl::{Config, ReplicationClient};

#[derive(Parser)]
#[command(
    version,
    about = "Clone and stream PostgreSQL standbys over the replication protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print IDENTIFY_SYSTEM, the server version and how the connection is secured.
    Identify {
        /// libpq connection string or URI of the server (PG* variables and ~/.pgpass apply).
        #[arg(long)]
        source: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Report whether a primary can serve a standby, with the fix for each problem.
    /// Exits non-zero when a clone would fail.
    Check {
        /// libpq connection string or URI of the primary.
        #[arg(long)]
        source: String,
    },
    /// Compare the primary's WAL position with the standby's receive and replay
    /// positions. Exits non-zero when the standby is not streaming.
    Status {
        /// The primary (libpq connection string or URI).
        #[arg(long)]
        primary: String,
        /// The standby (libpq connection string or URI).
        #[arg(long)]
        standby: String,
        /// Wait until the standby streams and has replayed what the primary had written.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("clone-standby: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Identify { source, json } => {
                identify(&source, json).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Check { source } => run_check(&source).await,
            Command::Status {
                primary,
                standby,
                wait,
                timeout,
                json,
            } => run_status(&primary, &standby, wait, Duration::from_secs(timeout), json).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clone-standby: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn identify(source: &str, json: bool) -> pgwire_repl::Result<()> {
    let config = source_config(source)?;
    let mut client = ReplicationClient::connect(&config).await?;
    let id = client.identify_system().await?;
    let segment_size = client.wal_segment_size().await?;
    let connection = client.connection();
    let version = connection.server_version().to_string();
    let tls = connection.tls().cloned();
    let auth = match connection.auth_method() {
        AuthMethod::None => "none (trust, peer or certificate)",
        AuthMethod::Cleartext => "cleartext password",
        AuthMethod::Md5 => "md5",
        AuthMethod::ScramSha256 => "SCRAM-SHA-256",
        AuthMethod::ScramSha256Plus => "SCRAM-SHA-256-PLUS (channel binding)",
        _ => "other",
    };
    let target = connection.target().to_string();
    client.close().await?;
    if json {
        let value = serde_json::json!({
            "server": target,
            "server_version": version,
            "system_id": id.system_id.to_string(),
            "timeline": id.timeline.0,
            "xlogpos": id.xlog_pos.to_string(),
            "wal_segment_size": segment_size.bytes(),
            "tls": tls.as_ref().map(|t| serde_json::json!({"version": t.version, "cipher": t.cipher, "direct": t.direct})),
            "authentication": auth,
        });
        println!("{value:#}");
    } else {
        println!("server:           {target}");
        println!("server version:   {version}");
        println!("system id:        {}", id.system_id);
        println!("timeline:         {}", id.timeline);
        println!("WAL flush LSN:    {}", id.xlog_pos);
        println!("WAL segment size: {} MB", segment_size.bytes() >> 20);
        match tls {
            Some(t) => println!(
                "TLS:              {} {}{}",
                t.version,
                t.cipher,
                if t.direct { " (direct)" } else { "" }
            ),
            None => println!("TLS:              not in use"),
        }
        println!("authentication:   {auth}");
    }
    Ok(())
}

fn source_config(conninfo: &str) -> pgwire_repl::Result<Config> {
    let mut config = Config::parse_with_env(conninfo)?;
    if config.application_name.is_none() {
        config.fallback_application_name = Some("clone-standby".into());
    }
    Ok(config)
}

async fn run_check(source: &str) -> pgwire_repl::Result<ExitCode> {
    let config = source_config(source)?;
    let findings = check::check(&config).await;
    let mut worst = check::Level::Ok;
    for finding in &findings {
        let label = match finding.level {
            check::Level::Ok => "ok     ",
            check::Level::Warning => "WARNING",
            check::Level::Problem => "PROBLEM",
        };
        println!("{label} {}", finding.what);
        if let Some(fix) = &finding.fix {
            println!("        fix: {fix}");
        }
        worst = worst.max(finding.level);
    }
    if worst == check::Level::Problem {
        println!("\nthis primary cannot serve a standby until the problems above are fixed");
        Ok(ExitCode::FAILURE)
    } else {
        println!("\nthis primary can serve a standby");
        Ok(ExitCode::SUCCESS)
    }
}

async fn run_status(
    primary: &str,
    standby: &str,
    wait: bool,
    timeout: Duration,
    json: bool,
) -> pgwire_repl::Result<ExitCode> {
    let primary = source_config(primary)?;
    let standby = source_config(standby)?;
    let status = if wait {
        status::wait_caught_up(&primary, &standby, timeout).await?
    } else {
        status::observe(&primary, &standby).await?
    };
    let show = |lsn: Option<pgwire_repl::Lsn>| lsn.map_or("none".to_string(), |l| l.to_string());
    if json {
        let value = serde_json::json!({
            "primary_lsn": status.primary_lsn.to_string(),
            "streaming": status.streaming,
            "receive_lsn": status.receive_lsn.map(|l| l.to_string()),
            "replay_lsn": status.replay_lsn.map(|l| l.to_string()),
            "receive_lag_bytes": status.receive_lag(),
            "replay_lag_bytes": status.replay_lag(),
        });
        println!("{value:#}");
    } else {
        println!("primary current LSN:   {}", status.primary_lsn);
        println!("standby received LSN:  {}", show(status.receive_lsn));
        println!("standby replayed LSN:  {}", show(status.replay_lsn));
        println!(
            "receive lag:           {} bytes",
            status
                .receive_lag()
                .map_or("unknown".into(), |b| b.to_string())
        );
        println!(
            "replay lag:            {} bytes",
            status
                .replay_lag()
                .map_or("unknown".into(), |b| b.to_string())
        );
        println!(
            "streaming:             {}",
            if status.streaming { "yes" } else { "NO" }
        );
    }
    if status.streaming {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("clone-standby: the standby is not streaming from the primary; check its log, primary_conninfo and the primary's pg_hba.conf");
        Ok(ExitCode::FAILURE)
    }
}
