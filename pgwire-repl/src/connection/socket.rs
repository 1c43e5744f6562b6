//! Step 1 of a connection: resolve a host and open a socket to one of its addresses
//! (TCP with libpq's keepalive and user-timeout options, or a Unix socket whose server
//! user `requirepeer` checks).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use tokio::net::{TcpSocket, UnixStream};

use super::stream::{set_int_option, Stream};
use crate::config::{whole_millis, whole_seconds, Config, Host};
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
            let target = format!(
                "connecting to {}{}",
                describe(host, port),
                describe_address(host, &Address::Tcp(*address))
            );
            let socket = if address.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| Error::io(format!("{target}: could not create socket"), e))?;
            // As libpq: every option is set before connect(), so that tcp_user_timeout
            // also bounds the handshake, and a refused option fails this address.
            socket
                .set_nodelay(true)
                .map_err(|e| Error::io(format!("{target}: setsockopt(TCP_NODELAY) failed"), e))?;
            set_tcp_options(socket.as_raw_fd(), config, &target)?;
            let stream = socket
                .connect(*address)
                .await
                .map_err(|e| Error::io(target.clone(), e))?;
            Ok(Stream::Tcp(stream))
        }
    }
}

/// libpq's keepalive set-up of a TCP socket (`fe-connect.c`, before `connect()`), in
/// its order: `SO_KEEPALIVE` unless `keepalives` is off, then `TCP_KEEPIDLE`,
/// `TCP_KEEPINTVL`, `TCP_KEEPCNT` and `TCP_USER_TIMEOUT` for the options that are set.
/// With keepalives off libpq sets none of them, not even `TCP_USER_TIMEOUT`; neither
/// does this. A value the kernel refuses fails the address, as in libpq.
fn set_tcp_options(fd: RawFd, config: &Config, target: &str) -> Result<()> {
    if !config.keepalives {
        return Ok(());
    }
    let set = |level: libc::c_int,
               name: libc::c_int,
               option: &str,
               keyword: &str,
               value: u64,
               advice: &str| {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        set_int_option(fd, level, name, value).map_err(|e| {
            Error::config(
                format!("{target}: setsockopt({option}) failed"),
                format!("this system refused {keyword}={value}: {advice}"),
            )
            .with_source(e)
        })
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        "SO_KEEPALIVE",
        "keepalives",
        1,
        "this socket does not take TCP keepalives; set keepalives=0",
    )?;
    if let Some(idle) = config.keepalives_idle {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            "TCP_KEEPIDLE",
            "keepalives_idle",
            whole_seconds(idle),
            "Linux takes 1 to 32767 seconds; give a value in that range, or remove keepalives_idle to keep the system's (net.ipv4.tcp_keepalive_time)",
        )?;
    }
    if let Some(interval) = config.keepalives_interval {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            "TCP_KEEPINTVL",
            "keepalives_interval",
            whole_seconds(interval),
            "Linux takes 1 to 32767 seconds; give a value in that range, or remove keepalives_interval to keep the system's (net.ipv4.tcp_keepalive_intvl)",
        )?;
    }
    if let Some(count) = config.keepalives_count {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            "TCP_KEEPCNT",
            "keepalives_count",
            u64::from(count),
            "Linux takes 1 to 127 probes; give a value in that range, or remove keepalives_count to keep the system's (net.ipv4.tcp_keepalive_probes)",
        )?;
    }
    if let Some(timeout) = config.tcp_user_timeout {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            "TCP_USER_TIMEOUT",
            "tcp_user_timeout",
            whole_millis(timeout),
            "give the timeout in milliseconds (0 keeps the system's), or remove tcp_user_timeout",
        )?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn get_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, a valid c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        value
    }

    fn system_default(file: &str) -> libc::c_int {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{file}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Opens a socket with the options of `conninfo` to a listener on loopback and
    /// returns what the kernel says the socket's options are:
    /// (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT).
    async fn options_of(conninfo: &str) -> Result<[libc::c_int; 5]> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let config = Config::parse(conninfo).unwrap();
        let host = Host::Tcp("127.0.0.1".into());
        let stream = open(&config, &host, &Address::Tcp(address), address.port()).await?;
        let (_peer, _) = listener.accept().await.unwrap();
        let fd = stream.tcp_fd().unwrap();
        Ok([
            get_int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
        ])
    }

    #[tokio::test]
    async fn tcp_sockets_get_the_options_libpq_sets() {
        let defaults = [
            1,
            system_default("tcp_keepalive_time"),
            system_default("tcp_keepalive_intvl"),
            system_default("tcp_keepalive_probes"),
            0,
        ];
        assert_eq!(
            options_of("").await.unwrap(),
            defaults,
            "keepalives on, the rest the system's"
        );
        assert_eq!(
            options_of(
                "keepalives_idle=7 keepalives_interval=3 keepalives_count=4 tcp_user_timeout=1500"
            )
            .await
            .unwrap(),
            [1, 7, 3, 4, 1500]
        );
        assert_eq!(
            options_of("keepalives=1 keepalives_count=127 tcp_user_timeout=0")
                .await
                .unwrap(),
            [1, defaults[1], defaults[2], 127, 0]
        );
        // keepalives=0 sets nothing, not even tcp_user_timeout (libpq's else-if chain).
        let off = options_of("keepalives=0 keepalives_idle=7 tcp_user_timeout=1500")
            .await
            .unwrap();
        assert_eq!(off[0], 0, "{off:?}");
        assert_eq!(off[4], 0, "{off:?}");
        // A duration set in code with a fraction counts as the next whole unit.
        let mut config = Config::parse("").unwrap();
        config.keepalives_idle = Some(Duration::from_millis(2500));
        config.tcp_user_timeout = Some(Duration::from_micros(1500));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stream = open(
            &config,
            &Host::Tcp("127.0.0.1".into()),
            &Address::Tcp(address),
            address.port(),
        )
        .await
        .unwrap();
        let fd = stream.tcp_fd().unwrap();
        assert_eq!(get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 3);
        assert_eq!(
            get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            2
        );
    }

    #[tokio::test]
    async fn values_the_kernel_refuses_fail_the_address_as_in_libpq() {
        for (conninfo, option) in [
            ("keepalives_idle=0", "TCP_KEEPIDLE"),
            ("keepalives_idle=-1", "TCP_KEEPIDLE"),
            ("keepalives_idle=40000", "TCP_KEEPIDLE"),
            ("keepalives_interval=0", "TCP_KEEPINTVL"),
            ("keepalives_count=0", "TCP_KEEPCNT"),
            ("keepalives_count=200", "TCP_KEEPCNT"),
        ] {
            let err = options_of(conninfo).await.unwrap_err();
            // libpq: `setsockopt(TCP_KEEPIDLE) failed: Invalid argument`.
            let text = err.to_string();
            assert!(
                text.contains(&format!("setsockopt({option}) failed: Invalid argument")),
                "{conninfo}: {text}"
            );
            assert!(text.contains("host=127.0.0.1 port="), "{conninfo}: {text}");
            let key = conninfo.split('=').next().unwrap();
            assert!(err.advice().unwrap().contains(key), "{conninfo}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::Config, "{conninfo}");
            assert!(!err.is_retryable(), "{conninfo}");
        }
        // Off, nothing is set, so nothing is refused (libpq does not even look).
        options_of("keepalives=0 keepalives_idle=0 keepalives_count=0")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn unix_sockets_ignore_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.PGSQL.5432");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let config = Config::parse(
            "keepalives_idle=0 keepalives_interval=0 keepalives_count=0 tcp_user_timeout=5",
        )
        .unwrap();
        let host = Host::Unix(dir.path().to_path_buf());
        let stream = open(&config, &host, &Address::Unix(path), 5432)
            .await
            .unwrap();
        listener.accept().await.unwrap();
        assert!(stream.tcp_fd().is_none());
    }
}
