//! The compute devices the configuration names: "auto", "cpu", "cuda:N", a comma-separated list of them (one
//! engine each), or "cuda:all"; and the dtype each runs.

use candle_core::{DType, Device};

use crate::error::StartupError;

/// The compute device and dtype the configuration asks for, resolved against what this build and machine have.
#[derive(Debug, Clone)]
pub struct ComputeTarget {
    pub device: Device,
    /// "cpu" or "cuda:N".
    pub name: String,
    pub dtype: DType,
}

impl ComputeTarget {
    /// How batches are laid out for this device: the CPU computes real tokens only (packed); the CUDA attention
    /// kernels read padded batches.
    pub fn batch_shape(&self, attention_span: usize) -> crate::scheduler::BatchShape {
        match self.device.is_cpu() {
            true => crate::scheduler::BatchShape::Packed { attention_span },
            false => crate::scheduler::BatchShape::Padded,
        }
    }

    /// Whether this is a GPU (batches are cut ahead and aimed at a shorter time).
    pub fn is_gpu(&self) -> bool {
        !self.device.is_cpu()
    }
}

/// Every device of `devices` ("cpu,cpu", "cuda:0,cuda:1", "cuda:all", or one device), each with `dtype`.
/// One engine runs per device; CPU and CUDA engines do not mix (their batches are laid out differently).
pub fn compute_targets(devices: &str, dtype: &str) -> Result<Vec<ComputeTarget>, StartupError> {
    let names: Vec<String> = match devices.trim() {
        "cuda:all" => (0..cuda_device_count()?)
            .map(|i| format!("cuda:{i}"))
            .collect(),
        list => list
            .split(',')
            .map(|name| name.trim().to_string())
            .collect(),
    };
    if names.is_empty() || names.iter().any(String::is_empty) {
        return Err(bad_device(devices));
    }
    let targets = names
        .iter()
        .map(|name| compute_target(name, dtype))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.iter().any(|t| t.device.is_cpu()) && targets.iter().any(|t| !t.device.is_cpu()) {
        return Err(StartupError::Config(format!(
            "devices {devices:?} mix the CPU and GPUs; list one kind"
        )));
    }
    Ok(targets)
}

/// Resolves `device` ("auto", "cpu", "cuda:N") and `dtype` ("auto", "f16", "bf16", "f32").
pub fn compute_target(device: &str, dtype: &str) -> Result<ComputeTarget, StartupError> {
    let (device, name) = match device.trim() {
        "auto" => auto_device(),
        "cpu" => (Device::Cpu, "cpu".to_string()),
        other => match other
            .strip_prefix("cuda")
            .map(|rest| rest.trim_start_matches(':'))
        {
            Some(ordinal) => {
                let ordinal: usize = if ordinal.is_empty() {
                    0
                } else {
                    ordinal.parse().map_err(|_| bad_device(other))?
                };
                (cuda_device(ordinal)?, format!("cuda:{ordinal}"))
            }
            None => return Err(bad_device(other)),
        },
    };
    let dtype = match (dtype.trim(), device.is_cuda()) {
        ("auto", true) | ("f16", _) => DType::F16,
        ("auto", false) | ("f32", _) => DType::F32,
        ("bf16", _) => DType::BF16,
        (other, _) => {
            return Err(StartupError::Config(format!(
                "unknown dtype {other:?}; expected auto, f16, bf16 or f32"
            )))
        }
    };
    tracing::info!(device = %name, ?dtype, "compute device");
    Ok(ComputeTarget {
        device,
        name,
        dtype,
    })
}

fn bad_device(name: &str) -> StartupError {
    StartupError::Config(format!(
        "unknown device {name:?}; expected auto, cpu, cuda:N, a comma-separated list of them, or cuda:all"
    ))
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize, StartupError> {
    candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| StartupError::Config(format!("counting CUDA devices: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> Result<usize, StartupError> {
    Err(StartupError::Config(
        "this build has no CUDA support; build with `--features cuda` (scripts/build/build-cuda.sh) or use device = \"cpu\"".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, StartupError> {
    // A stream of its own for this engine, so its work never queues behind other users of the context.
    let device = Device::new_cuda_with_stream(ordinal).map_err(|e| {
        StartupError::Config(format!("CUDA device {ordinal} could not be opened: {e}"))
    })?;
    if let Err(status) = retain_pool_memory(&device) {
        tracing::warn!(
            ?status,
            "could not raise the CUDA memory pool's release threshold"
        );
    }
    Ok(device)
}

/// Keeps freed device memory in the stream-ordered pool that candle allocates from, instead of handing it back
/// to the driver at every synchronisation (the default release threshold is 0). After the warm-up batch, batches
/// then allocate from memory the pool already holds.
#[cfg(feature = "cuda")]
fn retain_pool_memory(
    device: &Device,
) -> Result<(), candle_core::cuda::cudarc::driver::sys::CUresult> {
    use candle_core::cuda::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let cu_device = cuda.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and `cu_device` a device handle from an open context.
    let status = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(status);
    }
    let mut threshold = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD takes a pointer to a u64, which `threshold` is, for the pool returned above.
    let status = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    };
    if status == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(status)
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device, StartupError> {
    Err(StartupError::Config(
        "this build has no CUDA support; build with `--features cuda` (scripts/build/build-cuda.sh) or use device = \"cpu\"".into(),
    ))
}

fn auto_device() -> (Device, String) {
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        match cuda_device(0) {
            Ok(device) => return (device, "cuda:0".into()),
            Err(e) => {
                tracing::warn!(error = %e, "a GPU was detected but could not be used; running on the CPU")
            }
        }
    }
    (Device::Cpu, "cpu".into())
}
