//! The exporter's HTTP side: scrapes served concurrently with bounded resources.
//!
//! One thread accepts connections and hands them to a fixed pool of [`WORKERS`] threads through
//! a queue of [`QUEUE`] connections; when the queue is full a new connection is closed at once.
//! A worker gives a client [`REQUEST_DEADLINE`] in total to send its request head (parsed by
//! `httparse`, at most [`MAX_REQUEST`] bytes) and [`WRITE_TIMEOUT`] per write, so clients that
//! connect and say nothing hold at most the pool, each for a bounded time, and never delay the
//! others while a worker is free. Workers answer from the latest rendered exposition, which the
//! caller's loop republishes ([`Exposition`]).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Worker threads (concurrent connections being read or answered).
pub const WORKERS: usize = 16;
/// Accepted connections waiting for a worker.
pub const QUEUE: usize = 64;
/// Most bytes of a request head read.
pub const MAX_REQUEST: usize = 8192;
/// Time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Time one write to a client may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The latest exposition text, shared by the workers.
#[derive(Clone, Debug, Default)]
pub struct Exposition(Arc<RwLock<Arc<String>>>);

impl Exposition {
    /// Publishes a new text.
    pub fn set(&self, text: String) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(text);
    }

    fn get(&self) -> Arc<String> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The running server; [`Server::shutdown`] (or drop) stops accepting and joins the threads.
pub struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts serving `exposition` on `listener`.
    pub fn start(listener: TcpListener, exposition: Exposition) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = sync_channel::<TcpStream>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let (rx, text) = (Arc::clone(&rx), exposition.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("prometheus-{i}"))
                    .spawn(move || work(&rx, &text))?,
            );
        }
        let acceptor = {
            let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("prometheus-accept".into())
                .spawn(move || accept(&listener, &tx, &stop))?
        };
        Ok(Self {
            listener,
            stop,
            acceptor: Some(acceptor),
            workers,
        })
    }

    /// The address served.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Stops accepting, lets the workers finish what they hold, joins every thread.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            // Dropping the acceptor's sender ends the workers' loop.
            let _ = a.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn accept(
    listener: &TcpListener,
    tx: &SyncSender<TcpStream>,
    stop: &std::sync::atomic::AtomicBool,
) {
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => match tx.try_send(stream) {
                Ok(()) => {}
                // Every worker busy and the queue full: refuse at once (dropping closes it).
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn work(rx: &Mutex<Receiver<TcpStream>>, text: &Exposition) {
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(stream) = next else { return };
        let _ = answer(stream, text);
    }
}

/// Reads a request head within [`REQUEST_DEADLINE`]; `None` if the client took too long, sent
/// too much or closed.
fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while req.len() < MAX_REQUEST {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n.min(MAX_REQUEST - req.len())]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        match httparse::Request::new(&mut headers).parse(&req) {
            Ok(httparse::Status::Complete(_)) | Err(_) => return Some(req),
            Ok(httparse::Status::Partial) => {}
        }
    }
    Some(req)
}

fn answer(mut stream: TcpStream, text: &Exposition) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let Some(req) = read_head(&mut stream) else {
        return Ok(());
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    let complete = matches!(parsed.parse(&req), Ok(httparse::Status::Complete(_)));
    let method = parsed.method.unwrap_or("");
    let path = parsed.path.unwrap_or("").split('?').next().unwrap_or("");
    let (status, ctype, body): (&str, &str, Arc<String>) = match (complete, method, path) {
        (false, ..) => (
            "400 Bad Request",
            "text/plain",
            Arc::new("bad request\n".into()),
        ),
        (true, "GET" | "HEAD", "/metrics") => ("200 OK", super::CONTENT_TYPE, text.get()),
        (true, "GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            Arc::new("Mirrorball profiler exporter: see /metrics\n".into()),
        ),
        (true, "GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            Arc::new("not found\n".into()),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            Arc::new("method not allowed\n".into()),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}
