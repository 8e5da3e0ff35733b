//! `mesh_require_auth on|off;`: `nginx -t` fails on every route that serves requests
//! without `mesh_auth` nobody opened on purpose, and prints the policy surface of the rest.
//!
//! Three moments: `create_loc_conf` notes which block opened a level and where (the words
//! of that block's directive are still in `cf->args`); merging notes where the `mesh_auth` in
//! force was written and turns each server and location into a `mesh_core::audit::Route`;
//! `postconfiguration`, once every level is merged, logs one `[emerg]` per unprotected route
//! at its own file:line and fails, or logs the summary at `notice`. The rule itself is
//! `Route::verdict` in mesh-core.

use std::ffi::c_void;
use std::ptr;

use mesh_core::audit::{OpenReason, Route, RouteKind, Summary, Verdict, Written};
use ngx::core::Pool;
use ngx::ffi::{ngx_conf_t, NGX_LOG_NOTICE};
use ngx::http::HttpModuleMainConf;

use super::{LocConf, MainConf};
use crate::nginx::conf::{args, ConfPos};
use crate::nginx::location::{answers_with_return, is_internal, satisfy_any_bypass, Bypass};
use crate::nginx::no_panic;
use crate::MeshModule;

/// Which block opened a configuration level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Block {
    Http,
    Server,
    Location,
    /// `if` or `limit_except`: part of its location (they may not hold `mesh_auth`).
    Nested,
    /// Any other block that makes location configurations (`upstream`); never merged.
    #[default]
    Other,
}

/// What the check knows about one level.
#[derive(Clone, Debug, Default)]
pub struct LevelFacts {
    block: Block,
    /// A location's modifier and name as written (`= /healthz`, `@app`).
    name: String,
    /// Where the block opens.
    pos: ConfPos,
    /// Merged already (the http level never is: it is only ever the parent).
    merged: bool,
    /// Where the `mesh_auth` in force was written.
    written: Option<Written>,
    /// The server this level belongs to (its index in `Audit::servers`).
    server: Option<usize>,
    /// That server answers every request with `return`.
    server_returns: bool,
}

impl LevelFacts {
    fn level(&self) -> Written {
        match self.block {
            Block::Http => Written::Http,
            Block::Server => Written::Server,
            _ => Written::Location,
        }
    }

    /// Called when `self`'s level is merged with its parent's, before inheriting: whether each
    /// level wrote `mesh_auth` itself.
    pub fn inherit(&mut self, parent: &LevelFacts, wrote_here: bool, parent_wrote: bool) {
        let from_parent = if parent.merged {
            parent.written.unwrap_or(Written::Nowhere)
        } else if parent_wrote {
            parent.level()
        } else {
            Written::Nowhere
        };
        self.written = Some(if wrote_here {
            self.level()
        } else {
            from_parent
        });
        self.server = parent.server;
        self.server_returns = parent.server_returns;
        self.merged = true;
    }

    /// The `route` label of a location's outbound metrics: its name as written (empty for
    /// other levels; an `if` block takes its location's).
    pub fn route_name(&self) -> String {
        self.name.clone()
    }

    /// A location block (also a nested or named one).
    pub fn is_location(&self) -> bool {
        self.block == Block::Location
    }

    /// `location /` (or `^~ /`) directly in a server: no request falls through to the
    /// server's own configuration.
    fn catches_all(&self) -> bool {
        self.block == Block::Location && (self.name == "/" || self.name == "^~ /")
    }
}

/// The routes of one configuration, gathered while merging.
#[derive(Default)]
pub struct Audit {
    /// Some level runs with `mesh_require_auth on`.
    enabled: bool,
    routes: Vec<Route>,
    servers: Vec<ServerEntry>,
}

struct ServerEntry {
    /// Its default route in `routes`, if it is checked.
    default_route: Option<usize>,
    /// It has a `location /`: its default route is never used.
    caught: bool,
}

/// `create_loc_conf`: the module's location configuration, knowing which block opened it.
///
/// # Safety
/// Called by nginx with its configuration context while a block that makes location
/// configurations (`http`, `server`, `location`, `if`, `limit_except`, `upstream`) opens.
pub unsafe extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    no_panic(ptr::null_mut(), || {
        // SAFETY: see the function's contract: `cf->args` holds the words of the directive
        // that opens the block, and `cf->pool` is the configuration pool.
        unsafe {
            let facts = opening(cf);
            let lcf = LocConf {
                facts,
                ..LocConf::default()
            };
            Pool::from_ngx_pool((*cf).pool).allocate(lcf) as *mut c_void
        }
    })
}

/// The block being opened, from the words of its directive.
///
/// # Safety
/// As `create_loc_conf`.
unsafe fn opening(cf: *mut ngx_conf_t) -> LevelFacts {
    // SAFETY: see `create_loc_conf`; `cf->args` may be NULL for a level nginx makes itself.
    let (words, pos) = unsafe {
        let words = if (*cf).args.is_null() {
            &[][..]
        } else {
            args(cf)
        };
        (words, ConfPos::current(cf))
    };
    let word = |i: usize| words.get(i).map(|w| w.to_string()).unwrap_or_default();
    let block = match word(0).as_str() {
        "http" => Block::Http,
        "server" => Block::Server,
        "location" => Block::Location,
        "if" | "limit_except" => Block::Nested,
        _ => Block::Other,
    };
    let name = if block == Block::Location {
        (1..words.len()).map(word).collect::<Vec<_>>().join(" ")
    } else {
        String::new()
    };
    LevelFacts {
        block,
        name,
        pos,
        ..LevelFacts::default()
    }
}

/// A server or location, as a route: checked if `mesh_require_auth` is on there, and
/// returned in every case (for the access report), with whether it is a `location /` that
/// answers every request of its server.
pub struct Recorded {
    pub route: Route,
    pub catches_all: bool,
}

/// After `conf` was merged with its parent: a server or location becomes a route, checked if
/// `mesh_require_auth` is on there.
///
/// # Safety
/// `cf` must be nginx's configuration context during this module's `merge_loc_conf` of `conf`.
pub unsafe fn record(
    cf: *mut ngx_conf_t,
    audit: &mut Audit,
    parent: &LocConf,
    conf: &mut LocConf,
) -> Option<Recorded> {
    let required = conf.require_auth;
    let mut catches_all = false;
    audit.enabled |= required || parent.require_auth;
    let facts = &mut conf.facts;
    let kind = match facts.block {
        Block::Server => {
            // SAFETY: see the function's contract.
            facts.server_returns = unsafe { answers_with_return(cf) };
            facts.server = Some(audit.servers.len());
            audit.servers.push(ServerEntry {
                default_route: None,
                caught: false,
            });
            RouteKind::ServerDefault
        }
        Block::Location => {
            if parent.facts.block == Block::Server && facts.catches_all() {
                catches_all = true;
                if let Some(s) = facts.server.and_then(|i| audit.servers.get_mut(i)) {
                    s.caught = true;
                }
            }
            RouteKind::Location(facts.name.clone())
        }
        _ => return None,
    };
    // SAFETY: see the function's contract.
    let (returns, internal, bypass) = unsafe {
        (
            answers_with_return(cf),
            is_internal(cf),
            satisfy_any_bypass(cf),
        )
    };
    let auth = conf.auth.as_deref();
    let route = Route {
        internal: internal || facts.name.starts_with('@'),
        bypass: bypass.map(|b| match b {
            Bypass::Allow => mesh_core::audit::Bypass::Allow,
            Bypass::AuthBasic => mesh_core::audit::Bypass::AuthBasic,
            Bypass::AuthRequest => mesh_core::audit::Bypass::AuthRequest,
        }),
        // A server's `return` runs in the server-rewrite phase, which a request handed to a
        // named location (`error_page 404 = @app`, `try_files ... @app`) skips.
        return_only: (facts.server_returns && !facts.name.starts_with('@')) || returns,
        providers: auth.map(|a| a.names.clone()).unwrap_or_default(),
        optional: auth.is_some_and(|a| a.optional),
        written: facts.written.unwrap_or(Written::Nowhere),
        file: facts.pos.file.clone(),
        line: facts.pos.line,
        kind,
    };
    if required {
        if route.kind == RouteKind::ServerDefault {
            if let Some(s) = facts.server.and_then(|i| audit.servers.get_mut(i)) {
                s.default_route = Some(audit.routes.len());
            }
        }
        audit.routes.push(route.clone());
    }
    Some(Recorded { route, catches_all })
}

/// In `postconfiguration`: one `[emerg]` per unprotected route, each at its own file:line,
/// then `Err`; or the summary at `notice`.
///
/// # Safety
/// `cf` must be nginx's configuration context in `postconfiguration`.
pub unsafe fn finish(cf: *mut ngx_conf_t) -> Result<(), ()> {
    // SAFETY: as this function's contract.
    no_panic(Err(()), || unsafe { check(cf) })
}

/// `finish`, which catches a panic.
///
/// # Safety
/// As `finish`.
unsafe fn check(cf: *mut ngx_conf_t) -> Result<(), ()> {
    // SAFETY: see the function's contract: the http block was parsed, so this module's main
    // configuration exists; `cf->log` is valid for the whole configuration pass.
    let (mcf, log): (&mut MainConf, _) = unsafe {
        let Some(mcf) = MeshModule::main_conf_mut(&*cf) else {
            return Err(());
        };
        (mcf, (*cf).log)
    };
    let audit = std::mem::take(&mut mcf.audit);
    if !audit.enabled {
        return Ok(());
    }
    let unused: Vec<usize> = audit
        .servers
        .iter()
        .filter(|s| s.caught)
        .filter_map(|s| s.default_route)
        .collect();
    let routes: Vec<&Route> = audit
        .routes
        .iter()
        .enumerate()
        .filter(|(i, _)| !unused.contains(i))
        .map(|(_, r)| r)
        .collect();
    let mut failed = false;
    for r in routes
        .iter()
        .filter(|r| r.verdict() == Verdict::Unprotected)
    {
        let pos = ConfPos {
            file: r.file.clone(),
            line: r.line,
        };
        pos.error(cf, &r.complaint());
        failed = true;
    }
    if failed {
        return Err(());
    }
    // A route open although its mesh_auth is on says why, at its own line.
    for r in &routes {
        let v = r.verdict();
        if let Verdict::Open(OpenReason::SatisfyAny(_)) = v {
            let name = match &r.kind {
                RouteKind::Location(n) => format!("location \"{n}\""),
                RouteKind::ServerDefault => "this server".into(),
            };
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "mesh_require_auth: {name} is {} in {}:{}",
                v.describe(),
                r.file,
                r.line
            );
        }
    }
    ngx::ngx_log_error!(
        NGX_LOG_NOTICE,
        log,
        "{}",
        Summary::of(routes.iter().copied())
    );
    Ok(())
}
