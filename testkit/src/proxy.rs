//! A fault-injecting TCP proxy for tests: sits between a client and a real server on
//! loopback and cuts, stalls or corrupts the connection at chosen byte offsets.
//!
//! Offsets count bytes of one direction of one connection, from its start. Each
//! accepted connection gets the next [`FaultPlan`] in the list (connections beyond the
//! list are passed through untouched), so a test can fault the first attempt and let a
//! reconnect through.
//!
//! ```no_run
//! # async fn demo(server_port: u16) {
//! use testkit::proxy::{Fault, FaultPlan, Proxy};
//! let proxy = Proxy::start(server_port, vec![FaultPlan::server_to_client(Fault::FlipByte { at: 1 << 20 })]).await;
//! let conninfo = format!("host=127.0.0.1 port={} user=postgres", proxy.port());
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What to do to one direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Close both directions after `at` bytes.
    Cut {
        /// Bytes passed before the cut.
        at: u64,
    },
    /// Stop forwarding for `duration` after `at` bytes, then go on.
    Stall {
        /// Bytes passed before the stall.
        at: u64,
        /// How long to stall.
        duration: Duration,
    },
    /// Invert the byte at offset `at` (XOR 0xFF).
    FlipByte {
        /// Offset of the byte to change.
        at: u64,
    },
}

/// The faults for one connection, per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Applied to bytes from the server to the client.
    pub server_to_client: Fault,
    /// Applied to bytes from the client to the server.
    pub client_to_server: Fault,
}

impl FaultPlan {
    /// No fault.
    pub fn pass() -> FaultPlan {
        FaultPlan {
            server_to_client: Fault::None,
            client_to_server: Fault::None,
        }
    }

    /// A fault on the server's bytes only.
    pub fn server_to_client(fault: Fault) -> FaultPlan {
        FaultPlan {
            server_to_client: fault,
            client_to_server: Fault::None,
        }
    }

    /// A fault on the client's bytes only.
    pub fn client_to_server(fault: Fault) -> FaultPlan {
        FaultPlan {
            server_to_client: Fault::None,
            client_to_server: fault,
        }
    }
}

/// A running proxy to `127.0.0.1:<server port>`.
pub struct Proxy {
    port: u16,
    server_to_client_bytes: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts listening on a free loopback port.
    pub async fn start(server_port: u16, plans: Vec<FaultPlan>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("testkit: bind a loopback port for the proxy");
        let port = listener.local_addr().expect("local address").port();
        let counter = Arc::new(AtomicU64::new(0));
        let total = counter.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            let mut plans = plans.into_iter();
            while let Ok((client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                let plan = plans.next().unwrap_or_else(FaultPlan::pass);
                let total = total.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up =
                        tokio::spawn(pump(client_read, server_write, plan.client_to_server, None));
                    let down = tokio::spawn(pump(
                        server_read,
                        client_write,
                        plan.server_to_client,
                        Some(total),
                    ));
                    // A cut in either direction ends both.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Proxy {
            port,
            server_to_client_bytes: counter,
            connections,
            task,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from servers to clients so far, over all connections.
    pub fn server_to_client_bytes(&self) -> u64 {
        self.server_to_client_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    fault: Fault,
    total: Option<Arc<AtomicU64>>,
) {
    let mut offset: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = offset + n as u64;
        match fault {
            Fault::Cut { at } if end > at => {
                let keep = (at - offset) as usize;
                let _ = to.write_all(&chunk[..keep]).await;
                break;
            }
            Fault::Stall { at, duration } if !stalled && end > at => {
                let keep = (at - offset) as usize;
                if to.write_all(&chunk[..keep]).await.is_err() {
                    break;
                }
                tokio::time::sleep(duration).await;
                stalled = true;
                if to.write_all(&chunk[keep..]).await.is_err() {
                    break;
                }
                offset = end;
                continue;
            }
            Fault::FlipByte { at } if (offset..end).contains(&at) => {
                chunk[(at - offset) as usize] ^= 0xFF;
            }
            _ => {}
        }
        if to.write_all(chunk).await.is_err() {
            break;
        }
        if let Some(total) = &total {
            total.fetch_add(n as u64, Ordering::Relaxed);
        }
        offset = end;
    }
    let _ = to.shutdown().await;
}
