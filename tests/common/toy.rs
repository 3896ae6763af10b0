//! A toy layered model for the recomputation tests (tests/train_*.rs).

use candle_core::{DType, Device, Tensor};

/// A toy decoder for the recomputation tests: `embed` is a table lookup, layer `i` is
/// `x + tanh(x W_i) * s_i` with a position-dependent factor (like a logit scale), `head` is a
/// projection. Weights come from a VarBuilder like the real model's.
pub struct Toy {
    pub emb: Tensor,
    pub ws: Vec<Tensor>,
    pub out: Tensor,
}

impl Toy {
    pub fn names(layers: usize) -> Vec<String> {
        let mut n = vec!["emb".to_string(), "out".to_string()];
        n.extend((0..layers).map(|i| format!("w{i}")));
        n
    }

    pub fn random(
        vocab: usize,
        hidden: usize,
        layers: usize,
        dtype: DType,
        seed: u64,
    ) -> Vec<(String, Tensor)> {
        let mut rng = super::rng::Rng::new(seed);
        let mut rand = |shape: (usize, usize), s: f64| {
            let v: Vec<f64> = (0..shape.0 * shape.1).map(|_| rng.uniform() * s).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let mut out = vec![
            ("emb".to_string(), rand((vocab, hidden), 1.0)),
            ("out".to_string(), rand((vocab, hidden), 0.5)),
        ];
        for i in 0..layers {
            out.push((format!("w{i}"), rand((hidden, hidden), 0.7)));
        }
        out
    }

    pub fn load(
        vb: candle_nn::VarBuilder,
        vocab: usize,
        hidden: usize,
        layers: usize,
    ) -> candle_core::Result<Toy> {
        Ok(Toy {
            emb: vb.get((vocab, hidden), "emb")?,
            out: vb.get((vocab, hidden), "out")?,
            ws: (0..layers)
                .map(|i| vb.get((hidden, hidden), &format!("w{i}")))
                .collect::<candle_core::Result<_>>()?,
        })
    }
}

impl abf::train::LayerModel for Toy {
    fn num_layers(&self) -> usize {
        self.ws.len()
    }
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))
    }
    fn layer(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = x.dim(1)?;
        let scale: Vec<f64> = (0..t).map(|p| 1.0 + 0.1 * (p as f64 + 1.0).ln()).collect();
        let scale = Tensor::from_vec(scale, (1, t, 1), x.device())?.to_dtype(x.dtype())?;
        let h = x
            .broadcast_matmul(&self.ws[i])?
            .tanh()?
            .broadcast_mul(&scale)?;
        x + h
    }
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.out.t()?)
    }
}

/// Every value of `t`, as f64, flattened.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
