//! `ddpm`: train denoising diffusion models on your GPU (or CPU), sample them, and export model
//! files for the web page.

mod backend;
mod bench;
mod ceiling;
mod checkpoint;
mod data;
mod edit;
mod ema;
mod eval;
mod images;
mod sample;
mod train;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// burn's CPU backend allocates a fresh buffer for every op. With the system allocator (or
/// mimalloc's defaults) the large ones go back to the OS when freed and come back as new
/// pages that the kernel must fault in and zero: `perf` put a quarter of sampling time there.
/// mimalloc with purging off (see [`keep_freed_memory`]) reuses them instead.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same value in mimalloc v2 and v3): milliseconds
/// before freed memory is returned to the OS; -1 never returns it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory committed for reuse. The process's footprint stays at its peak, which
/// is what a training or sampling run needs again at its next step anyway. Measured with
/// `ddpm bench` (fashion-mnist preset, 2 threads): DDIM at batch 16 took 1.8 s instead of
/// 5.3 s with the system allocator, a training step at batch 16 0.69 s instead of 1.8 s.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mi_option_set stores one integer in mimalloc's option table; it accepts any
    // option and value, and mimalloc reads the option at its next purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Denoising diffusion probabilistic models: train, sample, export, import, evaluate.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model on a data set (or continue a run with --resume).
    Train(Box<train::TrainArgs>),
    /// Generate images from a model file (or a row interpolating between two seeds).
    Sample(sample::SampleArgs),
    /// Vary a picture: noise it part of the way and denoise it again (SDEdit).
    Img2img(edit::Img2ImgArgs),
    /// Regenerate the white part of a mask over a picture, keeping the rest (RePaint).
    Inpaint(edit::InpaintArgs),
    /// Write a model file (optionally f16) from a run, a checkpoint or another model file.
    Export(sample::ExportArgs),
    /// Convert a Hugging Face diffusers UNet2DModel directory into a model file.
    Import(sample::ImportArgs),
    /// Measure sample quality: Fréchet distance to Fashion-MNIST's test set in the features of
    /// ddpm's own classifier, with reference rows (real, blurred, noisy images).
    Eval(Box<eval::EvalArgs>),
    /// Train the Fashion-MNIST classifier that `ddpm eval` uses and report its test accuracy.
    Classifier(eval::ClassifierArgs),
    /// Measure training and sampling speed and peak memory, side by side with the same UNet
    /// in PyTorch + diffusers (benches/pytorch_reference.py) when it is installed.
    Bench(Box<bench::BenchArgs>),
    /// One case of `ddpm bench`, run in a fresh process (internal).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
}

/// Make the main thread worker 0 of rayon's global pool (sized by `RAYON_NUM_THREADS`, else
/// one thread per core). The CPU kernels split their work with rayon; called from a thread
/// outside the pool, every such call is handed to a pool thread, which the kernel must wake
/// (a futex), while the caller sleeps until it is done. `perf` put 12–20 % of a batch-1
/// training step of the cifar preset in those wake-ups. As worker 0 the main thread runs its
/// share itself and only wakes the other workers when there is work to split.
fn join_the_compute_pool() {
    // An error means the pool already exists (nothing in this program builds it earlier); the
    // kernels then still run, as before, through hand-offs.
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    join_the_compute_pool();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Train(mut args) => {
            // Which flags were typed: a resumed run checks them against what it stored.
            if let Some(("train", m)) = matches.subcommand() {
                let command = Cli::command();
                let flags: Vec<String> = command
                    .find_subcommand("train")
                    .map(|c| c.get_arguments().map(|a| a.get_id().to_string()).collect())
                    .unwrap_or_default();
                args.given = flags
                    .into_iter()
                    .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
                    .collect();
            }
            // Ctrl-C asks the loop to save a checkpoint and stop; a second Ctrl-C exits at once
            // (the checkpoint files are written atomically, so nothing is left half-written).
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
            })?;
            train::run(*args, stop)
        }
        Command::Sample(args) => sample::run(args),
        Command::Img2img(args) => edit::img2img(args),
        Command::Inpaint(args) => edit::inpaint(args),
        Command::Export(args) => sample::export(args),
        Command::Import(args) => sample::import(args),
        Command::Eval(args) => eval::run(*args),
        Command::Classifier(args) => eval::train_classifier(args),
        Command::Bench(args) => bench::run(*args),
        Command::BenchWorker(args) => bench::worker(args),
    }
}
