use burn::backend::Autodiff;
use burn::nn::LayerNormConfig;
use burn::tensor::{activation, Distribution, Tensor};
use burn_flex::Flex;
use std::time::Instant;
type B = Autodiff<Flex>;

fn time<F: FnMut() -> f32>(name: &str, mut f: F) {
    f();
    let t = Instant::now();
    let n = 5;
    let mut s = 0.0;
    for _ in 0..n {
        s += f();
    }
    println!(
        "{name:40} {:8.2} ms  ({s:.1})",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
}

fn main() {
    let d = Default::default();
    let rows = 64 * 1024;
    let x = Tensor::<B, 2>::random([rows, 48], Distribution::Normal(0.0, 1.0), &d).require_grad();
    let h = Tensor::<B, 2>::random([rows, 192], Distribution::Normal(0.0, 1.0), &d).require_grad();
    let a = Tensor::<B, 4>::random([4096, 3, 16, 16], Distribution::Normal(0.0, 1.0), &d)
        .require_grad();
    let ln = LayerNormConfig::new(48).init::<B>(&d);
    let w = Tensor::<B, 2>::random([48, 192], Distribution::Normal(0.0, 0.1), &d).require_grad();
    time("layernorm [65536,48] fwd+bwd", || {
        let y = ln.forward(x.clone());
        let g = y.sum().backward();
        x.grad(&g).unwrap().sum().into_scalar()
    });
    time("layernorm fwd only", || {
        ln.forward(x.clone()).sum().into_scalar()
    });
    time("gelu [65536,192] fwd+bwd", || {
        let y = activation::gelu(h.clone());
        let g = y.sum().backward();
        h.grad(&g).unwrap().sum().into_scalar()
    });
    time("softmax [4096,3,16,16] fwd+bwd", || {
        let y = activation::softmax(a.clone(), 3);
        let g = (y * a.clone()).sum().backward();
        a.grad(&g).unwrap().sum().into_scalar()
    });
    time("matmul [65536,48]x[48,192] fwd+bwd", || {
        let y = x.clone().matmul(w.clone());
        let g = y.sum().backward();
        w.grad(&g).unwrap().sum().into_scalar()
    });
    time("add [65536,192] fwd+bwd", || {
        let y = h.clone() + h.clone();
        let g = y.sum().backward();
        h.grad(&g).unwrap().sum().into_scalar()
    });
    let v = Tensor::<B, 4>::random([4096, 3, 16, 16], Distribution::Normal(0.0, 1.0), &d)
        .require_grad();
    time("swap+reshape [4096,3,16,16] fwd+bwd", || {
        let y = v.clone().swap_dims(1, 2).reshape([4096 * 16, 48]);
        let g = (y.clone() * y).sum().backward();
        v.grad(&g).unwrap().sum().into_scalar()
    });
}
