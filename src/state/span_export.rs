//! `mesh_trace_export`: each worker's queue of finished spans and the thread that sends them
//! in batches over OTLP/HTTP.
//!
//! The request path only adds an encoded span to the worker's pile, under a mutex the thread
//! holds just long enough to take the pile (never across an export); a full pile drops the
//! span and counts it. The thread is woken only when a pile starts and when it holds a batch,
//! not for every span (a wake per span cost a system call and two context switches per
//! request: it halved the requests a traced worker could answer). It sends a batch when one
//! is full or when its oldest span has waited `interval`, and at worker exit sends what is
//! left within a second. Nothing it does can delay or fail a request: a receiver that is down costs the
//! spans, counted, and one `[warn]` (written by the worker's timer, on nginx's thread).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ngx::ffi::{ngx_log_t, NGX_LOG_NOTICE, NGX_LOG_WARN};

use mesh_core::otlp::{
    encode_export, parse_access_token, Attr, EncodedSpan, ExportSettings, Resource,
};

use super::metrics::{self, SpanDrop};
use super::refresher::http::{agent, get};

/// Longest one export may take while the worker runs.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a leaving worker gives the thread to send what is queued.
pub const EXIT_FLUSH: Duration = Duration::from_millis(900);

/// What `mesh_trace_export` configured, resolved at configuration time (the master reads the
/// environment: nginx clears it for its workers).
pub struct TraceExport {
    pub settings: ExportSettings,
    pub resource: Resource,
    /// `mesh_metadata_server`, for `auth=google` (access token, and the project id when no
    /// `mesh_trace_project` or `GOOGLE_CLOUD_PROJECT` names it).
    pub metadata_server: String,
}

/// Spans waiting for the thread, shared by the worker's request path and its thread.
struct Queue {
    pile: Mutex<Pile>,
    /// Signalled when a pile starts, when it holds a batch, and when the queue closes.
    wake: Condvar,
    batch: usize,
    /// Spans the pile holds at most (`queue=`).
    cap: usize,
}

#[derive(Default)]
struct Pile {
    spans: Vec<EncodedSpan>,
    /// When the oldest span of `spans` arrived.
    since: Option<Instant>,
    /// The worker is leaving: no more spans come.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pile> {
        // A panic while holding it leaves a pile of whole spans: still usable.
        self.pile.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a span, or says why it was dropped.
    fn push(&self, span: EncodedSpan) -> Result<(), SpanDrop> {
        let mut p = self.lock();
        if p.closed {
            return Err(SpanDrop::ExportFailed);
        }
        if p.spans.len() >= self.cap {
            return Err(SpanDrop::QueueFull);
        }
        p.spans.push(span);
        if p.spans.len() == 1 {
            p.since = Some(Instant::now());
            self.wake.notify_one();
        } else if p.spans.len() == self.batch {
            self.wake.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Waits until a batch is piled up, the oldest span has waited `interval`, or the queue
    /// closes; then takes up to a batch. `None` once the queue is closed (the pile is left for
    /// the exit flush).
    fn next_batch(&self, interval: Duration) -> Option<Vec<EncodedSpan>> {
        let mut p = self.lock();
        loop {
            if p.closed {
                return None;
            }
            let due = p.since.map(|t| t + interval);
            if p.spans.len() >= self.batch || due.is_some_and(|d| Instant::now() >= d) {
                return Some(self.take(&mut p));
            }
            let wait = due.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            p = match self.wake.wait_timeout(p, wait) {
                Ok((p, _)) => p,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Up to a batch of the oldest spans (the pile's clock restarts for what stays).
    fn take(&self, p: &mut Pile) -> Vec<EncodedSpan> {
        let n = p.spans.len().min(self.batch);
        let rest = p.spans.split_off(n);
        p.since = (!rest.is_empty()).then(Instant::now);
        std::mem::replace(&mut p.spans, rest)
    }
}

/// The worker's end of the queue (nginx's thread only).
struct Worker {
    queue: Arc<Queue>,
    /// Closed by the thread when it has sent what it could after the queue closed.
    done: Receiver<()>,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// A change of the receiver's state to log (from the thread, written by nginx's thread).
static NOTICE: Mutex<Option<(bool, String)>> = Mutex::new(None);
static HAS_NOTICE: AtomicBool = AtomicBool::new(false);

fn notice(up: bool, msg: String) {
    if let Ok(mut n) = NOTICE.lock() {
        *n = Some((up, msg));
        HAS_NOTICE.store(true, Ordering::Release);
    }
}

/// Writes the receiver's change of state, if any, to nginx's log: `[warn]` when exports start
/// failing, `[notice]` when they work again. On the worker's event loop (its timer), where
/// nginx's logger may be used.
pub fn log_notice(log: *mut ngx_log_t) {
    if !HAS_NOTICE.swap(false, Ordering::Acquire) {
        return;
    }
    if let Some((up, msg)) = NOTICE.lock().ok().and_then(|mut n| n.take()) {
        let level = if up { NGX_LOG_NOTICE } else { NGX_LOG_WARN };
        ngx::ngx_log_error!(level as usize, log, "mesh: {}", msg);
    }
}

/// Starts this worker's exporter thread (`init_process`).
pub fn start_worker(conf: &Arc<TraceExport>) -> Result<(), String> {
    let queue = Arc::new(Queue {
        pile: Mutex::new(Pile::default()),
        wake: Condvar::new(),
        batch: conf.settings.batch.max(1),
        cap: conf.settings.queue.max(1),
    });
    let (done_tx, done) = mpsc::channel();
    let conf = Arc::clone(conf);
    let thread_queue = Arc::clone(&queue);
    std::thread::Builder::new()
        .name("mesh-spans".into())
        .spawn(move || {
            Sender::new(conf).run(&thread_queue);
            drop(done_tx);
        })
        .map_err(|e| format!("cannot start the span export thread: {e}"))?;
    WORKER.with(|w| *w.borrow_mut() = Some(Worker { queue, done }));
    Ok(())
}

/// Queues a finished span; drops (and counts) it when the queue is full.
pub fn submit(span: EncodedSpan) {
    WORKER.with(|w| {
        let w = w.borrow();
        let Some(w) = w.as_ref() else { return };
        if let Err(why) = w.queue.push(span) {
            metrics::count_spans_dropped(why, 1);
        }
    });
}

/// Whether this worker exports spans (so the request path builds them only then).
pub fn active() -> bool {
    WORKER.with(|w| w.borrow().is_some())
}

/// A leaving worker (`exit_process`): closes the queue and waits, at most [`EXIT_FLUSH`] and
/// a little, for the thread to send what is left.
pub fn stop_worker() {
    if let Some(w) = WORKER.with(|w| w.borrow_mut().take()) {
        w.queue.close();
        let _ = w.done.recv_timeout(EXIT_FLUSH + Duration::from_millis(100));
    }
}

/// The thread's side.
struct Sender {
    conf: Arc<TraceExport>,
    agent: ureq::Agent,
    resource: Resource,
    /// The resource names its project (or needs none).
    project_known: bool,
    /// `auth=google`: the access token and when to fetch a new one.
    token: Option<(String, Instant)>,
    /// The last export failed (a `[warn]` was noted; the next success notes recovery).
    failing: bool,
}

impl Sender {
    fn new(conf: Arc<TraceExport>) -> Sender {
        let resource = conf.resource.clone();
        let project_known = !conf.settings.auth_google
            || resource
                .attributes
                .iter()
                .any(|a| a.key == "gcp.project_id");
        Sender {
            agent: agent(None, EXPORT_TIMEOUT, false),
            resource,
            project_known,
            token: None,
            failing: false,
            conf,
        }
    }

    fn run(&mut self, queue: &Queue) {
        let max = queue.batch;
        let interval = Duration::from_millis(self.conf.settings.interval_ms);
        while let Some(mut batch) = queue.next_batch(interval) {
            self.send(&mut batch, None);
        }
        // The worker is leaving: what is queued goes now, within the exit bound.
        let deadline = Instant::now() + EXIT_FLUSH;
        self.agent = agent(None, EXIT_FLUSH, false);
        let mut batch = std::mem::take(&mut queue.lock().spans);
        while !batch.is_empty() {
            if Instant::now() >= deadline {
                metrics::count_spans_dropped(SpanDrop::Shutdown, batch.len() as u64);
                break;
            }
            let rest = batch.split_off(batch.len().min(max));
            self.send(&mut batch, Some(deadline));
            batch = rest;
        }
    }

    /// Sends `batch` (emptied either way), counting what arrived or was lost.
    fn send(&mut self, batch: &mut Vec<EncodedSpan>, deadline: Option<Instant>) {
        let n = batch.len() as u64;
        let result = self.export(batch, deadline);
        batch.clear();
        match result {
            Ok(()) => {
                metrics::count_spans_exported(n);
                if self.failing {
                    self.failing = false;
                    notice(
                        true,
                        format!("span export to {} works again", self.conf.settings.url),
                    );
                }
            }
            Err(e) => {
                metrics::count_spans_dropped(SpanDrop::ExportFailed, n);
                if !self.failing {
                    self.failing = true;
                    notice(
                        false,
                        format!(
                            "span export to {} failed ({e}); spans are dropped and counted until it works again",
                            self.conf.settings.url
                        ),
                    );
                }
            }
        }
    }

    fn export(&mut self, batch: &[EncodedSpan], deadline: Option<Instant>) -> Result<(), String> {
        if !self.project_known {
            self.find_project()?;
        }
        let body = encode_export(&self.resource, batch);
        let mut req = self
            .agent
            .post(&self.conf.settings.url)
            .header("Content-Type", "application/x-protobuf");
        let bearer;
        if self.conf.settings.auth_google {
            bearer = format!("Bearer {}", self.access_token()?);
            req = req.header("Authorization", &bearer);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err("no time left".into());
        }
        let resp = req.send(&body[..]).map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }

    /// `auth=google` without a configured project: the metadata server names it.
    fn find_project(&mut self) -> Result<(), String> {
        let url = format!(
            "{}/computeMetadata/v1/project/project-id",
            self.conf.metadata_server.trim_end_matches('/')
        );
        let (body, _) = get(&self.agent, &url, Some(("Metadata-Flavor", "Google")))
            .map_err(|e| format!("project id from the metadata server: {e}"))?;
        let id = String::from_utf8(body).map_err(|_| "project id is not text".to_string())?;
        let id = id.trim();
        if id.is_empty() {
            return Err("the metadata server named no project".into());
        }
        self.resource
            .attributes
            .push(Attr::str("gcp.project_id", id.to_owned()));
        self.project_known = true;
        Ok(())
    }

    /// The metadata server's access token for the instance's service account, fetched again
    /// a minute before it expires.
    fn access_token(&mut self) -> Result<String, String> {
        if let Some((t, renew)) = &self.token {
            if Instant::now() < *renew {
                return Ok(t.clone());
            }
        }
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            self.conf.metadata_server.trim_end_matches('/')
        );
        let (body, _) = get(&self.agent, &url, Some(("Metadata-Flavor", "Google")))
            .map_err(|e| format!("access token from the metadata server: {e}"))?;
        let (token, ttl) = parse_access_token(&body)?;
        let renew = Instant::now() + Duration::from_secs(ttl.saturating_sub(60));
        self.token = Some((token.clone(), renew));
        Ok(token)
    }
}
