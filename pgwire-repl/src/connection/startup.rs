//! Steps 3 and 4 of a connection: the startup packet, then authentication, driven over
//! the stream by the sans-IO [`Startup`] machine.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::encryption::Secured;
use super::socket::describe;
use super::{read_message, BulkReceive, ConnectOptions, Connection, READ_CHUNK};
use crate::config::{Config, Host, ReplicationMode};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::auth::{AuthMethod, AuthSettings, Authenticator};
use crate::proto::frontend;
use crate::proto::startup::{Startup, StartupStep};

/// The startup packet's parameters, as libpq sends them for this kind of session.
fn startup_parameters(
    config: &Config,
    replication: ReplicationMode,
    user: &str,
) -> Vec<(&'static str, String)> {
    let mut parameters = vec![("user", user.to_string())];
    match replication {
        ReplicationMode::Off => {}
        ReplicationMode::Physical => parameters.push(("replication", "true".into())),
        ReplicationMode::Database => parameters.push(("replication", "database".into())),
    }
    if let Some(db) = &config.dbname {
        parameters.push(("database", db.clone()));
    }
    if replication == ReplicationMode::Off {
        parameters.push(("client_encoding", "UTF8".into()));
    }
    let application_name = config
        .application_name
        .as_ref()
        .or(config.fallback_application_name.as_ref());
    if let Some(name) = application_name {
        parameters.push(("application_name", name.clone()));
    }
    if let Some(opts) = &config.options {
        parameters.push(("options", opts.clone()));
    }
    parameters
}

/// Sends the startup packet and answers the server until ReadyForQuery.
pub(super) async fn start_session(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    port: u16,
    secured: Secured,
) -> Result<Connection> {
    let target = describe(host, port);
    let Secured {
        mut stream,
        tls,
        server_cert_hash,
    } = secured;

    // Step 3: the startup packet.
    let user = config.effective_user()?;
    let parameters = startup_parameters(config, replication, &user);
    let borrowed: Vec<(&str, &str)> = parameters
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let mut write_buf = BytesMut::with_capacity(8 * 1024);
    frontend::startup(&borrowed, &mut write_buf)?;
    send(&mut stream, &write_buf, &target, "the startup message").await?;
    write_buf.clear();

    // Step 4: authentication, until the server is ready. pgpass matching uses
    // "replication" as the database of physical connections.
    let pgpass_db = match (replication, &config.dbname) {
        (ReplicationMode::Physical, _) => "replication".to_string(),
        (_, Some(db)) => db.clone(),
        (_, None) => user.clone(),
    };
    let auth = Authenticator::new(AuthSettings {
        user: user.clone(),
        password: config.password_for(host, port, &pgpass_db, &user),
        channel_binding: config.channel_binding,
        tls_in_use: tls.is_some(),
        server_cert_hash,
        target: target.clone(),
    })
    .with_require_auth(config.require_auth.clone());
    let mut machine = Startup::new(auth, target.clone(), user);
    let mut read_buf = BytesMut::with_capacity(READ_CHUNK);
    let session = loop {
        let message = read_message(&mut stream, &mut read_buf, &options.limits, &target)
            .await
            .map_err(|e| {
                if e.kind() == ErrorKind::Io && machine.auth_method() != AuthMethod::None {
                    e.with_advice(
                        "the server closed the connection during authentication; its log says why",
                    )
                } else {
                    e
                }
            })?;
        match machine.handle(message)? {
            StartupStep::Send(reply) => {
                send(&mut stream, &reply, &target, "authentication data").await?;
            }
            StartupStep::Notice(notice) => match &options.notice_handler {
                Some(handler) => handler(&notice),
                None => tracing::info!(server = %target, "server notice: {notice}"),
            },
            StartupStep::Ready(session) => break session,
            // Continue, and steps added later that need nothing from this layer.
            _ => {}
        }
    };
    read_buf.reserve(READ_CHUNK);
    Ok(Connection {
        stream,
        read_buf,
        write_buf,
        limits: options.limits,
        notice_handler: options.notice_handler.clone(),
        parameters: session.parameters,
        server_major: session.server_major,
        process_id: session.process_id,
        tls,
        auth_method: session.auth_method,
        target,
        replication,
        host: host.clone(),
        host_addr: None,
        port,
        bulk: BulkReceive::default(),
    })
}

/// Writes and flushes `bytes` (a caller's stream may buffer).
async fn send(
    stream: &mut super::stream::Stream,
    bytes: &[u8],
    target: &str,
    what: &str,
) -> Result<()> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| Error::io(format!("sending {what} to {target}"), e))?;
    stream
        .flush()
        .await
        .map_err(|e| Error::io(format!("sending {what} to {target}"), e))
}
