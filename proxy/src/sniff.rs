//! Protocol detection before a filter chain is chosen, as Envoy's
//! `tls_inspector` and `http_inspector` listener filters do it: the first
//! bytes of a connection, peeked and left in place, tell a TLS ClientHello
//! (its server name and ALPN), HTTP/1.x (a request line) and HTTP/2
//! without TLS (the connection preface) from anything else, and the chain
//! that matches `transport_protocol`, `server_names` and
//! `application_protocols` takes the connection.

use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not taken for HTTP.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    /// `http/1.0`, `http/1.1` or `h2c`, as filter chains name them.
    Http(&'static str),
    NotHttp,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// Decides from the bytes a connection has sent so far.
pub fn detect(bytes: &[u8]) -> Detection {
    let prefix = bytes.len().min(PREFACE.len());
    if bytes[..prefix] == PREFACE[..prefix] {
        return if bytes.len() >= PREFACE.len() {
            Detection::Http("h2c")
        } else {
            Detection::NeedMore
        };
    }
    // A method: upper-case letters (RFC 9110 tokens, as methods are
    // written), then a space.
    let method = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method == bytes.len() {
        return if bytes.len() > 32 {
            Detection::NotHttp
        } else {
            Detection::NeedMore
        };
    }
    if method == 0 || bytes[method] != b' ' {
        return Detection::NotHttp;
    }
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() > MAX_REQUEST_LINE {
            Detection::NotHttp
        } else {
            Detection::NeedMore
        };
    };
    match bytes[..end].rsplit(|b| *b == b' ').next() {
        Some(b"HTTP/1.1") => Detection::Http("http/1.1"),
        Some(b"HTTP/1.0") => Detection::Http("http/1.0"),
        _ => Detection::NotHttp,
    }
}

/// What the first bytes told the listener's inspectors.
#[derive(Debug, Default)]
pub struct Inspected {
    /// The ClientHello, when the connection starts with one.
    pub tls: Option<crate::tls::Hello>,
    /// `http/1.0`, `http/1.1` or `h2c`, when plaintext HTTP.
    pub http: Option<&'static str>,
    /// The limit passed before every inspector could tell.
    pub timed_out: bool,
}

/// The most peeked at: a ClientHello fills at most one record.
const MAX_PEEK: usize = 16 * 1024 + 5;

/// Peeks at `stream` (leaving the bytes in place) until each inspector
/// asked for can tell — TLS or not, then HTTP or not — or `limit` passes.
/// A peer that closes first is neither.
pub async fn inspect(
    stream: &TcpStream,
    limit: Option<Duration>,
    tls: bool,
    http: bool,
) -> Inspected {
    use crate::tls::Inspection;
    let mut buffer = vec![0; MAX_PEEK];
    let mut found = Inspected::default();
    let look = async {
        let (mut tls_pending, mut http_pending) = (tls, http);
        let mut seen = 0;
        loop {
            let n = match stream.peek(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let bytes = &buffer[..n];
            let full = n == buffer.len();
            if tls_pending {
                match crate::tls::inspect(bytes) {
                    Inspection::Tls(hello) => {
                        found.tls = Some(hello);
                        return;
                    }
                    Inspection::NeedMore if !full => {}
                    Inspection::NeedMore | Inspection::NotTls => tls_pending = false,
                }
            }
            if http_pending && !tls_pending {
                match detect(bytes) {
                    Detection::Http(protocol) => {
                        found.http = Some(protocol);
                        http_pending = false;
                    }
                    Detection::NeedMore if !full => {}
                    Detection::NeedMore | Detection::NotHttp => http_pending = false,
                }
            }
            if !tls_pending && !http_pending {
                return;
            }
            // Peek returns at once while the bytes seen are there: wait
            // for more to arrive.
            if n == seen {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen = n;
        }
    };
    let timed_out = match limit {
        Some(limit) => tokio::time::timeout(limit, look).await.is_err(),
        None => {
            look.await;
            false
        }
    };
    found.timed_out = timed_out;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_http() {
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Detection::Http("http/1.1")
        );
        assert_eq!(
            detect(b"POST /x?y=1 HTTP/1.0\r\n"),
            Detection::Http("http/1.0")
        );
        assert_eq!(detect(PREFACE), Detection::Http("h2c"));
        assert_eq!(detect(b"PRI * HTTP/2"), Detection::NeedMore);
        assert_eq!(detect(b"GET /long/path"), Detection::NeedMore);
        assert_eq!(detect(b"GE"), Detection::NeedMore);
    }

    #[test]
    fn anything_else_is_not() {
        assert_eq!(detect(b"\x16\x03\x01\x02\x00"), Detection::NotHttp);
        assert_eq!(detect(b"SSH-2.0-OpenSSH_9.2\r\n"), Detection::NotHttp);
        assert_eq!(detect(b"get / HTTP/1.1\r\n"), Detection::NotHttp);
        assert_eq!(detect(b"GET / SPDY/3\r\n"), Detection::NotHttp);
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n"), Detection::NotHttp);
    }
}
