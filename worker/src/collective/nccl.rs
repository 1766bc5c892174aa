//! NCCL all-reduce between GPU workers, one communicator per generation.
//!
//! NCCL blocks forever on a dead peer (until its own 10-30 minute timeouts), so the
//! communicator lives on a thread of its own and the caller waits for each reduction with the
//! transport's timeout; when it passes, the caller aborts the communicator (ncclCommAbort is
//! the documented way to unblock a stuck collective from another thread) and the generation
//! ends like any transport failure. A communicator is aborted, never destroyed: destroy waits
//! for peers that may be gone.
//!
//! The rendezvous (rank 0's 128-byte unique id) travels over the run's authenticated TCP ring,
//! which every generation forms first anyway.
//!
//! Gradients are flattened on the host by the train loop for every backend, so this
//! transport stages them: each ~25 MB bucket is copied to the device, all-reduced there, and
//! copied back, all on one stream. Reducing burn-cuda's device buffers in place would save
//! the two PCIe copies; it needs the tensors' raw device pointers and
//! was not attempted without a GPU to test it on.

use std::mem::MaybeUninit;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut};
use cudarc::nccl::{result, sys};

use super::{Collective, CollectiveError};

/// Floats per NCCL call: 25 MB, DDP's default bucket.
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// The communicator handle, shared so a waiting caller can abort it.
struct RawComm(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread; this handle is only used by the
// NCCL thread for collectives and by whoever takes it out of the mutex for the one abort.
unsafe impl Send for RawComm {}

/// The handle and whether the NCCL thread is inside a call with it. The thread reads the
/// handle and marks itself in a call under the lock, and an abort takes the handle and frees
/// it under the same lock: a call never starts with a handle an abort has freed, and an
/// abort during a call is NCCL's documented way to unblock it.
#[derive(Default)]
struct CommState {
    handle: Option<RawComm>,
    in_call: bool,
}

type Shared = Arc<Mutex<CommState>>;

fn lock(comm: &Shared) -> std::sync::MutexGuard<'_, CommState> {
    // A poisoned lock still holds the handle: use it (and abort it) all the same.
    comm.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Nccl {
    rank: usize,
    world: usize,
    timeout: Duration,
    requests: Option<mpsc::Sender<Vec<f32>>>,
    replies: mpsc::Receiver<Result<Vec<f32>, String>>,
    comm: Shared,
}

/// Whether the NCCL library can be loaded (cudarc panics on first use otherwise).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// An NCCL failure with its code and NCCL's own words (cudarc's `Debug` prints only
/// "NcclError", which tells an operator nothing).
fn describe(call: &str, e: &result::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static string for any code.
    let text = unsafe {
        let p = sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    format!(
        "{call} failed: NCCL error {} ({:?}): {text}",
        e.0 as i32, e.0
    )
}

/// A fresh unique id (rank 0 makes it; the others receive its bytes).
pub fn unique_id() -> Result<[u8; 128], CollectiveError> {
    let id = result::get_uniqueid()
        .map_err(|e| CollectiveError::Setup(describe("ncclGetUniqueId", &e)))?;
    Ok(id.internal.map(|c| c as u8))
}

fn abort(comm: &Shared) {
    let mut state = lock(comm);
    if state.in_call {
        tracing::warn!("aborting the NCCL communicator while a collective is in flight");
    }
    if let Some(RawComm(handle)) = state.handle.take() {
        // SAFETY: the handle came from ncclCommInitRank and is aborted exactly once (it left
        // the state here, under the lock the NCCL thread takes before each call).
        let _ = unsafe { result::comm_abort(handle) };
    }
}

/// Runs one NCCL call with the live handle; fails without calling when it was aborted.
fn with_handle<T>(
    comm: &Shared,
    call: impl FnOnce(sys::ncclComm_t) -> Result<T, String>,
) -> Result<T, String> {
    let handle = {
        let mut state = lock(comm);
        let handle = match &state.handle {
            Some(RawComm(handle)) => *handle,
            None => return Err("the communicator was aborted".into()),
        };
        state.in_call = true;
        handle
    };
    let outcome = call(handle);
    lock(comm).in_call = false;
    outcome
}

fn reduce_staged(stream: &Arc<CudaStream>, comm: &Shared, data: &mut [f32]) -> Result<(), String> {
    for bucket in data.chunks_mut(BUCKET_FLOATS) {
        let mut device = stream
            .clone_htod(&*bucket)
            .map_err(|e| format!("copy to the GPU: {e:?}"))?;
        {
            let (pointer, _record) = device.device_ptr_mut(stream);
            with_handle(comm, |handle| {
                // SAFETY: in-place all-reduce of `bucket.len()` floats owned by `device`, on
                // the stream the copies use; the handle is live (`with_handle` read it under
                // the lock an abort takes; an abort during the call makes it fail, which is
                // the point of aborting).
                unsafe {
                    result::all_reduce(
                        pointer as *const std::ffi::c_void,
                        pointer as *mut std::ffi::c_void,
                        bucket.len(),
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        handle,
                        stream.cu_stream() as _,
                    )
                }
                .map(|_| ())
                .map_err(|e| describe("ncclAllReduce", &e))
            })?;
        }
        stream
            .memcpy_dtoh(&device, bucket)
            .map_err(|e| format!("copy from the GPU: {e:?}"))?;
    }
    stream
        .synchronize()
        .map_err(|e| format!("waiting for the all-reduce: {e:?}"))
}

impl Nccl {
    /// Joins the communicator of `world` ranks named by `id` on GPU `ordinal`; every rank
    /// calls this together. Fails after `timeout` if the others do not come.
    pub fn connect(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: [u8; 128],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if !nccl_present() {
            return Err(CollectiveError::Setup(
                "the NCCL library (libnccl.so) is not on the library path; \
                 set SIMMIM_COLLECTIVE=ring to reduce over TCP instead"
                    .into(),
            ));
        }
        let comm: Shared = Arc::new(Mutex::new(CommState::default()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (request_tx, request_rx) = mpsc::channel::<Vec<f32>>();
        let (reply_tx, reply_rx) = mpsc::channel();
        let shared = comm.clone();
        std::thread::Builder::new()
            .name(format!("nccl-{rank}"))
            .spawn(move || {
                let setup = (|| -> Result<Arc<CudaStream>, String> {
                    let context = CudaContext::new(ordinal)
                        .map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
                    context
                        .bind_to_thread()
                        .map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
                    let stream = context
                        .new_stream()
                        .map_err(|e| format!("CUDA stream: {e:?}"))?;
                    let mut handle = MaybeUninit::uninit();
                    let unique = sys::ncclUniqueId {
                        internal: id.map(|b| b as std::ffi::c_char),
                    };
                    // SAFETY: `handle` is written by NCCL on success and read only then.
                    unsafe {
                        result::comm_init_rank(
                            handle.as_mut_ptr(),
                            world as i32,
                            unique,
                            rank as i32,
                        )
                        .map_err(|e| describe("ncclCommInitRank", &e))?;
                        lock(&shared).handle = Some(RawComm(handle.assume_init()));
                    }
                    Ok(stream)
                })();
                let stream = match setup {
                    Ok(stream) => {
                        let _ = ready_tx.send(Ok(()));
                        stream
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(mut data) = request_rx.recv() {
                    let outcome = reduce_staged(&stream, &shared, &mut data).map(|()| data);
                    if reply_tx.send(outcome).is_err() {
                        break;
                    }
                }
                abort(&shared);
            })
            .map_err(|e| CollectiveError::Setup(format!("cannot start the NCCL thread: {e}")))?;
        match ready_rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(Self {
                rank,
                world,
                timeout,
                requests: Some(request_tx),
                replies: reply_rx,
                comm,
            }),
            Ok(Err(e)) => Err(CollectiveError::Setup(e)),
            Err(_) => {
                abort(&comm);
                Err(CollectiveError::Setup(format!(
                    "the NCCL communicator did not form within {:.0} s",
                    timeout.as_secs_f64()
                )))
            }
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let failed = |reason: String| CollectiveError::Peer {
            rank: self.rank,
            address: "nccl".into(),
            reason,
        };
        let requests = self
            .requests
            .as_ref()
            .ok_or_else(|| failed("the communicator was aborted".into()))?;
        requests
            .send(data.to_vec())
            .map_err(|_| failed("the NCCL thread has stopped".into()))?;
        match self.replies.recv_timeout(self.timeout) {
            Ok(Ok(reduced)) => {
                data.copy_from_slice(&reduced);
                Ok(())
            }
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => {
                abort(&self.comm);
                self.requests = None;
                Err(failed(format!(
                    "no all-reduce result within {:.0} s: a peer is gone; communicator aborted",
                    self.timeout.as_secs_f64()
                )))
            }
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Closing the request channel ends the thread, which aborts the communicator; if the
        // thread is stuck in a collective, aborting here unblocks it.
        self.requests = None;
        abort(&self.comm);
    }
}

/// Rank 0's unique id to every rank, over another (already formed) transport: each byte as an
/// exactly representable float, zeros elsewhere, summed.
pub fn share_unique_id(transport: &mut dyn Collective) -> Result<[u8; 128], CollectiveError> {
    let mut buffer = [0f32; 128];
    if transport.rank() == 0 {
        for (slot, byte) in buffer.iter_mut().zip(unique_id()?) {
            *slot = f32::from(byte);
        }
    }
    transport.all_reduce_sum(&mut buffer)?;
    Ok(buffer.map(|v| v as u8))
}
