//! Exponential moving average of the weights (Polyak averaging), with diffusers' warm-up:
//! the decay at optimisation step k is min(max_decay, (1 + k) / (10 + k)), so early averages
//! are not dominated by the random initialisation.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use ddpm::unet::UNet;

/// Decay used after `step` optimisation steps (1-based).
pub fn decay(step: u64, max_decay: f64) -> f64 {
    if step == 0 {
        return 0.0;
    }
    let k = step as f64;
    ((1.0 + k) / (10.0 + k)).min(max_decay)
}

/// Collects every float parameter, flattened, in visiting order.
#[derive(Default)]
struct Flatten {
    values: Vec<Tensor<1>>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let n = value.shape().num_elements();
        self.values.push(value.reshape([n]));
    }
}

/// ema ← decay · ema + (1 − decay) · current, parameter by parameter (same visiting order).
struct Blend {
    current: std::vec::IntoIter<Tensor<1>>,
    decay: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let current = self
            .current
            .next()
            .expect("EMA and model have the same parameters");
        let decay = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            ema.mul_scalar(decay) + current.reshape(shape).mul_scalar(1.0 - decay)
        })
    }
}

/// One EMA update. `current` is the trained model without autodiff (`model.valid()`).
pub fn update(ema: UNet, current: &UNet, decay: f64) -> UNet {
    let mut flatten = Flatten::default();
    current.visit(&mut flatten);
    let mut blend = Blend {
        current: flatten.values.into_iter(),
        decay,
    };
    ema.map(&mut blend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_warms_up_then_caps() {
        assert_eq!(decay(0, 0.9999), 0.0);
        assert!((decay(1, 0.9999) - 2.0 / 11.0).abs() < 1e-12);
        assert!((decay(90, 0.9999) - 91.0 / 100.0).abs() < 1e-12);
        assert_eq!(decay(10_000_000, 0.9999), 0.9999);
    }
}
