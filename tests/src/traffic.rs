//! Real TCP and UDP traffic between namespaces: an echo server and clients.
//! Sockets are made on a thread inside the namespace and keep it for life.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Echoes every TCP connection and UDP datagram on one port, prefixing
/// replies with `name:` so clients can tell who answered; the request
/// `peer?` is answered with the client address the server sees. Stops on drop.
pub struct EchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on 0.0.0.0:`port` (TCP and UDP) inside `ns`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> Result<EchoServer> {
        let (tcp, udp) = ns.run(|| -> Result<_> {
            let tcp = TcpListener::bind(("0.0.0.0", port)).context("bind tcp")?;
            let udp = UdpSocket::bind(("0.0.0.0", port)).context("bind udp")?;
            Ok((tcp, udp))
        })?;
        Ok(Self::serve(tcp, udp, name))
    }

    /// Serves sockets made elsewhere (e.g. by a process that entered a netns).
    pub fn serve(tcp: TcpListener, udp: UdpSocket, name: &str) -> EchoServer {
        let port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        tcp.set_nonblocking(true).ok();
        udp.set_read_timeout(Some(Duration::from_millis(100))).ok();
        let prefix = format!("{name}:");
        let tcp_thread = {
            let stop = stop.clone();
            let prefix = prefix.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((conn, _)) => {
                            let prefix = prefix.clone();
                            std::thread::spawn(move || echo_tcp(conn, &prefix));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        let udp_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let reply = answer(&prefix, &buf[..n], from);
                        let _ = udp.send_to(&reply, from);
                    }
                }
            })
        };
        EchoServer {
            port,
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

/// Each line (up to '\n') is answered with `prefix` + the line.
fn echo_tcp(mut conn: TcpStream, prefix: &str) {
    conn.set_nonblocking(false).ok();
    let Ok(peer) = conn.peer_addr() else {
        return;
    };
    let mut buf = [0u8; 65536];
    let mut pending = Vec::new();
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let mut reply = answer(prefix, &line[..line.len() - 1], peer);
                    reply.push(b'\n');
                    if conn.write_all(&reply).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// `prefix` + the request, or + the client's address for `peer?`.
fn answer(prefix: &str, request: &[u8], peer: SocketAddr) -> Vec<u8> {
    let mut reply = prefix.as_bytes().to_vec();
    if request == b"peer?" {
        reply.extend_from_slice(peer.ip().to_string().as_bytes());
    } else {
        reply.extend_from_slice(request);
    }
    reply
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection made from inside `ns`.
pub fn tcp_connect(ns: &Netns, to: SocketAddr) -> Result<TcpStream> {
    let stream = ns
        .run(|| TcpStream::connect_timeout(&to, IO_TIMEOUT))
        .with_context(|| format!("TCP connect from netns {} to {to}", ns.name()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends one line and returns the echoed answer (without the newline).
pub fn tcp_exchange(stream: &mut TcpStream, line: &str) -> Result<String> {
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte).context("reading the echo")?;
        anyhow::ensure!(
            n == 1,
            "connection closed before the echo of {line:?} came back"
        );
        if byte[0] == b'\n' {
            break;
        }
        answer.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// One TCP round trip on a fresh connection.
pub fn tcp_roundtrip(ns: &Netns, to: SocketAddr, line: &str) -> Result<String> {
    let mut stream = tcp_connect(ns, to)?;
    tcp_exchange(&mut stream, line)
}

/// One UDP request/response from inside `ns`; returns the answer and the
/// address it came from.
pub fn udp_roundtrip(ns: &Netns, to: SocketAddr, message: &str) -> Result<(String, SocketAddr)> {
    let socket = ns.run(|| UdpSocket::bind(("0.0.0.0", 0)))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send_to(message.as_bytes(), to)?;
    let mut buf = [0u8; 65536];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {to} within {IO_TIMEOUT:?}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}
