//! For tests: what the code under test logs, kept to be looked at.

use std::sync::{Arc, Mutex};

/// A tracing subscriber for this thread that keeps what is logged at `WARN` and above; it is
/// the thread's default until the guard is dropped.
pub(crate) fn capture() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    capture_at(tracing::Level::WARN)
}

/// [`capture`], keeping what is logged at `level` and above.
pub(crate) fn capture_at(
    level: tracing::Level,
) -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Arc::default());
    let kept = buf.0.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || buf.clone())
        .finish();
    (kept, tracing::subscriber::set_default(subscriber))
}
