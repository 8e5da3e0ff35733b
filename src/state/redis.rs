//! A global zone's thread in one worker: it takes a batch of charges from the worker's timer
//! (`syncer`), does the one pipelined round trip to Redis with short timeouts, and hands back
//! each key's debt. As with the key refresher, the thread never calls nginx: it only sees the
//! batch and the reply, through a mutex of its own. If Redis is down, it reconnects with a
//! backoff; meanwhile batches are dropped (the zone keeps its local limits).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::ratesync::{self, Pending, KEYS_PER_CALL};
use mesh_core::resp;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// What a worker hands its thread, and gets back.
pub struct Chan {
    pub job: Mutex<Option<Vec<Pending>>>,
    pub wake: Condvar,
    pub reply: Mutex<Option<Reply>>,
    pub busy: AtomicBool,
}

pub enum Reply {
    /// Each key's charge and how far ahead of Redis's clock its TAT is, when Redis answered.
    Synced(Vec<(Pending, u64)>, Instant),
    Failed(String),
    /// Waiting before the next attempt: the batch was dropped (limited locally).
    Skipped,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Chan {
    pub fn new() -> Chan {
        Chan {
            job: Mutex::new(None),
            wake: Condvar::new(),
            reply: Mutex::new(None),
            busy: AtomicBool::new(false),
        }
    }
}

/// The I/O timeout for a zone syncing every `interval_ms`: under the interval, so a slow
/// Redis delays one sync at most.
fn io_timeout(interval_ms: u64) -> Duration {
    Duration::from_millis((interval_ms * 3 / 4).clamp(25, 1000))
}

/// The timeout to connect (TCP, TLS handshake, AUTH, loading the script): longer than a
/// sync's, as a TLS handshake costs CPU on both sides; only this worker's thread waits.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a reply may be: a sync's reply is one array of at most `KEYS_PER_CALL` integers per
/// call, `SCRIPT LOAD`'s a 40-character hash, the rest `+OK`. Anything bigger is refused as
/// soon as its header says so, and the whole of a round trip's replies must arrive within
/// its timeout and fit in `MAX_REPLY_BYTES`, so a wrong or hostile Redis can neither grow a
/// worker's memory nor hold its thread.
const LIMITS: resp::Limits = resp::Limits {
    max_bulk: 1024,
    max_items: KEYS_PER_CALL,
    max_depth: 1,
};

/// Bytes the replies of one round trip may take: `MAX_PENDING` integers of 20 digits each,
/// with their framing, and room to spare.
const MAX_REPLY_BYTES: usize = ratesync::MAX_PENDING * 32 + 64 * 1024;

/// Where Redis is and how to log in, read once from the zone's configuration.
pub struct Endpoint {
    host: String,
    port: u16,
    /// TLS (`rediss://`) with these trusted roots.
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl Endpoint {
    /// From the zone's client (its URL and password, as `nginx -t` checked them) and the
    /// PEM roots of `ca_file=` (else the system's).
    pub fn new(client: &redis::Client, ca_pem: Option<&[u8]>) -> Result<Endpoint, String> {
        let info = client.get_connection_info();
        let (host, port, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p, false),
            redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
            _ => return Err("expected a TCP address".into()),
        };
        let tls = if tls {
            let system;
            let pem = match ca_pem {
                Some(p) => p,
                None => {
                    let path = std::env::var("SSL_CERT_FILE")
                        .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".into());
                    system = std::fs::read(&path)
                        .map_err(|e| format!("cannot read CA file \"{path}\": {e}"))?;
                    &system
                }
            };
            let mut roots = rustls::RootCertStore::empty();
            for der in CertificateDer::pem_slice_iter(pem).flatten() {
                let _ = roots.add(der);
            }
            super::refresher::install_crypto();
            Some(Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        } else {
            None
        };
        let settings = info.redis_settings();
        Ok(Endpoint {
            host,
            port,
            tls,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
        })
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One connection to Redis, and the hash of the loaded script.
struct Conn {
    stream: Stream,
    /// Bytes read past the replies taken so far.
    buf: Vec<u8>,
    sha: Vec<u8>,
}

impl Conn {
    fn open(ep: &Endpoint) -> Result<Conn, String> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let addrs = (ep.host.as_str(), ep.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?;
        let mut last = String::from("no address");
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        let stream = match &ep.tls {
            None => Stream::Plain(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                    .map_err(|e| e.to_string())?;
                let c = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| e.to_string())?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(c, tcp)))
            }
        };
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            sha: Vec::new(),
        };
        let mut setup: Vec<Vec<&[u8]>> = Vec::new();
        if let Some(pw) = &ep.password {
            match &ep.username {
                Some(u) => setup.push(vec![b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => setup.push(vec![b"AUTH", pw.as_bytes()]),
            }
        }
        let db = ep.db.to_string();
        if ep.db != 0 {
            setup.push(vec![b"SELECT", db.as_bytes()]);
        }
        setup.push(vec![b"SCRIPT", b"LOAD", ratesync::SCRIPT.as_bytes()]);
        let replies = conn.round_trip(&setup, deadline)?;
        for r in &replies {
            if let resp::Value::Error(e) = r {
                return Err(String::from_utf8_lossy(e).into_owned());
            }
        }
        match replies.last() {
            Some(resp::Value::Bulk(Some(sha))) => conn.sha = sha.clone(),
            _ => return Err("unexpected reply to SCRIPT LOAD".into()),
        }
        Ok(conn)
    }

    /// Sends `cmds` in one write and reads one reply for each, all before `deadline`.
    fn round_trip(
        &mut self,
        cmds: &[Vec<&[u8]>],
        deadline: Instant,
    ) -> Result<Vec<resp::Value>, String> {
        let mut out = Vec::new();
        for c in cmds {
            resp::encode(c, &mut out);
        }
        let left = |d: Instant| {
            d.checked_duration_since(Instant::now())
                .filter(|l| !l.is_zero())
                .ok_or_else(|| "timed out".to_string())
        };
        self.stream
            .socket()
            .set_write_timeout(Some(left(deadline)?))
            .map_err(|e| e.to_string())?;
        self.stream.write_all(&out).map_err(|e| e.to_string())?;
        self.stream.flush().map_err(|e| e.to_string())?;
        let mut replies = Vec::with_capacity(cmds.len());
        let mut used = 0;
        let mut chunk = [0u8; 16 * 1024];
        while replies.len() < cmds.len() {
            if let Some((v, n)) =
                resp::parse(&self.buf[used..], &LIMITS).map_err(|e| e.to_string())?
            {
                replies.push(v);
                used += n;
                continue;
            }
            if self.buf.len() >= MAX_REPLY_BYTES {
                return Err("reply over the limits".into());
            }
            self.stream
                .socket()
                .set_read_timeout(Some(left(deadline)?))
                .map_err(|e| e.to_string())?;
            let n = self.stream.read(&mut chunk).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "timed out".to_string()
                }
                _ => e.to_string(),
            })?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..used);
        Ok(replies)
    }
}

/// The thread: one batch at a time, one connection, reconnecting with a backoff.
pub fn run(chan: &Chan, endpoint: &Endpoint, prefix: &str, zone: &str, interval_ms: u64) {
    let timeout = io_timeout(interval_ms);
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(interval_ms);
    // Retries of a Redis that is down: a refused or timed-out connect every half second costs
    // little, and bounds how long global limits take to come back.
    let max_backoff = Duration::from_millis(interval_ms.max(500));
    let mut retry_at: Option<Instant> = None;
    loop {
        let batch = {
            let mut job = lock(&chan.job);
            loop {
                if let Some(b) = job.take() {
                    break b;
                }
                job = match chan.wake.wait(job) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
        };
        let reply = if retry_at.is_some_and(|t| Instant::now() < t) {
            Reply::Skipped
        } else {
            match sync_once(&mut conn, endpoint, timeout, prefix, zone, batch) {
                Ok(owed) => {
                    retry_at = None;
                    backoff = Duration::from_millis(interval_ms);
                    Reply::Synced(owed, Instant::now())
                }
                Err(e) => {
                    conn = None;
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(max_backoff);
                    Reply::Failed(e)
                }
            }
        };
        *lock(&chan.reply) = Some(reply);
        chan.busy.store(false, Ordering::Release);
    }
}

/// One round trip: every key's charge in, every key's debt out. An empty batch is a ping.
fn sync_once(
    conn: &mut Option<Conn>,
    endpoint: &Endpoint,
    timeout: Duration,
    prefix: &str,
    zone: &str,
    batch: Vec<Pending>,
) -> Result<Vec<(Pending, u64)>, String> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn::open(endpoint)?),
    };
    if batch.is_empty() {
        let r = c.round_trip(&[vec![b"PING"]], Instant::now() + timeout)?;
        return match r.first() {
            Some(resp::Value::Simple(_)) => Ok(Vec::new()),
            _ => Err("unexpected reply to PING".into()),
        };
    }
    let keys: Vec<String> = batch
        .iter()
        .map(|p| ratesync::redis_key(prefix, zone, p.key))
        .collect();
    let charges: Vec<String> = batch.iter().map(|p| p.charge_us.to_string()).collect();
    let sha = c.sha.clone();
    let counts: Vec<String> = batch
        .chunks(KEYS_PER_CALL)
        .map(|chunk| chunk.len().to_string())
        .collect();
    let mut cmds: Vec<Vec<&[u8]>> = Vec::new();
    for (i, chunk) in batch.chunks(KEYS_PER_CALL).enumerate() {
        let from = i * KEYS_PER_CALL;
        let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", &sha, counts[i].as_bytes()];
        cmd.extend(keys[from..from + chunk.len()].iter().map(|k| k.as_bytes()));
        cmd.extend(
            charges[from..from + chunk.len()]
                .iter()
                .map(|v| v.as_bytes()),
        );
        cmds.push(cmd);
    }
    let mut replies = c.round_trip(&cmds, Instant::now() + timeout)?;
    // Scripts are gone (Redis restarted, SCRIPT FLUSH): load it again, once.
    let noscript = |r: &[resp::Value]| {
        r.iter()
            .any(|v| matches!(v, resp::Value::Error(e) if e.starts_with(b"NOSCRIPT")))
    };
    if noscript(&replies) {
        let load = c.round_trip(
            &[vec![b"SCRIPT", b"LOAD", ratesync::SCRIPT.as_bytes()]],
            Instant::now() + timeout,
        )?;
        if !matches!(load.first(), Some(resp::Value::Bulk(Some(s))) if *s == sha) {
            return Err("unexpected reply to SCRIPT LOAD".into());
        }
        replies = c.round_trip(&cmds, Instant::now() + timeout)?;
    }
    let mut owed = Vec::with_capacity(batch.len());
    for (r, chunk) in replies.iter().zip(batch.chunks(KEYS_PER_CALL)) {
        match r {
            resp::Value::Array(Some(items)) if items.len() == chunk.len() => {
                for v in items {
                    match v {
                        resp::Value::Int(n) => owed.push((*n).max(0) as u64),
                        _ => return Err("unexpected reply to EVALSHA".into()),
                    }
                }
            }
            resp::Value::Error(e) => return Err(String::from_utf8_lossy(e).into_owned()),
            _ => return Err("unexpected reply to EVALSHA".into()),
        }
    }
    Ok(batch.into_iter().zip(owed).collect())
}
