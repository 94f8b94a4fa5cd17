//! TLS for the optional TCP listener. A TLS session runs in its own thread that relays
//! plaintext to one end of a Unix socket pair; the daemon and the client use the other end like
//! any Unix connection, so request/response, server-sent events and the duplex console all work
//! unchanged over TLS.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate file {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// Server side: a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("private key file {}: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not fit together: {e}"))?;
    Ok(Arc::new(config))
}

/// Client side: trust the certificates (CA or the server's own) in a PEM file.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots
            .add(c)
            .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Wrap an accepted TCP connection in TLS; returns the plaintext end.
pub fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<UnixStream> {
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    relay(conn.into(), tcp)
}

/// Connect TLS over `tcp` to `host` (checked against the certificate); returns the plaintext end.
pub fn connect(config: Arc<ClientConfig>, host: &str, tcp: TcpStream) -> io::Result<UnixStream> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("server name '{host}': {e}"),
        )
    })?;
    let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    // Handshake here, so a certificate problem is reported to the caller, not as a closed stream.
    let mut tcp = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {host}: {e}")))?;
    }
    relay(conn.into(), tcp)
}

fn relay(conn: Connection, tcp: TcpStream) -> io::Result<UnixStream> {
    let (outer, inner) = UnixStream::pair()?;
    std::thread::Builder::new()
        .name("tls".into())
        .spawn(move || pump(conn, tcp, inner))?;
    Ok(outer)
}

fn flush(conn: &mut Connection, tcp: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

/// Move bytes both ways until either side is done. Both sockets stay blocking; poll(2) says
/// which one has something to read.
fn pump(mut conn: Connection, mut tcp: TcpStream, mut plain: UnixStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if flush(&mut conn, &mut tcp).is_err() {
            break;
        }
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: plain.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            match conn.read_tls(&mut tcp) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if conn.process_new_packets().is_err() {
                let _ = flush(&mut conn, &mut tcp); // send the alert
                break;
            }
            let mut closed = false;
            loop {
                match conn.reader().read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        if plain.write_all(&buf[..n]).is_err() {
                            closed = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                break;
            }
        }
        if fds[1].revents != 0 {
            match plain.read(&mut buf) {
                Ok(0) | Err(_) => {
                    conn.send_close_notify();
                    let _ = flush(&mut conn, &mut tcp);
                    break;
                }
                Ok(n) => {
                    if conn.writer().write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = plain.shutdown(std::net::Shutdown::Both);
    let _ = tcp.shutdown(std::net::Shutdown::Both);
}
