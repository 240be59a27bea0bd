//! The backward steps of the kernels and their `Autodiff<Flex>` implementation: training only
//! (feature `flex-kernels`; the wasm module samples with the forward kernels alone).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};

use super::*;

/// The backward step of SiLU, from its saved input.
#[derive(Debug)]
struct SiluBackward;

impl Backward<Flex, 1> for SiluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            silu_backward(&x, &grad)
        });
    }
}

/// The backward step of the convolution, from the saved input, weight and settings.
#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 3> for ConvBackward {
    type State = (FlexTensor, FlexTensor, ConvSpec);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight, spec) = ops.state;
        let [node_x, node_w, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let grad = contiguous(&grad);
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, conv::conv_bias_grad(&grad));
        }
        if let Some(node) = node_w {
            let kernel = conv::kernel_side(&weight);
            grads.register::<Flex>(node.id, conv::conv_weight_grad(&x, &grad, kernel, spec));
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, conv::conv_input_grad(&x, &weight, &grad, spec));
        }
    }
}

/// What the attention backward step needs: `q`, `k`, `v`, each row's log-sum-exp and the
/// head count.
#[derive(Clone, Debug)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    lse: Vec<f32>,
    heads: usize,
}

/// The backward step of attention.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let AttentionState {
            q,
            k,
            v,
            lse,
            heads,
        } = ops.state;
        let gradients = attention::attention_backward(&q, &k, &v, &lse, heads, &grad);
        for (node, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, gradient);
            }
        }
    }
}

/// The backward step of GroupNorm.
#[derive(Debug)]
struct GroupNormBackward;

impl Backward<Flex, 3> for GroupNormBackward {
    type State = GroupNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (gx, ggamma, gbeta) = group_norm_backward(&ops.state, &grad);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, gx);
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, ggamma);
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, gbeta);
        }
    }
}

impl<C: CheckpointStrategy> FlexKernels for Autodiff<Flex, C> {
    fn flex_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (input, guard) = x.into_parts();
        let output = silu_forward(&input);
        match SiluBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(input, output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn flex_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        let (q, guard_q) = q.into_parts();
        let (k, guard_k) = k.into_parts();
        let (v, guard_v) = v.into_parts();
        let (output, lse) = attention::attention_forward(&q, &k, &v, heads);
        match AttentionBackward
            .prepare::<C>([guard_q, guard_k, guard_v])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                AttentionState {
                    q,
                    k,
                    v,
                    lse,
                    heads,
                },
                output,
            ),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn flex_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        spec: ConvSpec,
    ) -> FloatTensor<Self> {
        let (x, guard_x) = x.into_parts();
        let (weight, guard_w) = weight.into_parts();
        let (bias, guard_b) = bias.into_parts();
        let output = conv::conv_forward(&x, &weight, Some(&bias), spec);
        match ConvBackward
            .prepare::<C>([guard_x, guard_w, guard_b])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, weight, spec), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn flex_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        norm: GroupNormSpec,
    ) -> FloatTensor<Self> {
        let (x, guard_x) = x.into_parts();
        let (gamma, guard_gamma) = gamma.into_parts();
        let (beta, guard_beta) = beta.into_parts();
        let (output, stats) = group_norm_forward(&x, &gamma, &beta, norm);
        match GroupNormBackward
            .prepare::<C>([guard_x, guard_gamma, guard_beta])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                GroupNormState {
                    x,
                    gamma,
                    beta,
                    norm,
                    stats,
                },
                output,
            ),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}
