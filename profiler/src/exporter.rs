//! The Prometheus exporter's HTTP side (`watch --prometheus ADDR`): serves
//! `/metrics` from the registry the metrics sink keeps up to date, on a
//! thread and runtime of its own, so neither a scrape nor a stuck client
//! can touch sampling. Only `GET /metrics` (and `/` pointing to it).
//!
//! Listening: a bare port is loopback (`9466` is `127.0.0.1:9466`); any
//! other interface must be named (`0.0.0.0:9466`, `[::]:9466`): the metrics
//! name the host's processes and functions.

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::report::metrics::{Metrics, openmetrics_text, to_prometheus_text};

/// Scrapes served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept, keep-alive included (a scraper
/// simply connects again).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Parses `--prometheus`: `PORT` (loopback), `HOST:PORT` or `[V6]:PORT`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Some(port) = text.strip_prefix(':') {
        return Err(format!(
            "'{text}' names no interface: give {port} for loopback, or 0.0.0.0{text} to listen on every interface"
        ));
    }
    text.parse::<SocketAddr>().map_err(|_| {
        format!(
            "'{text}' is not a port or an address with a port (9466, 127.0.0.1:9466, [::1]:9466)"
        )
    })
}

/// Binds `addr`, before anything is attached: a port in use is an error
/// the user sees at once.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for --prometheus ({e}); pick another port")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `metrics` on `listener` until the process exits.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Mutex<Metrics>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cacheloop-http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("the Prometheus exporter cannot start: {e}");
                    return;
                }
            };
            runtime.block_on(accept(listener, metrics));
        })
}

async fn accept(listener: TcpListener, metrics: Arc<Mutex<Metrics>>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("the Prometheus exporter cannot listen: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first: beyond the cap, connections wait in the kernel's
        // accept queue instead of being accepted and dropped.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                log::debug!("exporter accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Released however the connection ends, a panic included.
            let _slot = slot;
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A client that never reads (or keeps a connection for good)
            // gives its slot back after this long.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Mutex<Metrics>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = kind.parse() {
            response.headers_mut().insert(CONTENT_TYPE, value);
        }
        response
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        );
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            // The metrics stay consistent record by record: a panic
            // elsewhere while holding the lock does not make them unservable.
            let text = openmetrics_text(
                metrics
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .registry(),
            );
            if openmetrics {
                reply(StatusCode::OK, OPENMETRICS, text)
            } else {
                reply(StatusCode::OK, PROMETHEUS_TEXT, to_prometheus_text(&text))
            }
        }
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<html><body><a href=\"/metrics\">cacheloop metrics</a></body></html>\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_listens_on_loopback_only() {
        assert_eq!(
            parse_listen("9466").unwrap(),
            "127.0.0.1:9466".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:9466").unwrap(),
            "0.0.0.0:9466".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        let e = parse_listen(":9466").unwrap_err();
        assert!(e.contains("0.0.0.0:9466") && e.contains("loopback"), "{e}");
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("70000").is_err());
    }
}
