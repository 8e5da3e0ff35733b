//! How a worker wakes its refresher thread (an unknown `kid` asks for keys now) without a
//! wake-up falling between the thread's check and its wait.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

pub struct Wakeup {
    lock: Mutex<()>,
    cond: Condvar,
}

/// The worker's only one (one refresher thread per worker process).
pub static WAKEUP: Wakeup = Wakeup {
    lock: Mutex::new(()),
    cond: Condvar::new(),
};

impl Wakeup {
    /// Held by the thread from checking its flags until it waits, and by a waker around
    /// setting a flag and notifying: the thread holds it only for that, never while fetching.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        match self.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn notify(&self) {
        self.cond.notify_one();
    }

    pub fn wait(&self, guard: MutexGuard<'_, ()>, timeout: Duration) {
        let _ = self.cond.wait_timeout(guard, timeout);
    }
}
