//! A small HTTP/1.1 client (hyper's connection API; TLS through rustls with the system's roots) for
//! the OpenAI-compatible endpoint and `anomalyd chat`. One request per connection: these calls take
//! seconds, so a connection pool would buy nothing.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::util::url::{BadUrl, Url};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Url(#[from] BadUrl),
    #[error("cannot connect to {addr}: {cause}")]
    Connect { addr: String, cause: std::io::Error },
    #[error("TLS with {host}: {cause}")]
    Tls { host: String, cause: String },
    #[error("HTTP exchange with {addr} failed: {cause}")]
    Exchange { addr: String, cause: String },
    #[error("no response from {addr} within {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("the response from {addr} is over {limit} bytes")]
    TooLarge { addr: String, limit: usize },
}

/// A response: status and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Largest response body read (a chat completion is a few kB).
const MAX_BODY: usize = 8 << 20;

/// Sends one request and reads the whole response, all within `timeout`.
pub async fn request(
    method: &str,
    url: &Url,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let addr = format!("{}:{}", url.host, url.port);
    let ms = timeout.as_millis() as u64;
    match tokio::time::timeout(timeout, exchange(method, url, headers, body, &addr)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout { addr, ms }),
    }
}

async fn exchange(
    method: &str,
    url: &Url,
    headers: &[(&str, String)],
    body: Vec<u8>,
    addr: &str,
) -> Result<Response, HttpError> {
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|cause| HttpError::Connect { addr: addr.to_string(), cause })?;
    let _ = tcp.set_nodelay(true);
    let mut req = hyper::Request::builder().method(method).uri(&url.path).header("host", url.authority());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| HttpError::Exchange { addr: addr.to_string(), cause: e.to_string() })?;
    if url.tls {
        let stream = tls_connect(tcp, &url.host).await?;
        send(TokioIo::new(stream), req, addr).await
    } else {
        send(TokioIo::new(tcp), req, addr).await
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>, addr: &str) -> Result<Response, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let fail = |e: &dyn std::fmt::Display| HttpError::Exchange { addr: addr.to_string(), cause: e.to_string() };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| fail(&e))?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| fail(&e))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(&e))?;
        if let Some(data) = frame.data_ref() {
            out.extend_from_slice(data);
            if out.len() > MAX_BODY {
                driver.abort();
                return Err(HttpError::TooLarge { addr: addr.to_string(), limit: MAX_BODY });
            }
        }
    }
    driver.abort();
    Ok(Response { status, body: out })
}

async fn tls_connect(
    tcp: tokio::net::TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, HttpError> {
    let fail = |cause: String| HttpError::Tls { host: host.to_string(), cause };
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(fail("no trusted root certificates found on this system (install ca-certificates)".into()));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| fail(e.to_string()))?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_ports_paths_and_ipv6() {
        let u = Url::parse("http://127.0.0.1:11434/v1").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (false, "127.0.0.1", 11434, "/v1"));
        assert_eq!(u.join("/chat/completions").path, "/v1/chat/completions");
        assert_eq!(Url::parse("http://h/v1/").unwrap().join("/chat/completions").path, "/v1/chat/completions");
        let u = Url::parse("https://api.example.com").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str(), u.authority().as_str()), (true, 443, "/", "api.example.com"));
        let u = Url::parse("http://[::1]:8080/x").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.authority().as_str()), ("::1", 8080, "[::1]:8080"));
        for bad in ["ftp://h/", "http://", "http://h:port/", "localhost:8080", "http://user@h/"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
