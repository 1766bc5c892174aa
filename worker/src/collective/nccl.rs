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
//! The communicator is non-blocking (`ncclCommInitRankConfig` with `blocking = 0`): forming
//! it and every collective return at once and the NCCL thread polls `ncclCommGetAsyncError`
//! and the stream, so a rank whose peers never come can still be aborted (a blocking
//! `ncclCommInitRank` cannot be interrupted at all).
//!
//! The train loop hands this transport device buffers (its gradient buckets, see
//! `simmim_model::grads::buckets` and `trainer::reduce`), reduced in place on the GPU; host buffers (the replica check, the
//! rendezvous of a CPU fallback) are staged through the device in 25 MB pieces.

use std::mem::MaybeUninit;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut};
use cudarc::nccl::{result, sys};

use super::{Collective, CollectiveError, Op};

/// Floats per NCCL call for host buffers: 25 MB, DDP's default bucket.
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// How often the NCCL thread looks at a collective in flight.
const POLL: Duration = Duration::from_micros(200);

/// What the NCCL thread is asked to reduce.
enum Request {
    /// Values on the host, staged through the device.
    Host(Vec<f32>),
    /// `op` in place over `count` f32 values in device memory at `pointer`, on this worker's
    /// GPU.
    Device { op: Op, pointer: u64, count: usize },
}

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
    /// Set by the first abort, so a communicator formed after it is aborted at once instead
    /// of living on with nobody waiting for it.
    aborted: bool,
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
    requests: Option<mpsc::Sender<Request>>,
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
    state.aborted = true;
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

/// Waits for the communicator's pending operation (forming it, or enqueueing a collective) to
/// finish; fails on an NCCL error or when it was aborted meanwhile.
fn wait_ready(comm: &Shared, what: &str) -> Result<(), String> {
    loop {
        let status = {
            let state = lock(comm);
            let Some(RawComm(handle)) = &state.handle else {
                return Err(format!("{what}: the communicator was aborted"));
            };
            let mut status = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the handle is live (read under the lock an abort takes) and `status`
            // is a valid place for NCCL to write.
            unsafe { sys::ncclCommGetAsyncError(*handle, &mut status) }
                .result()
                .map_err(|e| describe("ncclCommGetAsyncError", &e))?;
            status
        };
        match status {
            sys::ncclResult_t::ncclSuccess => return Ok(()),
            sys::ncclResult_t::ncclInProgress => std::thread::sleep(POLL),
            code => return Err(describe(what, &result::NcclError(code))),
        }
    }
}

/// Waits until the stream has run everything enqueued on it, watching the communicator for
/// asynchronous errors meanwhile (a blocking stream synchronise would hang on a dead peer).
fn wait_stream(stream: &Arc<CudaStream>, comm: &Shared) -> Result<(), String> {
    loop {
        // SAFETY: queries a stream this thread owns.
        match unsafe { cudarc::driver::sys::cuStreamQuery(stream.cu_stream()) } {
            cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
            cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {
                wait_ready(comm, "a collective")?;
                std::thread::sleep(POLL);
            }
            other => return Err(format!("waiting for the collective: CUDA error {other:?}")),
        }
    }
}

/// `op` in place over `count` floats at device address `pointer`, on `stream`: NCCL's in-place
/// forms (a reduce-scatter receives into the rank's own chunk of its send buffer, an
/// all-gather sends from it).
fn run_on_device(
    stream: &Arc<CudaStream>,
    comm: &Shared,
    op: Op,
    (rank, world): (usize, usize),
    pointer: u64,
    count: usize,
) -> Result<(), String> {
    let call = match op {
        Op::AllReduce => "ncclAllReduce",
        Op::ReduceScatter => "ncclReduceScatter",
        Op::AllGather => "ncclAllGather",
    };
    with_handle(comm, |handle| {
        let chunk = count / world.max(1);
        if op != Op::AllReduce && chunk * world != count {
            return Err(format!(
                "{call}: {count} values do not split into {world} equal chunks"
            ));
        }
        let base = pointer as *mut f32;
        // SAFETY: the caller guarantees `count` f32 values at `pointer` on this GPU that
        // nobody else touches until the reply, so the rank's own chunk (inside them) is valid
        // too; the handle is live (`with_handle` read it under the lock an abort takes; an
        // abort during the call makes it fail, which is the point).
        unsafe {
            let own = base.add(rank * chunk);
            let stream = stream.cu_stream() as _;
            let f32_type = sys::ncclDataType_t::ncclFloat32;
            let sum = sys::ncclRedOp_t::ncclSum;
            match op {
                Op::AllReduce => {
                    result::all_reduce(base as _, base as _, count, f32_type, sum, handle, stream)
                }
                Op::ReduceScatter => result::reduce_scatter(
                    base as _, own as _, chunk, f32_type, sum, handle, stream,
                ),
                Op::AllGather => {
                    result::all_gather(own as _, base as _, chunk, f32_type, handle, stream)
                }
            }
        }
        .map(|_| ())
        .map_err(|e| describe(call, &e))
    })?;
    wait_ready(comm, call)?;
    wait_stream(stream, comm)
}

fn reduce_staged(stream: &Arc<CudaStream>, comm: &Shared, data: &mut [f32]) -> Result<(), String> {
    for bucket in data.chunks_mut(BUCKET_FLOATS) {
        let mut device = stream
            .clone_htod(&*bucket)
            .map_err(|e| format!("copy to the GPU: {e:?}"))?;
        {
            let (pointer, _record) = device.device_ptr_mut(stream);
            run_on_device(stream, comm, Op::AllReduce, (0, 1), pointer, bucket.len())?;
        }
        stream
            .memcpy_dtoh(&device, bucket)
            .map_err(|e| format!("copy from the GPU: {e:?}"))?;
    }
    wait_stream(stream, comm)
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` (every setting "undefined", so NCCL's defaults apply) with
/// `blocking = 0`.
fn non_blocking_config() -> Result<sys::ncclConfig_t, String> {
    const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN;
    let version = result::get_nccl_version().map_err(|e| describe("ncclGetVersion", &e))?;
    Ok(sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as std::ffi::c_uint,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    })
}

/// Starts forming the communicator and publishes its handle at once (so a timed-out caller
/// can abort it), then waits for it to be formed.
fn form(comm: &Shared, world: usize, rank: usize, id: [u8; 128]) -> Result<(), String> {
    let mut config = non_blocking_config()?;
    let mut handle = MaybeUninit::uninit();
    let unique = sys::ncclUniqueId {
        internal: id.map(|b| b as std::ffi::c_char),
    };
    {
        let mut state = lock(comm);
        if state.aborted {
            return Err("the communicator was aborted before it formed".into());
        }
        // SAFETY: `handle` is written by NCCL when the call returns success or "in progress"
        // (a non-blocking communicator is usable for polling and aborting from then on), and
        // read only then; `config` outlives the call.
        unsafe {
            result::comm_init_rank_config(
                handle.as_mut_ptr(),
                world as i32,
                unique,
                rank as i32,
                &mut config,
            )
            .map_err(|e| describe("ncclCommInitRankConfig", &e))?;
            state.handle = Some(RawComm(handle.assume_init()));
        }
    }
    wait_ready(comm, "ncclCommInitRankConfig")
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
        let (request_tx, request_rx) = mpsc::channel::<Request>();
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
                    form(&shared, world, rank, id)?;
                    Ok(stream)
                })();
                let stream = match setup {
                    Ok(stream) => {
                        let _ = ready_tx.send(Ok(()));
                        stream
                    }
                    Err(e) => {
                        // A handle published before the failure must not outlive it.
                        abort(&shared);
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(request) = request_rx.recv() {
                    let outcome = match request {
                        Request::Host(mut data) => {
                            reduce_staged(&stream, &shared, &mut data).map(|()| data)
                        }
                        Request::Device { op, pointer, count } => {
                            run_on_device(&stream, &shared, op, (rank, world), pointer, count)
                                .map(|()| Vec::new())
                        }
                    };
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

    /// Sends one request to the NCCL thread and waits for its reply with the transport's
    /// timeout; past it, the communicator is aborted and the generation ends.
    fn round_trip(&mut self, request: Request) -> Result<Vec<f32>, CollectiveError> {
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
            .send(request)
            .map_err(|_| failed("the NCCL thread has stopped".into()))?;
        match self.replies.recv_timeout(self.timeout) {
            Ok(Ok(reduced)) => Ok(reduced),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => {
                abort(&self.comm);
                self.requests = None;
                Err(failed(format!(
                    "no collective result within {:.0} s: a peer is gone; communicator aborted",
                    self.timeout.as_secs_f64()
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
        let reduced = self.round_trip(Request::Host(data.to_vec()))?;
        data.copy_from_slice(&reduced);
        Ok(())
    }

    fn reduces_device_memory(&self) -> bool {
        true
    }

    unsafe fn run_on_device_f32(
        &mut self,
        op: Op,
        pointer: u64,
        count: usize,
    ) -> Option<Result<(), CollectiveError>> {
        Some(
            self.round_trip(Request::Device { op, pointer, count })
                .map(|_| ()),
        )
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
