//! burn-cuda as a SimMIM backend: Burn's ops (cubecl fuses them), plus lending device memory
//! to NCCL.

use burn::tensor::ops::FloatTensor;

use super::SimMimBackend;

/// Whether the CUDA driver library can be loaded. burn-cuda (through cudarc) panics on first
/// use when it cannot, so callers check first and report a clear error instead.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only attempts to load the shared library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl SimMimBackend for burn_cuda::Cuda<f32> {
    fn computes_on_host() -> bool {
        false
    }

    fn with_device_memory<R>(
        tensor: FloatTensor<Self>,
        use_memory: impl FnOnce(Option<(u64, usize)>) -> R,
    ) -> R {
        cuda_memory::with_f32(tensor, use_memory)
    }
}

/// burn-cuda's memory for an external library (see [`SimMimBackend::with_device_memory`]).
mod cuda_memory {
    use burn::tensor::DType;
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeBackend;
    use burn_fusion::FusionTensor;

    type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

    pub fn with_f32<R>(
        tensor: FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<CudaRuntime>>,
        use_memory: impl FnOnce(Option<(u64, usize)>) -> R,
    ) -> R {
        if tensor.dtype != DType::F32 {
            return use_memory(None);
        }
        // Resolving a clone (while `tensor` lives) leaves the buffer registered with fusion,
        // so later reads of the tensor see what was written into it; resolving runs the
        // tensor's pending fused kernels first.
        let cube: CubeTensor<CudaRuntime> =
            tensor.client.resolve_tensor_float::<Cube>(tensor.clone());
        if !cube.is_contiguous() {
            return use_memory(None);
        }
        // Taking the resource orders this thread's stream after the producers' stream; the
        // sync then waits for them, so the memory holds the values before anyone reads it.
        let Ok(resource) = cube.client.get_resource(cube.handle.clone()) else {
            return use_memory(None);
        };
        if burn_cubecl::cubecl::future::block_on(cube.client.sync()).is_err() {
            return use_memory(None);
        }
        let count = cube.meta.shape().num_elements();
        let out = use_memory(Some((resource.resource().ptr, count)));
        drop((resource, cube, tensor));
        out
    }
}
impl SimMimBackend for burn_cuda::Cuda<burn::tensor::bf16> {
    fn computes_on_host() -> bool {
        false
    }
}
impl SimMimBackend for burn_cuda::Cuda<burn::tensor::f16> {
    fn computes_on_host() -> bool {
        false
    }
}
