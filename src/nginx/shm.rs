//! A shared zone's mutex held as a value: released when the guard drops, also when the code
//! that holds it panics (the panic is caught at the FFI boundary), so no lock outlives it.

use ngx::ffi::{ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_pool_t};

pub struct Locked<'a> {
    pool: &'a mut ngx_slab_pool_t,
}

impl<'a> Locked<'a> {
    /// Takes the zone's mutex (blocking, as nginx's own zones do for a few words of work).
    pub fn new(pool: &'a mut ngx_slab_pool_t) -> Locked<'a> {
        // SAFETY: `pool` is a live slab pool at the start of its zone; its mutex was set up
        // by nginx when the zone was created.
        unsafe { ngx_shmtx_lock(&mut pool.mutex) };
        Locked { pool }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard took the mutex in `new` and has not released it.
        unsafe { ngx_shmtx_unlock(&mut self.pool.mutex) };
    }
}
