//! Fused CPU kernels (f32, contiguous) for the position-wise pieces of a layer's backward:
//! RMSNorm forward and backward, SwiGLU forward and backward. Each is one pass over the rows on
//! every core, where the same function as candle tensor ops is a chain of whole-tensor ops, each
//! allocating and streaming the tensor once more. Every kernel returns None when a tensor is not
//! a contiguous CPU f32 one; the caller then takes the tensor-op form ([`super::grad`]), which
//! the unit tests there compare these with.

use candle_core::{DType, Result, Tensor, WithDType};
use rayon::prelude::*;

/// Run `f` on a contiguous CPU tensor's elements in place (no copy); None when the tensor is on
/// another device, of another dtype or not contiguous.
pub(crate) fn on_cpu_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != T::DTYPE {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    let all = cpu.as_slice::<T>().ok()?;
    Some(f(all.get(start..end)?))
}

/// Element types whose CPU storage [`on_cpu_slice_mut`] can hand out mutably.
pub(crate) trait MutElem: WithDType {
    fn storage_mut(s: &mut candle_core::CpuStorage) -> Option<&mut [Self]>;
}

impl MutElem for f32 {
    fn storage_mut(s: &mut candle_core::CpuStorage) -> Option<&mut [f32]> {
        match s {
            candle_core::CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl MutElem for half::bf16 {
    fn storage_mut(s: &mut candle_core::CpuStorage) -> Option<&mut [half::bf16]> {
        match s {
            candle_core::CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

/// Run `f` on a contiguous CPU tensor's elements mutably, in place, under the storage's write
/// lock (candle's in-place op); None, with `f` not called, as for [`on_cpu_slice`]. Every tensor
/// sharing the storage sees the change: for state the caller owns (AdamW's weights and moments),
/// where a fresh tensor per update cost an allocation, its page faults and a copy.
pub(crate) fn on_cpu_slice_mut<T: MutElem, R>(
    t: &Tensor,
    f: impl FnOnce(&mut [T]) -> R,
) -> Option<R> {
    use std::cell::RefCell;
    struct Op<T, F, R> {
        f: RefCell<Option<F>>,
        out: RefCell<Option<R>>,
        elem: std::marker::PhantomData<T>,
    }
    impl<T: MutElem, R, F: FnOnce(&mut [T]) -> R> candle_core::InplaceOp1 for Op<T, F, R> {
        fn name(&self) -> &'static str {
            "on-cpu-slice-mut"
        }
        fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
            let slice = l
                .contiguous_offsets()
                .and_then(|(a, b)| T::storage_mut(s)?.get_mut(a..b));
            if let (Some(slice), Some(f)) = (slice, self.f.borrow_mut().take()) {
                *self.out.borrow_mut() = Some(f(slice));
            }
            Ok(())
        }
    }
    if !t.device().is_cpu() || t.dtype() != T::DTYPE || !t.is_contiguous() {
        return None;
    }
    let op = Op {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
        elem: std::marker::PhantomData::<T>,
    };
    t.inplace_op1(&op).ok()?;
    op.out.into_inner()
}

/// Whether any two of the CPU tensors share a storage buffer (each checked under its own read
/// lock, one at a time): nested [`on_cpu_slice_mut`] calls on two views of one storage would
/// wait on their own lock. True also when a tensor is not on the CPU.
pub(crate) fn any_shared_storage(ts: &[&Tensor]) -> bool {
    let mut addrs = Vec::with_capacity(ts.len());
    for t in ts {
        let (storage, _) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return true;
        };
        let addr = match cpu {
            candle_core::CpuStorage::F32(v) => v.as_ptr() as usize,
            candle_core::CpuStorage::BF16(v) => v.as_ptr() as usize,
            candle_core::CpuStorage::F64(v) => v.as_ptr() as usize,
            _ => return true,
        };
        if addrs.contains(&addr) {
            return true;
        }
        addrs.push(addr);
    }
    false
}

/// Whether every tensor is a contiguous CPU f32 tensor.
fn usable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// Rows handed to one task: about 16k elements, so small tensors stay on few threads.
fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

/// Elements per task of element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;

/// `sum a_j b_j` in eight f32 lanes (vectorizes; the order differs from a serial sum only by
/// rounding).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn tensor(v: Vec<f32>, like: &Tensor, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, dims, like.device())
}

/// RMSNorm `y = x r w`, `r = 1 / sqrt(mean(x^2) + eps)` over the last dimension: `(y, r)` with `r`
/// shaped as `x` with a last dimension of 1.
pub(crate) fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Option<Result<(Tensor, Tensor)>> {
    if !usable(&[x, w]) {
        return None;
    }
    let h = *x.dims().last()?;
    if h == 0 || w.elem_count() != h {
        return None;
    }
    let rows = x.elem_count() / h;
    let rpt = rows_per_task(h);
    let (mut y, mut r) = (vec![0f32; rows * h], vec![0f32; rows]);
    on_cpu_slice::<f32, _>(x, |xs| {
        on_cpu_slice::<f32, _>(w, |ws| {
            y.par_chunks_mut(h * rpt)
                .zip(r.par_chunks_mut(rpt))
                .zip(xs.par_chunks(h * rpt))
                .for_each(|((yc, rc), xc)| {
                    for ((yr, rr), xr) in yc.chunks_mut(h).zip(rc.iter_mut()).zip(xc.chunks(h)) {
                        let inv = 1.0 / (dot(xr, xr) / h as f32 + eps as f32).sqrt();
                        *rr = inv;
                        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(ws) {
                            *yv = xv * inv * wv;
                        }
                    }
                })
        })
    })??;
    let mut rdims = x.dims().to_vec();
    *rdims.last_mut()? = 1;
    Some(tensor(y, x, x.dims()).and_then(|y| Ok((y, tensor(r, x, &rdims)?))))
}

/// RMSNorm's backward plus a residual gradient: for `y = x r w` and output gradient `dy`,
/// `dx = add + r (dy w) - x r^3 mean(dy w x)`, `dw = sum over rows of dy x r` (section "How a
/// layer's backward is computed" in docs/training.md derives it).
pub(crate) fn rms_backward(
    dy: &Tensor,
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    add: &Tensor,
) -> Option<Result<(Tensor, Tensor)>> {
    if !usable(&[dy, x, r, w, add]) {
        return None;
    }
    let h = *x.dims().last()?;
    let rows = x.elem_count() / h.max(1);
    let sizes_ok = h > 0
        && w.elem_count() == h
        && r.elem_count() == rows
        && dy.elem_count() == x.elem_count()
        && add.elem_count() == x.elem_count();
    if !sizes_ok {
        return None;
    }
    let rpt = rows_per_task(h);
    let mut dx = vec![0f32; rows * h];
    let dw = on_cpu_slice::<f32, _>(dy, |dys| {
        on_cpu_slice::<f32, _>(x, |xs| {
            on_cpu_slice::<f32, _>(r, |rs| {
                on_cpu_slice::<f32, _>(w, |ws| {
                    on_cpu_slice::<f32, _>(add, |adds| {
                        dx.par_chunks_mut(h * rpt)
                            .zip(dys.par_chunks(h * rpt))
                            .zip(xs.par_chunks(h * rpt))
                            .zip(rs.par_chunks(rpt))
                            .zip(adds.par_chunks(h * rpt))
                            .map(|((((dxc, dyc), xc), rc), ac)| {
                                let mut dw = vec![0f32; h];
                                let mut g = vec![0f32; h];
                                for ((((dxr, dyr), xr), &ri), ar) in dxc
                                    .chunks_mut(h)
                                    .zip(dyc.chunks(h))
                                    .zip(xc.chunks(h))
                                    .zip(rc)
                                    .zip(ac.chunks(h))
                                {
                                    for ((gv, &d), &wv) in g.iter_mut().zip(dyr).zip(ws) {
                                        *gv = d * wv;
                                    }
                                    let c = ri * ri * ri * dot(&g, xr) / h as f32;
                                    for j in 0..h {
                                        dxr[j] = ar[j] + ri * g[j] - c * xr[j];
                                        dw[j] += dyr[j] * xr[j] * ri;
                                    }
                                }
                                dw
                            })
                            .reduce(
                                || vec![0f32; h],
                                |mut a, b| {
                                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                                    a
                                },
                            )
                    })
                })
            })
        })
    })?????;
    Some(tensor(dx, x, x.dims()).and_then(|dx| Ok((dx, tensor(dw, x, &[h])?))))
}

/// `silu(x) = x / (1 + e^-x)`, as candle computes it.
#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU's product `silu(g) u`.
pub(crate) fn swiglu(g: &Tensor, u: &Tensor) -> Option<Result<Tensor>> {
    if !usable(&[g, u]) || g.dims() != u.dims() {
        return None;
    }
    let mut m = vec![0f32; g.elem_count()];
    on_cpu_slice::<f32, _>(g, |gs| {
        on_cpu_slice::<f32, _>(u, |us| {
            m.par_chunks_mut(ELEMS_PER_TASK)
                .zip(gs.par_chunks(ELEMS_PER_TASK))
                .zip(us.par_chunks(ELEMS_PER_TASK))
                .for_each(|((mc, gc), uc)| {
                    for ((mv, &gv), &uv) in mc.iter_mut().zip(gc).zip(uc) {
                        *mv = silu(gv) * uv;
                    }
                })
        })
    })??;
    Some(tensor(m, g, g.dims()))
}

/// SwiGLU's backward: for `m = silu(g) u` and `dm`, `du = dm silu(g)` and
/// `dg = dm u s (1 + g (1 - s))` with `s` the logistic sigmoid of `g`.
pub(crate) fn swiglu_backward(
    dm: &Tensor,
    g: &Tensor,
    u: &Tensor,
) -> Option<Result<(Tensor, Tensor)>> {
    if !usable(&[dm, g, u]) || g.dims() != u.dims() || dm.dims() != g.dims() {
        return None;
    }
    let n = g.elem_count();
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    on_cpu_slice::<f32, _>(dm, |dms| {
        on_cpu_slice::<f32, _>(g, |gs| {
            on_cpu_slice::<f32, _>(u, |us| {
                dg.par_chunks_mut(ELEMS_PER_TASK)
                    .zip(du.par_chunks_mut(ELEMS_PER_TASK))
                    .zip(dms.par_chunks(ELEMS_PER_TASK))
                    .zip(gs.par_chunks(ELEMS_PER_TASK))
                    .zip(us.par_chunks(ELEMS_PER_TASK))
                    .for_each(|((((dgc, duc), dmc), gc), uc)| {
                        for i in 0..dgc.len() {
                            let (gv, d) = (gc[i], dmc[i]);
                            let s = 1.0 / (1.0 + (-gv).exp());
                            duc[i] = d * gv * s;
                            dgc[i] = d * uc[i] * s * (1.0 + gv * (1.0 - s));
                        }
                    })
            })
        })
    })???;
    Some(tensor(dg, g, g.dims()).and_then(|dg| Ok((dg, tensor(du, g, g.dims())?))))
}

/// Causal softmax of one attention block's raw scores `s` (`[b, heads, qb, qe]`, query rows
/// `qs .. qs + qb` against keys `0 .. qe`): `p = softmax(s * scale)` over the keys each row sees
/// (key `j <= qs + row`), 0 after them. One pass, and no exponentials of masked entries, where the
/// tensor-op form scales, adds a mask of `-inf` and takes the softmax of the whole row.
pub(crate) fn causal_softmax(s: &Tensor, scale: f64, qs: usize) -> Option<Result<Tensor>> {
    if !usable(&[s]) {
        return None;
    }
    let (_, _, qb, qe) = s.dims4().ok()?;
    if qe < qs + qb || qe == 0 {
        return None;
    }
    let scale = scale as f32;
    let rpt = rows_per_task(qe);
    let mut p = vec![0f32; s.elem_count()];
    on_cpu_slice::<f32, _>(s, |ss| {
        p.par_chunks_mut(qe * rpt)
            .zip(ss.par_chunks(qe * rpt))
            .enumerate()
            .for_each(|(task, (pc, sc))| {
                for (k, (pr, sr)) in pc.chunks_mut(qe).zip(sc.chunks(qe)).enumerate() {
                    let seen = qs + (task * rpt + k) % qb + 1;
                    let (pr, sr) = (&mut pr[..seen], &sr[..seen]);
                    let m = sr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
                    let mut z = 0f32;
                    for (pv, &sv) in pr.iter_mut().zip(sr) {
                        *pv = (sv * scale - m).exp();
                        z += *pv;
                    }
                    let inv = 1.0 / z;
                    pr.iter_mut().for_each(|v| *v *= inv);
                }
            })
    })?;
    Some(tensor(p, s, s.dims()))
}

/// Softmax's backward for one attention block, with the score scale: for probabilities `p` and
/// their gradient `dp` (both `[.., keys]`), `ds = scale p (dp - sum_j dp_j p_j)` row by row
/// (FlashAttention's `dS`, Dao et al. 2022, alg. 4). One pass where tensor ops take five.
pub(crate) fn softmax_backward(p: &Tensor, dp: &Tensor, scale: f64) -> Option<Result<Tensor>> {
    if !usable(&[p, dp]) || p.dims() != dp.dims() {
        return None;
    }
    let w = *p.dims().last()?;
    if w == 0 {
        return None;
    }
    let scale = scale as f32;
    let rpt = rows_per_task(w);
    let mut ds = vec![0f32; p.elem_count()];
    on_cpu_slice::<f32, _>(p, |ps| {
        on_cpu_slice::<f32, _>(dp, |dps| {
            ds.par_chunks_mut(w * rpt)
                .zip(ps.par_chunks(w * rpt))
                .zip(dps.par_chunks(w * rpt))
                .for_each(|((dc, pc), gc)| {
                    for ((dr, pr), gr) in dc.chunks_mut(w).zip(pc.chunks(w)).zip(gc.chunks(w)) {
                        let row = dot(pr, gr);
                        for ((d, &pv), &gv) in dr.iter_mut().zip(pr).zip(gr) {
                            *d = scale * pv * (gv - row);
                        }
                    }
                })
        })
    })??;
    Some(tensor(ds, p, p.dims()))
}

/// The masked next-token loss of a chunk of logits and its gradient in one pass per row: for
/// logits `l` (`[rows, vocab]`), targets `t` and mask `w` (`[rows]`), the loss
/// `scale sum_r w_r (logsumexp(l_r) - l_r[t_r])` (summed in f64) and
/// `dl_r = scale w_r (softmax(l_r) - onehot(t_r))`. Rows with mask 0 get a zero gradient and no
/// exponentials. None as the other kernels, or when a target is outside the vocabulary.
pub(crate) fn masked_nll_backward(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Option<Result<(Tensor, f64)>> {
    if !usable(&[logits, mask]) || !targets.device().is_cpu() || !targets.is_contiguous() {
        return None;
    }
    let (rows, vocab) = logits.dims2().ok()?;
    if targets.elem_count() != rows || mask.elem_count() != rows || vocab == 0 {
        return None;
    }
    let mut grad = vec![0f32; rows * vocab];
    let loss = on_cpu_slice::<f32, _>(logits, |ls| {
        on_cpu_slice::<u32, _>(targets, |ts| {
            on_cpu_slice::<f32, _>(mask, |ms| {
                if ts.iter().any(|&t| t as usize >= vocab) {
                    return None;
                }
                Some(
                    grad.par_chunks_mut(vocab)
                        .zip(ls.par_chunks(vocab))
                        .zip(ts.par_iter().zip(ms.par_iter()))
                        .map(|((gr, lr), (&t, &w))| {
                            if w == 0.0 {
                                return 0f64;
                            }
                            let m = lr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                            let mut z = 0f64;
                            for (g, &l) in gr.iter_mut().zip(lr) {
                                *g = (l - m).exp();
                                z += *g as f64;
                            }
                            let k = (scale * w as f64 / z) as f32;
                            gr.iter_mut().for_each(|g| *g *= k);
                            gr[t as usize] -= (scale * w as f64) as f32;
                            scale * w as f64 * (z.ln() + (m - lr[t as usize]) as f64)
                        })
                        .sum::<f64>(),
                )
            })
        })
    })????;
    Some(tensor(grad, logits, &[rows, vocab]).map(|g| (g, loss)))
}
