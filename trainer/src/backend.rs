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
        }),
        Err(e) => bail!("no {what} adapter: {e}"),
    }
}

fn cpu() -> Selected {
    Selected {
        device: Device::flex(),
        name: format!(
            "cpu (flex, {} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    }
}

/// Pick the device. `auto` tries CUDA, then a discrete or integrated GPU through wgpu
/// (software adapters such as lavapipe are slower than the CPU backend and are skipped), then
/// the CPU.
pub fn select(choice: BackendChoice) -> Result<Selected> {
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
