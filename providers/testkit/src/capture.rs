//! Captures everything a provider logs (TRACE and up, every target) while
//! it runs, so the suite can search the text for secrets: what its calls
//! log (a subscriber around each call), and what tasks it spawns log (a
//! process-wide subscriber, installed once, read from the capture's start;
//! the test binary must not install another global subscriber).

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::Dispatch;
use tracing::instrument::WithSubscriber;
use tracing_subscriber::fmt::MakeWriter;

/// A log buffer and the subscriber that fills it.
#[derive(Clone)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
    dispatch: Dispatch,
    /// The process-wide buffer, and where it stood when this began.
    global: Option<(Arc<Mutex<Vec<u8>>>, usize)>,
}

/// The process-wide buffer behind the global subscriber, if this process
/// could install it.
fn global() -> Option<&'static Arc<Mutex<Vec<u8>>>> {
    static GLOBAL: std::sync::OnceLock<Option<Arc<Mutex<Vec<u8>>>>> = std::sync::OnceLock::new();
    GLOBAL
        .get_or_init(|| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(Sink(Arc::clone(&buf)))
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .ok()
                .map(|()| buf)
        })
        .as_ref()
}

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Default for LogCapture {
    fn default() -> Self {
        Self::new()
    }
}

impl LogCapture {
    /// A fresh, empty capture.
    pub fn new() -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(Sink(Arc::clone(&buf)))
            .finish();
        let global = global().map(|g| {
            let start = g.lock().unwrap_or_else(|p| p.into_inner()).len();
            (Arc::clone(g), start)
        });
        Self {
            buf,
            dispatch: Dispatch::new(subscriber),
            global,
        }
    }

    /// Whether tasks the provider spawns are captured too (this process
    /// installed the global subscriber).
    pub fn captures_spawned_tasks(&self) -> bool {
        self.global.is_some()
    }

    /// Runs `fut` with this capture as its subscriber (on whatever thread
    /// polls it).
    pub fn around<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        fut.with_subscriber(self.dispatch.clone())
    }

    /// Everything captured so far: the calls' own logs, then what any
    /// thread logged since this capture began (other tests' lines too, when
    /// they run in parallel: more text searched, never less).
    pub fn text(&self) -> String {
        let mut out = {
            let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(&buf).into_owned()
        };
        if let Some((g, start)) = &self.global {
            let g = g.lock().unwrap_or_else(|p| p.into_inner());
            out.push_str(&String::from_utf8_lossy(
                g.get(*start..).unwrap_or_default(),
            ));
        }
        out
    }
}
