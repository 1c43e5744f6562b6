//! Step 1 of a connection: resolve a host and open a socket to one of its addresses
//! (TCP with keepalives, or a Unix socket whose server user `requirepeer` checks).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::stream::{set_int_option, Stream};
use crate::config::{Config, Host};
use crate::error::{Error, Result};

/// One address of a host.
#[derive(Debug, Clone)]
pub(super) enum Address {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// `host=… port=…`, or the socket path, for messages.
pub(super) fn describe(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(name) => format!("host={name} port={port}"),
        Host::Unix(dir) => format!("socket {}/.s.PGSQL.{port}", dir.display()),
    }
}

/// ` (address)` when the address is not already the host's text.
pub(super) fn describe_address(host: &Host, address: &Address) -> String {
    match (host, address) {
        (Host::Tcp(name), Address::Tcp(socket)) if *name != socket.ip().to_string() => {
            format!(" ({})", socket.ip())
        }
        _ => String::new(),
    }
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Tcp(name) => name.clone(),
        Host::Unix(dir) => dir.display().to_string(),
    }
}

/// The addresses of one host entry: the socket path of a socket directory, or what the
/// name (or `hostaddr`) resolves to. A failed look-up is an I/O error (libpq tries the
/// next host); no address at all is a configuration error.
pub(super) async fn resolve(
    host: &Host,
    host_addr: Option<&str>,
    port: u16,
) -> Result<Vec<Address>> {
    let addresses: Vec<Address> = match host {
        Host::Unix(dir) => vec![Address::Unix(dir.join(format!(".s.PGSQL.{port}")))],
        Host::Tcp(name) => {
            let lookup = host_addr.unwrap_or(name);
            match tokio::net::lookup_host((lookup, port)).await {
                Ok(found) => found.map(Address::Tcp).collect(),
                Err(e) => {
                    let what = if host_addr.is_some() {
                        format!("could not parse network address \"{lookup}\"")
                    } else {
                        format!("could not translate host name \"{lookup}\" to address")
                    };
                    return Err(Error::io(what, e).with_advice(
                        "check the spelling of the host name and the DNS (or /etc/hosts) of this machine",
                    ));
                }
            }
        }
    };
    if addresses.is_empty() {
        return Err(Error::config(
            format!("host name \"{}\" resolved to no address", host_text(host)),
            "check the DNS (or /etc/hosts) of this machine",
        ));
    }
    Ok(addresses)
}

/// Opens a socket to `address`: TCP with `TCP_NODELAY` and the configured keepalives,
/// or a Unix socket whose server process `requirepeer` (if set) must run as.
pub(super) async fn open(
    config: &Config,
    host: &Host,
    address: &Address,
    port: u16,
) -> Result<Stream> {
    match address {
        Address::Unix(path) => {
            let socket = UnixStream::connect(path)
                .await
                .map_err(|e| Error::io(format!("connecting to socket {}", path.display()), e))?;
            if let Some(expected) = &config.require_peer {
                check_peer(&socket, expected, path)?;
            }
            Ok(Stream::Unix(socket))
        }
        Address::Tcp(address) => {
            let socket = TcpStream::connect(address).await.map_err(|e| {
                Error::io(
                    format!(
                        "connecting to {}{}",
                        describe(host, port),
                        describe_address(host, &Address::Tcp(*address))
                    ),
                    e,
                )
            })?;
            let _ = socket.set_nodelay(true);
            if config.keepalives {
                if let Err(e) = tcp_keepalive(&socket, config.keepalives_idle) {
                    tracing::debug!("cannot enable TCP keepalive: {e}");
                }
            }
            Ok(Stream::Tcp(socket))
        }
    }
}

/// libpq's `requirepeer`: the server at the other end of a Unix socket must run as
/// the OS user `expected`, checked before anything is sent to it.
fn check_peer(socket: &UnixStream, expected: &str, path: &Path) -> Result<()> {
    let credentials = socket.peer_cred().map_err(|e| {
        Error::io(
            format!(
                "reading the peer credentials of socket {} (requirepeer)",
                path.display()
            ),
            e,
        )
    })?;
    let uid = credentials.uid();
    let Some(actual) = user_name(uid) else {
        return Err(Error::auth(
            format!("requirepeer: the server process runs as user ID {uid}, which has no user name on this machine ({})", path.display()),
            format!("check which server listens on {}; requirepeer={expected} expects user {expected:?}", path.display()),
        ));
    };
    if actual != expected {
        return Err(Error::auth(
            format!(
                "requirepeer specifies \"{expected}\", but actual peer user name is \"{actual}\" ({})",
                path.display()
            ),
            "the socket is served by a process of another user: check that the socket directory is the real server's, or fix requirepeer",
        ));
    }
    Ok(())
}

/// The name of the OS user `uid`, if it has one.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid out-parameter for getpwuid_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call; buf's length is passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name is a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Enables TCP keepalive through setsockopt (tokio exposes no setter).
fn tcp_keepalive(socket: &TcpStream, idle: Option<Duration>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    if let Some(idle) = idle {
        let secs = libc::c_int::try_from(idle.as_secs())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
    }
    Ok(())
}
