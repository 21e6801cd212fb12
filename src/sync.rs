//! Locking that survives a panic elsewhere: a thread that panicked while
//! holding a lock must not take every VM of the daemon down with it, and the
//! data behind these locks stays consistent at every unlock.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data over from a thread that panicked holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
