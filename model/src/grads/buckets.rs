//! A module's gradients as a few flat tensors on their device ("buckets", as DDP's), in the
//! module's parameter order, so a transport can sum them where they are (NCCL reads and writes
//! GPU memory) instead of every gradient going to the host and back each step. The CPU path
//! reads the same buckets to the host. Every rank lays the values out identically: each
//! gradient row-major, in the module's visiting order.

use std::ops::Range;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::grads::host_values;
use crate::ModelError;

/// Which parameters (by visiting index) share a bucket: whole parameters in order, a new
/// bucket when the next parameter would pass `limit` values, so a parameter larger than the
/// limit has a bucket of its own (as DDP does).
pub fn plan(sizes: &[usize], limit: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if filled > 0 && filled + size > limit {
            buckets.push(start..i);
            (start, filled) = (i, 0);
        }
        filled += size;
    }
    if start < sizes.len() {
        buckets.push(start..sizes.len());
    }
    buckets
}

/// Every parameter's element count, in visiting order.
pub fn parameter_sizes<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<usize> {
    struct Sizes(Vec<usize>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.shape().num_elements());
        }
    }
    let mut sizes = Sizes(Vec::new());
    module.visit(&mut sizes);
    sizes.0
}

/// The gradients in buckets of at most `limit` values (but whole parameters), with `tail`
/// appended to the last bucket: values every rank sums in the same reduction (the loss and
/// the step's shared decisions). A parameter without a gradient contributes zeros.
///
/// Consumes the gradients and builds each bucket as soon as its last gradient is visited, so
/// each gradient is released once copied: the step holds its gradients about once, not twice.
pub fn flatten_buckets<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    limit: usize,
    tail: &[f32],
    device: &B::Device,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        device: &'a B::Device,
        /// Parameters left in each bucket, in order.
        counts: std::vec::IntoIter<usize>,
        left: usize,
        pieces: Vec<Tensor<B::InnerBackend, 1>>,
        buckets: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.shape().num_elements();
            let flat = match self.grads.remove::<B::InnerBackend, D>(param.id) {
                Some(grad) => grad.reshape([n]),
                None => Tensor::zeros([n], self.device),
            };
            if self.left == 0 {
                self.left = self.counts.next().unwrap_or(usize::MAX);
            }
            self.pieces.push(flat);
            self.left -= 1;
            if self.left == 0 {
                let pieces = std::mem::take(&mut self.pieces);
                self.buckets.push(Tensor::cat(pieces, 0));
            }
        }
    }
    let sizes = parameter_sizes::<B, M>(module);
    let counts: Vec<usize> = plan(&sizes, limit).iter().map(|r| r.len()).collect();
    let mut collect = Collect::<B> {
        grads: &mut grads,
        device,
        counts: counts.into_iter(),
        left: 0,
        pieces: Vec::new(),
        buckets: Vec::new(),
    };
    module.visit(&mut collect);
    let mut buckets = collect.buckets;
    if tail.is_empty() && !buckets.is_empty() {
        return buckets;
    }
    let tail = Tensor::from_data(TensorData::new(tail.to_vec(), [tail.len()]), device);
    match buckets.pop() {
        Some(last) => buckets.push(Tensor::cat(vec![last, tail], 0)),
        None => buckets.push(tail),
    }
    buckets
}

/// Per parameter (visiting order): whether `grads` has its gradient.
pub fn has_gradient<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<bool> {
    struct Present<'a>(&'a GradientsParams, Vec<bool>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Present<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let present = self.0.get::<B::InnerBackend, D>(param.id).is_some();
            self.1.push(present);
        }
    }
    let mut present = Present(grads, Vec::new());
    module.visit(&mut present);
    present.1
}

/// Removes from `grads` the gradients of the parameters `keep` (visiting order) marks false:
/// after a reduction every parameter has one (zeros where a rank had none), and a parameter
/// no rank had a gradient for must stay as it is, as it does in a world of one.
pub fn keep_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    keep: &[bool],
) {
    struct Drop<'a>(&'a mut GradientsParams, std::slice::Iter<'a, bool>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Drop<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.1.next() == Some(&false) {
                self.0.remove::<B::InnerBackend, D>(param.id);
            }
        }
    }
    module.visit(&mut Drop(grads, keep.iter()));
}

/// The inverse of [`flatten_buckets`] (same `limit`): a gradient for every parameter, and the
/// last `tail_len` values read back to the host.
pub fn unflatten_buckets<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    buckets: &[Tensor<B::InnerBackend, 1>],
    limit: usize,
    tail_len: usize,
) -> Result<(GradientsParams, Vec<f32>), ModelError> {
    let sizes = parameter_sizes::<B, M>(module);
    let layout = plan(&sizes, limit);
    let wrong = |reason: String| ModelError::DeviceRead {
        name: "the reduced gradient buckets".into(),
        reason,
    };
    if layout.len().max(1) != buckets.len() {
        return Err(wrong(format!(
            "{} buckets for a layout of {}",
            buckets.len(),
            layout.len()
        )));
    }
    for (i, (range, bucket)) in layout.iter().zip(buckets).enumerate() {
        let last = i + 1 == layout.len();
        let expected: usize =
            sizes[range.clone()].iter().sum::<usize>() + if last { tail_len } else { 0 };
        if bucket.dims()[0] != expected {
            return Err(wrong(format!(
                "bucket {i} holds {} values, expected {expected}",
                bucket.dims()[0]
            )));
        }
    }
    // Each parameter's bucket and offset, in visiting order.
    let mut places = Vec::with_capacity(sizes.len());
    for (b, range) in layout.iter().enumerate() {
        let mut at = 0;
        for &size in &sizes[range.clone()] {
            places.push((b, at));
            at += size;
        }
    }
    struct Split<'a, B: AutodiffBackend> {
        buckets: &'a [Tensor<B::InnerBackend, 1>],
        places: std::slice::Iter<'a, (usize, usize)>,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Split<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some(&(bucket, at)) = self.places.next() else {
                return;
            };
            let shape = param.shape();
            let n = shape.num_elements();
            let grad: Tensor<B::InnerBackend, D> = self.buckets[bucket]
                .clone()
                .slice(at..at + n)
                .reshape(shape);
            self.out.register(param.id, grad);
        }
    }
    let mut split = Split::<B> {
        buckets,
        places: places.iter(),
        out: GradientsParams::new(),
    };
    module.visit(&mut split);
    let tail = match buckets.last() {
        Some(last) if tail_len > 0 => {
            let end = last.dims()[0];
            host_values(last.clone().slice(end - tail_len..end).into_data(), || {
                "the reduced loss and votes".into()
            })?
        }
        _ => Vec::new(),
    };
    Ok((split.out, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_whole_parameters_up_to_the_limit() {
        assert_eq!(plan(&[3, 3, 3], 6), vec![0..2, 2..3]);
        // A parameter over the limit gets a bucket of its own.
        assert_eq!(plan(&[2, 10, 2], 6), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan(&[10], 6), vec![0..1]);
        assert_eq!(plan(&[1, 1, 1], 100), vec![0..3]);
        assert!(plan(&[], 6).is_empty());
    }
}

#[cfg(test)]
mod round_trip {
    use burn::backend::Autodiff;
    use burn::module::Module;
    use burn_flex::Flex;

    use super::*;
    use crate::{InitModel, SimMimConfig};

    type B = Autodiff<Flex>;

    fn one_bucket(values: &[f32]) -> Tensor<Flex, 1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
    }

    #[test]
    fn buckets_carry_the_flat_layout_and_the_tail_and_split_back() {
        let config = SimMimConfig::preset("swin_micro").expect("preset");
        let device = Default::default();
        let model = config.init::<B>(0, &device).expect("model");
        let n = model.num_params();
        let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.001 - 0.5).collect();
        // One bucket holding everything is the flat layout itself.
        let (grads, _) = unflatten_buckets::<B, _>(&model, &[one_bucket(&values)], usize::MAX, 0)
            .expect("grads");
        let tail = [3.5, 1.0, 0.0];
        let limit = 20_000;
        let buckets = flatten_buckets::<B, _>(&model, grads, limit, &tail, &device);
        assert!(buckets.len() > 3, "{} buckets", buckets.len());
        let mut host = Vec::new();
        for bucket in &buckets {
            host.extend(host_values(bucket.clone().into_data(), || "bucket".into()).expect("read"));
        }
        assert_eq!(host.len(), n + tail.len());
        assert_eq!(&host[..n], &values[..]);
        assert_eq!(&host[n..], &tail[..]);

        let (back, read_tail) =
            unflatten_buckets::<B, _>(&model, &buckets, limit, tail.len()).expect("split");
        assert_eq!(read_tail, tail);
        let again = flatten_buckets::<B, _>(&model, back, usize::MAX, &[], &device);
        let again = host_values(again[0].clone().into_data(), || "bucket".into()).expect("read");
        assert_eq!(again, values);

        let err = unflatten_buckets::<B, _>(&model, &buckets, limit, 0).expect_err("tail");
        assert!(err.to_string().contains("expected"), "{err}");
    }

    #[test]
    fn gradients_no_rank_had_are_dropped_after_the_reduction() {
        let config = SimMimConfig::preset("swin_micro").expect("preset");
        let model = config.init::<B>(0, &Default::default()).expect("model");
        let n = model.num_params();
        let (mut grads, _) =
            unflatten_buckets::<B, _>(&model, &[one_bucket(&vec![0.5; n])], usize::MAX, 0)
                .expect("fits");
        let all = has_gradient::<B, _>(&model, &grads);
        assert!(all.len() > 3 && all.iter().all(|&g| g));
        let keep: Vec<bool> = (0..all.len()).map(|i| i % 3 != 1).collect();
        keep_gradients::<B, _>(&model, &mut grads, &keep);
        assert_eq!(has_gradient::<B, _>(&model, &grads), keep);
    }

    #[test]
    fn a_bucket_of_the_wrong_length_is_refused() {
        let config = SimMimConfig::preset("swin_micro").expect("preset");
        let model = config.init::<B>(0, &Default::default()).expect("model");
        let n = model.num_params();
        assert!(n > 0);
        let err =
            unflatten_buckets::<B, _>(&model, &[one_bucket(&vec![0.0; n - 1])], usize::MAX, 0)
                .expect_err("a short buffer must be refused");
        assert!(
            err.to_string().contains(&format!("{} values", n - 1)),
            "{err}"
        );
        let (grads, _) =
            unflatten_buckets::<B, _>(&model, &[one_bucket(&vec![0.5; n])], usize::MAX, 0)
                .expect("fits");
        let flat = flatten_buckets::<B, _>(&model, grads, usize::MAX, &[], &Default::default());
        let flat = host_values(flat[0].clone().into_data(), || "bucket".into()).expect("read");
        assert_eq!(flat.len(), n);
        assert!(flat.iter().all(|&v| v == 0.5));
    }
}
