//! Real TCP and UDP traffic between namespaces: an echo server and clients.
//! Sockets are made on a thread inside the namespace and keep it for life.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Echoes every TCP connection and UDP datagram on one port, prefixing
/// replies with `name:` so clients can tell who answered; the request
/// `peer?` is answered with the client address the server sees, and after
/// the answer to `close?` the server closes its side of a TCP connection
/// first (as an HTTP server does with `Connection: close`). Stops on drop.
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
                    if line == b"close?\n" {
                        let _ = conn.shutdown(std::net::Shutdown::Write);
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

/// A TCP connection from inside `ns`, from local port `port` (reusable
/// at once: SO_REUSEADDR; 0: the kernel picks one at connect, as for any
/// client), made within `timeout`.
pub fn tcp_connect_from(
    ns: &Netns,
    port: u16,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let stream = ns
        .run(|| -> std::io::Result<TcpStream> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            if port != 0 {
                socket.set_reuse_address(true)?;
                socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            }
            socket.connect_timeout(&to.into(), timeout)?;
            Ok(socket.into())
        })
        .with_context(|| format!("TCP connect from netns {} port {port} to {to}", ns.name()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Closes with a RST instead of a FIN (SO_LINGER 0): the connection ends
/// at once, leaving no TIME_WAIT behind.
pub fn tcp_abort(stream: TcpStream) -> Result<()> {
    Socket::from(stream).set_linger(Some(Duration::ZERO))?;
    Ok(())
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

/// One ICMP echo from inside `ns` to `to` (a raw socket, so root), with
/// identifier `id`: Ok once the matching echo reply from `to` arrives.
pub fn icmp_echo(ns: &Netns, to: std::net::Ipv4Addr, id: u16) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket call; the descriptor is owned at once.
    let fd = ns.run(|| unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) });
    anyhow::ensure!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: the option value is a timeval of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut request = [8u8, 0, 0, 0, 0, 0, 0, 1, b't', b'e', b'r', b'n'];
    request[4..6].copy_from_slice(&id.to_be_bytes());
    let sum = internet_checksum(&request);
    request[2..4].copy_from_slice(&sum.to_be_bytes());
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: buffer and address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        sent > 0,
        "sending the echo: {}",
        std::io::Error::last_os_error()
    );
    let mut buf = [0u8; 1500];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        anyhow::ensure!(
            n > 0,
            "no echo reply from {to} within {IO_TIMEOUT:?}: {}",
            std::io::Error::last_os_error()
        );
        // The IP header comes first; the ICMP message after it.
        let packet = &buf[..n as usize];
        let icmp = &packet[((packet[0] & 0x0f) as usize * 4)..];
        if packet[12..16] == to.octets() && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
            return Ok(());
        }
    }
}

/// RFC 1071 checksum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The agent's default health address (in its node's netns).
pub const AGENT_HEALTH: &str = "127.0.0.1:9876";

/// GET `path` from the agent's health endpoint in `ns`: status code and body.
pub fn agent_http_get(ns: &Netns, path: &str) -> Result<(u16, String)> {
    http_get(ns, AGENT_HEALTH.parse()?, path)
}

/// GET `path` from `address`, from inside `ns`: status code and body.
pub fn http_get(ns: &Netns, address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&address, Duration::from_secs(2)))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((code, body))
}
