//! A global zone's thread in one worker: it takes a batch of charges from the worker's timer
//! (`syncer`), does the one pipelined round trip to Redis with short timeouts, and hands back
//! each key's debt. As with the key refresher, the thread never calls nginx: it only sees the
//! batch and the reply, through a mutex of its own. If Redis is down, it reconnects with a
//! backoff; meanwhile batches are dropped (the zone keeps its local limits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::ratesync::{self, Pending, KEYS_PER_CALL};

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

/// The thread: one batch at a time, one connection, reconnecting with a backoff.
pub fn run(chan: &Chan, client: &redis::Client, prefix: &str, zone: &str, interval_ms: u64) {
    let timeout = io_timeout(interval_ms);
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = Duration::from_millis(interval_ms);
    // Retries of a Redis that is down: a refused or timed-out connect every half second costs
    // little, and bounds how long global limits take to come back.
    let max_backoff = Duration::from_millis(interval_ms.max(500));
    let mut retry_at: Option<Instant> = None;
    let script = redis::Script::new(ratesync::SCRIPT);
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
            match sync_once(&mut conn, client, &script, timeout, prefix, zone, batch) {
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

fn connect(
    client: &redis::Client,
    script: &redis::Script,
    timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    let mut c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    c.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    script.prepare_invoke().load(&mut c)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    Ok(c)
}

/// One round trip: every key's charge in, every key's debt out. An empty batch is a ping.
fn sync_once(
    conn: &mut Option<redis::Connection>,
    client: &redis::Client,
    script: &redis::Script,
    timeout: Duration,
    prefix: &str,
    zone: &str,
    batch: Vec<Pending>,
) -> Result<Vec<(Pending, u64)>, String> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(connect(client, script, timeout).map_err(|e| e.to_string())?),
    };
    if batch.is_empty() {
        redis::cmd("PING")
            .query::<String>(c)
            .map_err(|e| e.to_string())?;
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for chunk in batch.chunks(KEYS_PER_CALL) {
        let cmd = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(chunk.len());
        for p in chunk {
            cmd.arg(ratesync::redis_key(prefix, zone, p.key));
        }
        for p in chunk {
            cmd.arg(p.charge_us);
        }
    }
    let replies: Vec<Vec<i64>> = match pipe.query(c) {
        Ok(r) => r,
        // Scripts are gone (Redis restarted, SCRIPT FLUSH): load it again, once.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load(c).map_err(|e| e.to_string())?;
            pipe.query(c).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let owed = replies.into_iter().flatten().map(|v| v.max(0) as u64);
    Ok(batch.into_iter().zip(owed).collect())
}
