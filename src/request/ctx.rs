//! The request context: everything the module learned about one request, with one owner
//! (the request pool) and one accessor (`RequestCtx::of`).
//!
//! It is computed on first use: by the access handler, or by a `$mesh_*` variable read
//! earlier (in `map`, `set`, a rewrite-phase `if`), so every variable sees the same answer in
//! every phase. It survives internal redirects (`error_page`, `try_files`, `index`): a
//! request is charged against a rate-limit zone once, and keeps its span, however many
//! locations it passes through. Handlers only ever hold shared references to it (nginx may
//! call a variable getter while the access handler runs); what changes is in `Cell`s.

use std::cell::{Cell, OnceCell, RefCell};
use std::ffi::c_void;
use std::ptr;

use mesh_core::decision::Decision;
use mesh_core::status::AuthStatus;
use ngx::ffi::{ngx_http_request_t, ngx_pool_cleanup_add, ngx_table_elt_t};
use ngx::http::{HttpModule, HttpModuleLocationConf, Request};

use super::identify::{identify, same_identity_settings, Identity};
use super::trace::{self, Trace};
use crate::conf::LocConf;
use crate::MeshModule;

pub struct RequestCtx {
    /// The request this context belongs to (subrequests share the pool, not the context).
    owner: *const ngx_http_request_t,
    /// Who the caller is, as first identified (in the context itself: nothing allocated).
    first: Identity,
    /// Identities computed again after an internal redirect to a location that identifies
    /// differently (rare). Kept, never dropped, until the request is: references handed out
    /// by `identity` stay valid. Boxed: an identity must not move when the `Vec` grows.
    #[allow(clippy::vec_box)]
    later: RefCell<Vec<Box<Identity>>>,
    /// The identity in force: `first` or the last of `later`.
    current: Cell<*const Identity>,
    /// Set by the access phase; before it, derived from the identity.
    decision: Cell<Option<Decision>>,
    /// The rule that decided (`$mesh_rule`), as written with its file:line: borrowed from
    /// the configuration, which outlives every request.
    rule: Cell<&'static str>,
    /// Rate-limit zones this request was already charged in (by address); a location has
    /// one, so two slots cover a redirect, and more go to `charged_more`.
    charged: Cell<[*const c_void; 2]>,
    charged_more: RefCell<Vec<*const c_void>>,
    /// This hop's trace (`mesh_trace on`), started on first use; kept across redirects.
    trace: OnceCell<Option<Trace>>,
    /// The access handler rewrote the upstream headers in this pass of the phases (taken by
    /// the pre-content handler, so the next pass after an internal redirect starts unset).
    upstream_rewritten: Cell<bool>,
    /// The `WWW-Authenticate` this module added to a 401, withdrawn if another access module
    /// admits the request after all (`satisfy any`).
    /// With the pass of the phases it was added in (see `rate_refused_pass`): a 401 that
    /// stands and is then answered by an `error_page` keeps its challenge.
    challenge: Cell<(*mut ngx_table_elt_t, u32)>,
    /// The pass of the phases (`r->uri_changes`, lowered by each internal redirect) in which
    /// the rate limit refused the request: in that pass, nothing may overrule it.
    rate_refused_pass: Cell<Option<u32>>,
    /// `mesh_outbound_auth`: until when (ms) the request waits for a token (0: not waiting).
    outbound_wait_until: Cell<u64>,
    /// `mesh_outbound_auth`: whether the client sent its own `Authorization` (decided once, on
    /// the first pass; later passes find the module's own header there).
    outbound_client_auth: Cell<Option<bool>>,
    /// The request reached `mesh_outbound_auth` (it is an outbound call, counted per route).
    outbound_used: Cell<bool>,
}

/// Drops the context when the request pool is freed.
unsafe extern "C" fn cleanup(data: *mut c_void) {
    // SAFETY: `data` is the RequestCtx written in `RequestCtx::of`, dropped exactly once here.
    unsafe { ptr::drop_in_place(data.cast::<RequestCtx>()) }
}

impl RequestCtx {
    /// The context of `r`: found again after an internal redirect (nginx clears `r->ctx`
    /// then, so it is looked up through the pool's cleanup list, as nginx's realip module
    /// does), or created with the caller identified. Re-identifies when the location's
    /// identity settings differ from those it was computed under.
    ///
    /// The context lives in the request pool, outside `*r`, until the request is freed: the
    /// reference is valid for the handler call that asked for it, and must not be kept
    /// longer (hence no lifetime tied to the borrow of `r`, which the caller may need to
    /// borrow mutably meanwhile).
    pub fn of<'a>(r: &Request) -> Option<&'a RequestCtx> {
        let lcf = MeshModule::location_conf(r)?;
        let ctx = match Self::find(r) {
            Some(ctx) => ctx,
            None => return Self::create(r, lcf),
        };
        let old = ctx.identity().conf;
        if !ptr::eq(old, lcf) {
            // SAFETY: configurations live for the whole cycle.
            let same = unsafe { old.as_ref() }.is_some_and(|o| same_identity_settings(o, lcf));
            if !same {
                // Identified with no borrow held: the token may come from a variable.
                let id = identify(r, lcf);
                ctx.set_identity(id);
            }
        }
        Some(ctx)
    }

    /// The context of `r` if one was created, without creating one.
    pub fn existing<'a>(r: &Request) -> Option<&'a RequestCtx> {
        Self::find(r)
    }

    pub fn set_upstream_rewritten(&self, done: bool) {
        self.upstream_rewritten.set(done);
    }

    /// Until when (ms) the request waits for an outbound token: set on first call to
    /// `now + wait`, the same afterwards.
    pub fn outbound_wait_until(&self, now: u64, wait: u64) -> u64 {
        if self.outbound_wait_until.get() == 0 {
            self.outbound_wait_until
                .set(now.saturating_add(wait).max(1));
        }
        self.outbound_wait_until.get()
    }

    /// Whether the client sent its own `Authorization` (`None`: not decided yet).
    pub fn outbound_client_auth(&self) -> Option<bool> {
        self.outbound_client_auth.get()
    }

    pub fn set_outbound_client_auth(&self, own: bool) {
        self.outbound_client_auth.set(Some(own));
    }

    pub fn set_outbound_used(&self) {
        self.outbound_used.set(true);
    }

    /// Whether the request reached `mesh_outbound_auth`.
    pub fn outbound_used(&self) -> bool {
        self.outbound_used.get()
    }

    /// Whether the access handler rewrote the upstream headers in this pass; resets it.
    pub fn take_upstream_rewritten(&self) -> bool {
        self.upstream_rewritten.replace(false)
    }

    /// Remembers that the rate limit refused the request in this pass of the phases.
    pub fn set_rate_refused(&self, r: &Request) {
        self.rate_refused_pass.set(Some(r.as_ref().uri_changes()));
    }

    /// Whether the rate limit refused the request in this pass of the phases; forgets it.
    pub fn take_rate_refused(&self, r: &Request) -> bool {
        self.rate_refused_pass.take() == Some(r.as_ref().uri_changes())
    }

    /// Remembers the `WWW-Authenticate` header element of this module's 401.
    pub fn set_challenge(&self, r: &Request, h: *mut ngx_table_elt_t) {
        self.challenge.set((h, r.as_ref().uri_changes()));
    }

    /// The `WWW-Authenticate` element of this module's 401 if it was added in this pass of
    /// the phases (so another access module overruled that 401), else NULL; forgets it.
    pub fn take_challenge(&self, r: &Request) -> *mut ngx_table_elt_t {
        let (h, pass) = self.challenge.replace((ptr::null_mut(), 0));
        if pass == r.as_ref().uri_changes() {
            h
        } else {
            ptr::null_mut()
        }
    }

    fn find<'a>(r: &Request) -> Option<&'a RequestCtx> {
        let module = MeshModule::module();
        if let Some(ctx) = r.get_module_ctx::<RequestCtx>(module) {
            // SAFETY: as in `of`: the context is in the pool, alive until the request is freed.
            return Some(unsafe { &*(ctx as *const RequestCtx) });
        }
        let raw: *const ngx_http_request_t = r.into();
        // SAFETY: the cleanup list of the live request pool is a well-formed linked list;
        // a handler equal to `cleanup` marks data written by this module as a RequestCtx.
        unsafe {
            let mut cln = (*r.as_ref().pool).cleanup;
            while !cln.is_null() {
                let ours = (*cln).handler.is_some_and(|h| {
                    ptr::fn_addr_eq(h, cleanup as unsafe extern "C" fn(*mut c_void))
                });
                if ours && (*(*cln).data.cast::<RequestCtx>()).owner == raw {
                    r.set_module_ctx((*cln).data, module);
                    return Some(&*(*cln).data.cast::<RequestCtx>());
                }
                cln = (*cln).next;
            }
        }
        None
    }

    fn create<'a>(r: &Request, lcf: &LocConf) -> Option<&'a RequestCtx> {
        let id = identify(r, lcf);
        // SAFETY: the cleanup entry gets a properly sized, aligned block from the request
        // pool; it is initialised before the handler is set, and dropped by that handler only.
        unsafe {
            let cln = ngx_pool_cleanup_add(r.as_ref().pool, size_of::<RequestCtx>());
            if cln.is_null() {
                return None;
            }
            let p = (*cln).data.cast::<RequestCtx>();
            ptr::write(
                p,
                RequestCtx {
                    owner: r.into(),
                    first: id,
                    later: RefCell::new(Vec::new()),
                    current: Cell::new(ptr::null()),
                    decision: Cell::new(None),
                    rule: Cell::new(""),
                    charged: Cell::new([ptr::null(); 2]),
                    charged_more: RefCell::new(Vec::new()),
                    trace: OnceCell::new(),
                    upstream_rewritten: Cell::new(false),
                    challenge: Cell::new((ptr::null_mut(), 0)),
                    rate_refused_pass: Cell::new(None),
                    outbound_wait_until: Cell::new(0),
                    outbound_client_auth: Cell::new(None),
                    outbound_used: Cell::new(false),
                },
            );
            // The context does not move from here on: `current` may point into it.
            (*p).current.set(ptr::addr_of!((*p).first));
            (*cln).handler = Some(cleanup);
            r.set_module_ctx(p.cast(), MeshModule::module());
            Some(&*p)
        }
    }

    fn set_identity(&self, id: Identity) {
        let id = Box::new(id);
        self.current.set(&*id);
        self.later.borrow_mut().push(id);
        self.decision.set(None);
        self.rule.set("");
    }

    /// Who the caller is (no borrow is held: a later identity does not replace this one in
    /// memory).
    pub fn identity(&self) -> &Identity {
        // SAFETY: `current` points at `first` or at a boxed identity in `later`; neither
        // moves nor is dropped before the context (see `later`).
        unsafe { &*self.current.get() }
    }

    pub fn decision(&self) -> Option<Decision> {
        if let Some(d) = self.decision.get() {
            return Some(d);
        }
        let id = self.identity();
        match id.status {
            AuthStatus::Off => None,
            AuthStatus::Verified => Some(Decision::Allow),
            AuthStatus::Missing if id.optional => Some(Decision::Allow),
            _ => Some(Decision::Unauthenticated),
        }
    }

    /// Whether the access phase decided already (not merely derived from the identity).
    pub fn decided(&self) -> bool {
        self.decision.get().is_some()
    }

    pub fn decide(&self, d: Decision) {
        self.decision.set(Some(d));
    }

    /// `$mesh_rule`; empty before a rule decided.
    pub fn rule(&self) -> &'static str {
        self.rule.get()
    }

    /// The rule that decided: text of the configuration (`'static`, as nginx's
    /// configurations are to the module), or static text.
    pub fn set_rule(&self, rule: &'static str) {
        self.rule.set(rule);
    }

    /// Charges the request in a zone once: `false` if it was charged there already.
    pub fn charge_once(&self, zone: *const c_void) -> bool {
        let mut slots = self.charged.get();
        if slots.contains(&zone) || self.charged_more.borrow().contains(&zone) {
            return false;
        }
        match slots.iter_mut().find(|s| s.is_null()) {
            Some(free) => {
                *free = zone;
                self.charged.set(slots);
            }
            None => self.charged_more.borrow_mut().push(zone),
        }
        true
    }

    /// This hop's trace, started from the request's headers on first use: the one place a
    /// trace is started. `None` where `mesh_trace` is off.
    pub fn trace(&self, r: &Request, lcf: &LocConf) -> Option<&Trace> {
        if !lcf.trace {
            return None;
        }
        self.trace.get_or_init(|| trace::start(r, lcf)).as_ref()
    }

    /// The trace if one was started (for logging), without starting one.
    pub fn started_trace(&self) -> Option<&Trace> {
        self.trace.get().and_then(Option::as_ref)
    }
}
