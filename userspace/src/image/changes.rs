//! Tells whoever keeps state derived from an image's contents (the replica
//! service's checksum tree) which byte ranges changed, whatever path wrote
//! them: the replica write stream or a client of the NBD export.

use std::sync::{Arc, PoisonError, RwLock};

/// Receives the byte ranges of an image that changed.
pub trait ChangeListener: Send + Sync + 'static {
    /// `len` bytes at `offset` may hold new contents. Called after the
    /// write completed, before the writer is told it did; must be quick
    /// (it runs on the writer's task).
    fn changed(&self, offset: u64, len: u64);
}

/// A shared fan-out of image changes: writers call [`ImageChanges::changed`],
/// listeners [`ImageChanges::subscribe`]. Cheap to clone; every clone
/// reaches the same listeners. With no listener (`tern nbd serve`) a change
/// costs one uncontended read lock.
#[derive(Clone, Default)]
pub struct ImageChanges {
    listeners: Arc<RwLock<Vec<Arc<dyn ChangeListener>>>>,
}

impl ImageChanges {
    /// A notifier nobody listens to yet.
    pub fn new() -> ImageChanges {
        ImageChanges::default()
    }

    /// Adds a listener; it hears every change reported from now on.
    pub fn subscribe(&self, listener: Arc<dyn ChangeListener>) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    /// Reports that `len` bytes at `offset` changed.
    pub fn changed(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for listener in listeners.iter() {
            listener.changed(offset, len);
        }
    }
}

impl std::fmt::Debug for ImageChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("ImageChanges")
            .field("listeners", &listeners)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, u64)>>);

    impl ChangeListener for Log {
        fn changed(&self, offset: u64, len: u64) {
            self.0.lock().expect("log lock").push((offset, len));
        }
    }

    #[test]
    fn every_clone_reaches_every_listener_and_empty_changes_are_dropped() {
        let changes = ImageChanges::new();
        changes.changed(1, 1); // nobody listens yet: nothing to do
        let (a, b) = (Arc::new(Log::default()), Arc::new(Log::default()));
        changes.subscribe(Arc::clone(&a) as _);
        let writer = changes.clone();
        writer.subscribe(Arc::clone(&b) as _);
        writer.changed(4096, 512);
        changes.changed(0, 0);
        for log in [a, b] {
            assert_eq!(*log.0.lock().expect("log lock"), vec![(4096, 512)]);
        }
    }
}
