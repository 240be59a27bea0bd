//! Choosing the device at run time: `--backend auto|cuda|vulkan|wgpu|cpu`.

use anyhow::{Result, bail};
use burn::tensor::{Device, DeviceKind};

/// The compute backend, as chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// CUDA if built in and present, else a GPU through wgpu (Vulkan/Metal/DX12), else the CPU.
    Auto,
    /// NVIDIA GPU through CUDA (needs a build with `--features cuda`).
    Cuda,
    /// Any GPU through wgpu on Vulkan.
    Vulkan,
    /// Whatever adapter wgpu picks (Vulkan, Metal, DX12, or a software adapter such as lavapipe).
    Wgpu,
    /// The CPU (burn's flex backend).
    Cpu,
}

/// A device and a human-readable name for it.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The device to create tensors on.
    pub device: Device,
    /// What was picked, for the log.
    pub name: String,
    /// Slices of a batch the UNet runs at once when sampling
    /// (`Generation::with_batch_threads`): the CPU backend's threads on the CPU, 1 on a GPU.
    pub batch_threads: usize,
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Selected> {
    let device = Device::cuda(0);
    // A tiny op makes a missing driver fail here rather than mid-training.
    let probe = std::panic::catch_unwind(|| {
        let t = burn::tensor::Tensor::<1>::ones([1], &device);
        t.into_scalar::<f32>()
    });
    match probe {
        Ok(_) => Ok(Selected {
            device: Device::cuda(0),
            name: "cuda (GPU 0)".into(),
            batch_threads: 1,
        }),
        Err(_) => bail!("CUDA device 0 is not usable (no NVIDIA driver or GPU?)"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Selected> {
    bail!(
        "this build has no CUDA backend: rebuild with `cargo build --release -p ddpm-trainer --features cuda` (needs network access for CubeCL's LLVM bundle), or use --backend vulkan / wgpu / cpu"
    )
}

fn wgpu(kind: DeviceKind, api: burn::tensor::wgpu::WgpuBackend, what: &str) -> Result<Selected> {
    match Device::wgpu_options()
        .device_kind(kind)
        .graphics_api(api)
        .init()
    {
        Ok(device) => Ok(Selected {
            device,
            name: format!("wgpu ({what})"),
            batch_threads: 1,
        }),
        Err(e) => bail!("no {what} adapter: {e}"),
    }
}

fn cpu() -> Selected {
    // flex runs its parallel kernels on rayon's global pool (sized by RAYON_NUM_THREADS).
    let threads = rayon::current_num_threads();
    Selected {
        device: Device::flex(),
        name: format!(
            "cpu (flex, {threads} thread{})",
            if threads == 1 { "" } else { "s" }
        ),
        batch_threads: threads,
    }
}

/// Make burn's `Device::default()` the selected backend. burn materialises some state on the
/// default device (e.g. AdamW's moments when a checkpoint's optimizer state is loaded), and
/// the default prefers wgpu whenever it is compiled in: with `--backend cpu` that would start
/// a GPU runtime (or lavapipe) for nothing. `BURN_DEVICE` is how burn lets a program choose.
#[allow(unsafe_code)]
fn pin_default(burn_device: &str) {
    // SAFETY: called from the main thread while choosing the backend, before the training
    // loader or any other thread that reads the environment is started.
    unsafe { std::env::set_var("BURN_DEVICE", burn_device) };
}

/// Pick the device and make it burn's default. `auto` tries CUDA, then a discrete or integrated GPU through wgpu
/// (software adapters such as lavapipe are slower than the CPU backend and are skipped), then
/// the CPU.
pub fn select(choice: BackendChoice) -> Result<Selected> {
    let selected = pick(choice)?;
    pin_default(if selected.name.starts_with("cuda") {
        "cuda"
    } else if selected.name.starts_with("wgpu") {
        "wgpu"
    } else {
        "flex"
    });
    Ok(selected)
}

fn pick(choice: BackendChoice) -> Result<Selected> {
    use burn::tensor::wgpu::WgpuBackend as Api;
    match choice {
        BackendChoice::Cuda => cuda(),
        BackendChoice::Vulkan => wgpu(DeviceKind::DefaultDevice, Api::Vulkan, "Vulkan"),
        BackendChoice::Wgpu => wgpu(DeviceKind::DefaultDevice, Api::Auto, "default adapter"),
        BackendChoice::Cpu => Ok(cpu()),
        BackendChoice::Auto => {
            if cfg!(feature = "cuda")
                && let Ok(s) = cuda()
            {
                return Ok(s);
            }
            for (kind, what) in [
                (DeviceKind::DiscreteGpu(0), "discrete GPU"),
                (DeviceKind::IntegratedGpu(0), "integrated GPU"),
            ] {
                if let Ok(s) = wgpu(kind, Api::Auto, what) {
                    return Ok(s);
                }
            }
            Ok(cpu())
        }
    }
}
