//! The relay's memory budget (README, "Memory budget"): what a connection and a request may hold,
//! and where the work on large bodies runs.
//!
//! `RELAY_MEMORY_BUDGET_BYTES` is spent in two parts, both fixed at start:
//! - every open connection is allowed [`CONNECTION_ALLOWANCE`]: the headers hyper may buffer
//!   ([`super::MAX_HEADER_BYTES`]), a small body ([`INLINE_BYTES`] as sent and as many
//!   decompressed), and its task, parser and response state. `RELAY_MAX_CONNECTIONS` bounds how
//!   many there are;
//! - a body larger than that lives in a [`Buffer`] of [`Buffers::size`] bytes (the larger cap,
//!   plus one byte to detect an expansion past it), and `RELAY_MAX_INFLIGHT_BYTES` bounds how
//!   many exist, the verify threads' own included (one each: what they inflate into, so a bomb
//!   or a bad signature never takes a slot; a verified body is swapped into a pool buffer, not
//!   copied). The buffers are allocated once and reused, never freed and allocated again:
//!   an allocator keeps freed large blocks in per-thread, per-size pages for a while, so under a
//!   flood the resident memory of churned buffers is several times what is live (measured:
//!   80 MiB over for 16 MiB live). A slot also covers the publisher's copy of a large body
//!   ([`Buffers::hold`]). A request that finds no slot free is answered 503 at once: nothing
//!   waits for memory.
//!
//! So an envelope of Catena's real size (well under 16 KiB) never needs a slot, and a flood of
//! bombs or stalled uploads that takes every slot cannot shed the real traffic.
//!
//! A body whose output may exceed [`INLINE_BYTES`] is inflated, verified and peeked on one of
//! `RELAY_BLOCKING_THREADS` threads of its own ([`Offload`]), never on the async threads.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies up to this size (as sent, and after gunzip) are handled on the async threads, in the
/// connection's allowance.
pub const INLINE_BYTES: usize = 16 * 1024;

/// What one connection may cost outside the buffers: 64 KiB of headers in hyper's read buffer,
/// a small body as sent and decompressed (or decompressed and the publisher's copy), and 32 KiB
/// for its task, hyper's and axum's state and the response.
pub const CONNECTION_ALLOWANCE: usize = super::MAX_HEADER_BYTES + 2 * INLINE_BYTES + 32 * 1024;

/// How long a large body waits for a verify thread before the answer is 503.
pub const BLOCKING_WAIT: Duration = Duration::from_secs(1);

/// No slot was free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// The large-body buffers: `slots` of `size` bytes, each either a buffer (in use or idle) or
/// held for a copy someone else makes. Allocated memory never exceeds `slots * size`.
pub struct Buffers {
    size: usize,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Vec<u8>>>,
    in_use: IntGauge,
}

impl Buffers {
    /// `inflight_bytes / size` buffers of `size` bytes, less the `reserved` ones that belong to
    /// the verify threads; `in_use` counts the bytes of those taken.
    pub fn new(inflight_bytes: usize, size: usize, reserved: usize, in_use: IntGauge) -> Arc<Self> {
        let size = size.max(1);
        let slots = (inflight_bytes / size).saturating_sub(reserved);
        Arc::new(Self {
            size,
            slots: Arc::new(Semaphore::new(slots.min(Semaphore::MAX_PERMITS))),
            idle: Mutex::new(Vec::new()),
            in_use,
        })
    }

    /// The capacity of every buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer of [`Self::size`] capacity, or `OverBudget` without waiting.
    pub fn take(self: &Arc<Self>) -> Result<Buffer, OverBudget> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| OverBudget)?;
        let reused = self.idle.lock().expect("not poisoned").pop();
        let vec = reused.unwrap_or_else(|| Vec::with_capacity(self.size));
        self.in_use.add(self.size as i64);
        Ok(Buffer {
            vec,
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// A slot for up to [`Self::size`] bytes allocated elsewhere (the publisher's copy of a
    /// large body): an idle buffer is freed if the pool would otherwise exceed its slots.
    pub fn hold(self: &Arc<Self>) -> Result<Held, OverBudget> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| OverBudget)?;
        let mut idle = self.idle.lock().expect("not poisoned");
        let spare = self.slots.available_permits();
        if idle.len() > spare {
            idle.truncate(spare);
        }
        drop(idle);
        self.in_use.add(self.size as i64);
        Ok(Held {
            pool: self.clone(),
            _permit: permit,
        })
    }
}

/// A large body: a `Vec` of [`Buffers::size`] capacity, back to the pool on drop. Never grow it
/// past its capacity (one that was is freed, not pooled).
pub struct Buffer {
    vec: Vec<u8>,
    pool: Arc<Buffers>,
    // Dropped after `drop` has put the vec back: idle buffers never outnumber free slots.
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Buffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.vec
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.vec
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.pool.in_use.sub(self.pool.size as i64);
        let mut vec = std::mem::take(&mut self.vec);
        if vec.capacity() == self.pool.size {
            vec.clear();
            self.pool.idle.lock().expect("not poisoned").push(vec);
        }
    }
}

/// A slot held for memory allocated elsewhere; released on drop.
pub struct Held {
    pool: Arc<Buffers>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.in_use.sub(self.pool.size as i64);
    }
}

/// The threads large bodies are inflated and verified on: `RELAY_BLOCKING_THREADS` of them,
/// started once, so their number (and what each keeps: a decoder, allocator caches, its
/// scratch buffer) is fixed. tokio's own blocking pool grows to 512 threads and comes and goes.
pub struct Offload {
    slots: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
}

/// A job gets its thread's scratch buffer: empty, of the capacity given to [`Offload::new`].
type Job = Box<dyn FnOnce(&mut Vec<u8>) + Send>;

/// Why [`Offload::run`] did not give the job's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Every thread stayed busy for [`BLOCKING_WAIT`].
    Busy,
    /// The job panicked.
    Panicked,
}

impl Offload {
    /// Start `threads` threads, each with a scratch buffer of `scratch` bytes (allocated at its
    /// first job); they end when this is dropped.
    pub fn new(threads: usize, scratch: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("relay-verify-{i}"))
                .spawn(move || {
                    let mut buffer = Vec::new();
                    loop {
                        let job = queue.lock().expect("not poisoned").recv();
                        let Ok(job) = job else { return };
                        buffer.clear();
                        if buffer.capacity() != scratch {
                            // First use, or the job swapped it for one of another size.
                            buffer = Vec::with_capacity(scratch);
                        }
                        job(&mut buffer);
                    }
                })
                .expect("spawn a verify thread");
        }
        Self {
            slots: Arc::new(Semaphore::new(threads)),
            jobs,
        }
    }

    /// Run `job` on a verify thread once one is free (waiting at most [`BLOCKING_WAIT`]). If the
    /// request is dropped meanwhile, the job still finishes, holding what it holds.
    pub async fn run<T, F>(&self, job: F) -> Result<T, OffloadError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Vec<u8>) -> T + Send + 'static,
    {
        let slot = tokio::time::timeout(BLOCKING_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| OffloadError::Busy)?
            .map_err(|_| OffloadError::Busy)?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |scratch| {
            let _slot = slot;
            if let Ok(value) = std::panic::catch_unwind(AssertUnwindSafe(|| job(scratch))) {
                let _ = done.send(value);
            }
        });
        self.jobs.send(job).map_err(|_| OffloadError::Panicked)?;
        result.await.map_err(|_| OffloadError::Panicked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffers(slots: usize) -> Arc<Buffers> {
        Buffers::new(
            (slots + 1) * 1000,
            1000,
            1,
            IntGauge::new("g", "g").unwrap(),
        )
    }

    #[test]
    fn buffers_are_reused_and_never_outnumber_their_slots() {
        let pool = buffers(2);
        let mut one = pool.take().unwrap();
        one.extend_from_slice(b"abc");
        let address = one.as_ptr();
        let two = pool.take().unwrap();
        assert_eq!(pool.take().err(), Some(OverBudget));
        assert_eq!(pool.hold().err(), Some(OverBudget));
        assert_eq!(pool.in_use.get(), 2000);
        drop(one);
        let again = pool.take().unwrap();
        assert_eq!(again.as_ptr(), address, "the same allocation, reused");
        assert!(again.is_empty() && again.capacity() == 1000);
        drop(again);
        drop(two);
        // Two idle buffers; holding a slot for a copy frees one of them.
        let held = pool.hold().unwrap();
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
        drop(held);
        assert_eq!(pool.in_use.get(), 0);
    }

    #[test]
    fn a_buffer_grown_past_its_size_is_not_pooled() {
        let pool = buffers(1);
        let mut one = pool.take().unwrap();
        one.extend_from_slice(&[0; 1001]);
        drop(one);
        assert!(pool.idle.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn offload_runs_on_its_own_threads_and_gives_up_when_busy() {
        let offload = Arc::new(Offload::new(1, 100));
        let seen = offload
            .run(|scratch| {
                let seen = (
                    std::thread::current().name().map(str::to_owned),
                    scratch.capacity(),
                );
                scratch.extend_from_slice(b"left over");
                seen
            })
            .await;
        assert_eq!(seen, Ok((Some("relay-verify-0".to_owned()), 100)));
        assert_eq!(offload.run(|scratch| scratch.is_empty()).await, Ok(true));
        assert_eq!(
            offload.run(|_| panic!("a bug")).await,
            Err::<(), _>(OffloadError::Panicked)
        );
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let offload = offload.clone();
            async move { offload.run(move |_| release.recv().ok()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(offload.run(|_| ()).await, Err(OffloadError::Busy));
        hold.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Ok(Some(())));
    }
}
