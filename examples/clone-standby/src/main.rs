//! `clone-standby`: make a machine a streaming PostgreSQL standby over the replication
//! protocol alone.
//!
//! This first version has the `identify` command; `clone`, `receive-wal`, `verify`,
//! `status` and `check` arrive with the basebackup, walstream and clone-standby issues.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
            Command::Identify { source, json } => identify(&source, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clone-standby: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn identify(source: &str, json: bool) -> pgwire_repl::Result<()> {
    let mut config = Config::parse_with_env(source)?;
    if config.application_name.is_none() {
        config.fallback_application_name = Some("clone-standby".into());
    }
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
