//! Position bands and the per-band metrics of a candidate against reference logits, accumulated
//! one logits row at a time (the reference is kept in memory, the candidate is streamed).
//!
//! NMSE = sum (test - ref)^2 / (n var(ref)) over every logit of the band (llama.cpp's conversion
//! checks); KL(ref || test) per position from log-softmax in f64 (`llama-perplexity
//! --kl-divergence`); top-1 agreement ("same top p"); perplexity ratio = exp(mean NLL_test -
//! mean NLL_ref) of the next token of the sequence.

use serde::Serialize;

/// A half-open range of positions `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Band {
    pub start: usize,
    pub end: usize,
}

impl Band {
    pub fn label(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Bands for `len` positions of a model with original window `c`: `[0, c)`, then each doubling
/// `[c, 2c)`, `[2c, 4c)`, ... cut at `len`; every length in `cuts` (below `len`) also ends a band.
pub fn bands(c: usize, len: usize, cuts: &[usize]) -> Vec<Band> {
    let mut ends = Vec::new();
    let c = c.max(1);
    let mut e = c;
    while e < len {
        ends.push(e);
        e = e.saturating_mul(2);
    }
    ends.extend(cuts.iter().copied().filter(|&x| x > 0 && x < len));
    ends.push(len);
    ends.sort_unstable();
    ends.dedup();
    let mut out = Vec::with_capacity(ends.len());
    let mut start = 0;
    for end in ends {
        out.push(Band { start, end });
        start = end;
    }
    out
}

/// A candidate that does not line up with the reference, or a reference too large to hold.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("the reference logits of {rows} positions x {vocab} do not fit in memory ({:.1} GB)", *rows as f64 * *vocab as f64 * 4e-9)]
    ReferenceTooLarge { rows: usize, vocab: usize },
    #[error("candidate row {pos} has {got} logits; the reference has {vocab}")]
    RowWidth {
        pos: usize,
        got: usize,
        vocab: usize,
    },
    #[error("candidate position {pos} beyond the reference")]
    BeyondReference { pos: usize },
    /// A band the candidate did not cover: a comparison that saw fewer positions than asked
    /// (or none) must not pass by having nothing to fail on.
    #[error("band {band}: the candidate gave {got} of its {want} positions")]
    Incomplete {
        band: String,
        got: usize,
        want: usize,
    },
}

/// The reference: raw logits (row-major) and each row's log-sum-exp, for one sequence.
pub struct Reference {
    pub vocab: usize,
    pub logits: Vec<f32>,
    pub lse: Vec<f64>,
}

impl Reference {
    /// Room for `rows` rows of `vocab` logits, or an error saying how much memory that needs.
    pub fn with_capacity(rows: usize, vocab: usize) -> Result<Reference, MetricsError> {
        let too_large = || MetricsError::ReferenceTooLarge { rows, vocab };
        let n = rows.checked_mul(vocab).ok_or_else(too_large)?;
        let mut logits = Vec::new();
        logits.try_reserve_exact(n).map_err(|_| too_large())?;
        Ok(Reference {
            vocab,
            logits,
            lse: Vec::with_capacity(rows),
        })
    }

    pub fn push(&mut self, row: &[f32]) {
        self.lse.push(log_sum_exp(row));
        self.logits.extend_from_slice(row);
    }

    pub fn rows(&self) -> usize {
        self.lse.len()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// `ln sum exp(x)` in f64 with the maximum subtracted.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    if !m.is_finite() {
        return m;
    }
    m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

fn argmax(x: &[f32]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Running sums of one band.
#[derive(Debug, Clone, Default)]
struct Acc {
    n: u64,
    sq_err: f64,
    ref_sum: f64,
    ref_sq: f64,
    max_abs: f64,
    kl: Vec<f64>,
    same_top: usize,
    nll_ref: f64,
    nll_test: f64,
    nll_n: usize,
    non_finite: usize,
}

/// The metrics of one band.
#[derive(Debug, Clone, Serialize)]
pub struct BandMetrics {
    pub band: Band,
    pub positions: usize,
    pub nmse: f64,
    pub max_abs_diff: f64,
    pub kld_mean: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    pub top1: f64,
    /// exp(mean NLL candidate - mean NLL reference) of the next token; 1 when no next token.
    pub ppl_ratio: f64,
    /// Rows with a NaN or infinite candidate logit.
    pub non_finite_rows: usize,
}

impl BandMetrics {
    /// A band compared with itself: no difference at any of its positions (what a comparison of
    /// a reference with itself gives, without the pass over it).
    pub fn identical(band: Band) -> BandMetrics {
        BandMetrics {
            band,
            positions: band.end.saturating_sub(band.start),
            nmse: 0.0,
            max_abs_diff: 0.0,
            kld_mean: 0.0,
            kld_p99: 0.0,
            kld_max: 0.0,
            top1: 1.0,
            ppl_ratio: 1.0,
            non_finite_rows: 0,
        }
    }
}

/// Streams candidate rows against a [`Reference`], band by band.
pub struct Comparison<'a> {
    reference: &'a Reference,
    tokens: &'a [u32],
    bands: Vec<Band>,
    acc: Vec<Acc>,
    /// KL per position (for the first bad position and the position-0 check).
    pub kl_by_position: Vec<f64>,
}

impl<'a> Comparison<'a> {
    pub fn new(reference: &'a Reference, tokens: &'a [u32], bands: Vec<Band>) -> Comparison<'a> {
        let acc = vec![Acc::default(); bands.len()];
        Comparison {
            reference,
            tokens,
            bands,
            acc,
            kl_by_position: Vec::with_capacity(reference.rows()),
        }
    }

    /// Add the candidate's logits at position `pos`.
    pub fn push(&mut self, pos: usize, row: &[f32]) -> Result<(), MetricsError> {
        let v = self.reference.vocab;
        if row.len() != v {
            return Err(MetricsError::RowWidth {
                pos,
                got: row.len(),
                vocab: v,
            });
        }
        if pos >= self.reference.rows() {
            return Err(MetricsError::BeyondReference { pos });
        }
        let Some(b) = self
            .bands
            .iter()
            .position(|b| b.start <= pos && pos < b.end)
        else {
            return Ok(());
        };
        let r = self.reference.row(pos);
        let lse_r = self.reference.lse[pos];
        let a = &mut self.acc[b];
        a.n += v as u64;
        if row.iter().any(|x| !x.is_finite()) {
            a.non_finite += 1;
            a.kl.push(f64::INFINITY);
            a.max_abs = f64::INFINITY;
            a.sq_err = f64::INFINITY;
            self.kl_by_position.push(f64::INFINITY);
            return Ok(());
        }
        let lse_t = log_sum_exp(row);
        let mut kl = 0.0;
        for (&t, &x) in row.iter().zip(r) {
            let (t, x) = (t as f64, x as f64);
            let d = t - x;
            a.sq_err += d * d;
            a.ref_sum += x;
            a.ref_sq += x * x;
            a.max_abs = a.max_abs.max(d.abs());
            let lp = x - lse_r;
            kl += lp.exp() * (lp - (t - lse_t));
        }
        let kl = kl.max(0.0);
        a.kl.push(kl);
        self.kl_by_position.push(kl);
        a.same_top += usize::from(argmax(row) == argmax(r));
        if let Some(&next) = self.tokens.get(pos + 1) {
            let next = next as usize;
            if next < v {
                a.nll_ref += lse_r - r[next] as f64;
                a.nll_test += lse_t - row[next] as f64;
                a.nll_n += 1;
            }
        }
        Ok(())
    }

    /// The metrics of every band; an error when a band saw fewer positions than it spans.
    pub fn finish(self) -> Result<Vec<BandMetrics>, MetricsError> {
        for (band, a) in self.bands.iter().zip(&self.acc) {
            let want = band.end.saturating_sub(band.start);
            if a.kl.len() < want || want == 0 {
                return Err(MetricsError::Incomplete {
                    band: band.label(),
                    got: a.kl.len(),
                    want,
                });
            }
        }
        Ok(self
            .bands
            .iter()
            .zip(self.acc)
            .map(|(band, mut a)| {
                let positions = a.kl.len();
                let n = a.n.max(1) as f64;
                let mean = a.ref_sum / n;
                let var = (a.ref_sq / n - mean * mean).max(f64::MIN_POSITIVE);
                a.kl.sort_by(|x, y| x.total_cmp(y));
                let kld_mean = if positions == 0 {
                    0.0
                } else {
                    a.kl.iter().sum::<f64>() / positions as f64
                };
                let p99 = if positions == 0 {
                    0.0
                } else {
                    let i = ((positions as f64) * 0.99).ceil() as usize;
                    a.kl[i.clamp(1, positions) - 1]
                };
                BandMetrics {
                    band: *band,
                    positions,
                    nmse: a.sq_err / n / var,
                    max_abs_diff: a.max_abs,
                    kld_mean,
                    kld_p99: p99,
                    kld_max: a.kl.last().copied().unwrap_or(0.0),
                    top1: if positions == 0 {
                        1.0
                    } else {
                        a.same_top as f64 / positions as f64
                    },
                    ppl_ratio: if a.nll_n == 0 {
                        1.0
                    } else {
                        ((a.nll_test - a.nll_ref) / a.nll_n as f64).exp()
                    },
                    non_finite_rows: a.non_finite,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_double_beyond_c() {
        let b = bands(64, 256, &[]);
        let e: Vec<(usize, usize)> = b.iter().map(|b| (b.start, b.end)).collect();
        assert_eq!(e, vec![(0, 64), (64, 128), (128, 256)]);
        let b = bands(8192, 4096, &[]);
        assert_eq!(
            b,
            vec![Band {
                start: 0,
                end: 4096
            }]
        );
        let b = bands(10, 50, &[25]);
        let e: Vec<usize> = b.iter().map(|b| b.end).collect();
        assert_eq!(e, vec![10, 20, 25, 40, 50]);
    }

    #[test]
    fn a_band_with_missing_positions_is_an_error() {
        let mut r = Reference::with_capacity(4, 2).unwrap();
        for _ in 0..4 {
            r.push(&[0.0, 1.0]);
        }
        let tokens = [0u32, 1, 0, 1];
        // bands [0, 2) and [2, 4); the candidate stops after position 2
        let mut c = Comparison::new(&r, &tokens, bands(2, 4, &[]));
        for p in 0..3 {
            c.push(p, &[0.0, 1.0]).unwrap();
        }
        let e = c.finish().unwrap_err();
        assert!(
            matches!(
                e,
                MetricsError::Incomplete {
                    got: 1,
                    want: 2,
                    ..
                }
            ),
            "{e}"
        );
        // no position at all: the first band is empty, never a pass
        let c = Comparison::new(&r, &tokens, bands(2, 4, &[]));
        assert!(matches!(
            c.finish(),
            Err(MetricsError::Incomplete { got: 0, .. })
        ));
        // every position given: metrics
        let mut c = Comparison::new(&r, &tokens, bands(2, 4, &[]));
        for p in 0..4 {
            c.push(p, &[0.0, 1.0]).unwrap();
        }
        assert_eq!(c.finish().unwrap().len(), 2);
    }

    #[test]
    fn metrics_match_hand_values() {
        // two positions, vocab 2: reference logits (0, 0) -> p = (1/2, 1/2)
        let mut r = Reference::with_capacity(2, 2).unwrap();
        r.push(&[0.0, 0.0]);
        r.push(&[1.0, -1.0]);
        let tokens = [0u32, 1];
        let mut c = Comparison::new(&r, &tokens, bands(1, 2, &[]));
        c.push(0, &[0.0, 2.0_f32.ln()]).unwrap();
        c.push(1, &[1.0, -1.0]).unwrap();
        let m = c.finish().unwrap();
        // KL((1/2,1/2) || (1/3,2/3)) = 1/2 ln(3/2) + 1/2 ln(3/4)
        let kl = 0.5 * (1.5f64).ln() + 0.5 * (0.75f64).ln();
        assert!((m[0].kld_mean - kl).abs() < 1e-6, "{}", m[0].kld_mean);
        // NMSE of band 0: err (ln 2)^2 / 2 over var 0 -> guarded; band 1 exact
        assert_eq!(m[1].nmse, 0.0);
        assert_eq!(m[1].kld_mean, 0.0);
        assert!((m[0].max_abs_diff - 2f64.ln()).abs() < 1e-6);
        // next token 1 at position 0: NLL ref ln 2, test ln 3 - ln 2 (p = 2/3)
        let want = ((3f64 / 2.0).ln() - 2f64.ln()).exp();
        assert!((m[0].ppl_ratio - want).abs() < 1e-6);
        assert_eq!(m[0].top1, 0.0);
        assert_eq!(m[1].top1, 1.0);
    }
}
