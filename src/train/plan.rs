//! What a fine-tuning step will hold in memory, predicted from the model's shape and the run's
//! options before anything is loaded (`abf-tune --plan`).
//!
//! Each item is a count of the tensors the trainer keeps (src/train/recompute.rs, the layer
//! pieces of `Llama::layer_backward`, `attend_backward`), times their dtype's size. The peak is
//! the persistent state (weights, gradients, AdamW moments), the saved layer inputs, and the
//! larger of the two transient stages: the head/loss chunk, or one layer's recomputation with one
//! attention block's scores. It predicts the bytes the tensors occupy: checked against the peak
//! of bytes allocated by real CPU steps, counted by a global allocator (tests/train_plan.rs,
//! docs/training.md, which also gives the resident set: glibc keeps freed blocks of up to 32 MiB
//! for reuse, so a CPU process's RSS is that much above). On a GPU candle allocates each tensor
//! from the driver, so the prediction is the device memory in use, plus the CUDA context.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::DType;
use serde::Serialize;

use crate::checkpoint::ModelConfig;

/// The dimensions the memory of a step depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tied: bool,
}

impl From<&ModelConfig> for Dims {
    fn from(c: &ModelConfig) -> Dims {
        Dims {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            tied: c.tie_word_embeddings,
        }
    }
}

impl Dims {
    /// Weights of one decoder layer that LoRA adapts (q, k, v, o, gate, up, down): `(out, in)`.
    fn adapted(&self) -> [(usize, usize); 7] {
        let (h, i) = (self.hidden, self.intermediate);
        let (qd, kvd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [(qd, h), (kvd, h), (kvd, h), (h, qd), (i, h), (i, h), (h, i)]
    }

    fn layer_parameters(&self) -> u64 {
        self.adapted()
            .iter()
            .map(|(o, i)| (o * i) as u64)
            .sum::<u64>()
            + 2 * self.hidden as u64
    }

    fn embedding(&self) -> u64 {
        (self.vocab * self.hidden) as u64
    }

    /// Every parameter (the head counted once when tied).
    pub fn parameters(&self) -> u64 {
        let head = if self.tied { 0 } else { self.embedding() };
        self.embedding() + self.layers as u64 * self.layer_parameters() + self.hidden as u64 + head
    }

    /// Trainable parameters: all, or with LoRA rank `r` the adapters plus embeddings and norms
    /// (the head only when tied, as `ParamSet::lora` does).
    pub fn trainable(&self, lora: Option<usize>) -> u64 {
        match lora {
            None => self.parameters(),
            Some(r) => {
                let adapters: u64 = self
                    .adapted()
                    .iter()
                    .map(|(o, i)| (r * (o + i)) as u64)
                    .sum();
                let norms = (2 * self.layers + 1) as u64 * self.hidden as u64;
                self.layers as u64 * adapters + self.embedding() + norms
            }
        }
    }

    /// Weights LoRA adapts, all layers.
    fn adapted_parameters(&self) -> u64 {
        self.layers as u64
            * self
                .adapted()
                .iter()
                .map(|(o, i)| (o * i) as u64)
                .sum::<u64>()
    }
}

/// A step to plan for.
#[derive(Debug, Clone, Serialize)]
pub struct MemorySpec {
    pub dims: Dims,
    pub seq_len: usize,
    pub micro_batch: usize,
    /// Compute dtype (f32 or bf16); master weights and AdamW moments are f32 whatever it is.
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    pub lora: Option<usize>,
    /// Query rows per attention block.
    pub query_block: usize,
    /// Positions per head/loss chunk.
    pub head_chunk: usize,
    /// Memory the process or device context holds before any tensor (bytes).
    pub baseline: u64,
    /// AdamW's moments in bf16 (`--optimizer-states bf16`) instead of f32.
    #[serde(default)]
    pub bf16_moments: bool,
}

fn ser_dtype<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// The resident set of the trainer process before any tensor, measured on CPU (binary, thread
/// stacks, allocator arenas): 10 MB for a 64-token step of the tiny shape.
pub const CPU_BASELINE: u64 = 10_000_000;

/// One line of the prediction.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryItem {
    pub name: &'static str,
    pub bytes: u64,
    /// The count, in words.
    pub formula: String,
    /// Which part of the peak it belongs to: "persistent", "activations", "transient: head" or
    /// "transient: layer".
    pub stage: &'static str,
}

/// The prediction: the items and the peak they add up to.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub spec: MemorySpec,
    pub parameters: u64,
    pub trainable_parameters: u64,
    pub items: Vec<MemoryItem>,
    /// Which transient stage is the larger: "head" or "layer".
    pub peak_stage: &'static str,
    pub peak_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub fits: Option<bool>,
}

/// Score elements of the largest query block: `batch x heads x rows x keys`, keys `0 .. end`.
pub fn largest_block(dims: &Dims, batch: usize, seq: usize, block: usize) -> u64 {
    let best = crate::model::query_blocks(seq, block)
        .map(|(qs, qb)| (qb * (qs + qb)) as u64)
        .max()
        .unwrap_or(0);
    best * (batch * dims.heads) as u64
}

/// Predict the peak memory of a training step (layer-wise recomputation, attention rebuilt per
/// query block in the backward, AdamW with f32 moments, steady state: the moments exist).
pub fn plan_memory(spec: &MemorySpec, budget: Option<u64>) -> MemoryPlan {
    let d = &spec.dims;
    let c = spec.dtype.size_in_bytes() as u64;
    let n = d.parameters();
    let nt = d.trainable(spec.lora);
    let tok = (spec.micro_batch * spec.seq_len) as u64;
    let (h, i) = (d.hidden as u64, d.intermediate as u64);
    let (qd, kvd) = (
        (d.heads * d.head_dim) as u64,
        (d.kv_heads * d.head_dim) as u64,
    );
    let mut items = Vec::new();
    let mut add = |name, bytes, formula: String, stage| {
        items.push(MemoryItem {
            name,
            bytes,
            formula,
            stage,
        })
    };
    let dt = spec.dtype.as_str();
    // Persistent state.
    match spec.lora {
        None if c == 4 => add(
            "weights (f32, their own masters)",
            4 * n,
            format!("4 B x {n} parameters"),
            "persistent",
        ),
        None => {
            add(
                "compute weights",
                c * n,
                format!("{c} B ({dt}) x {n} parameters"),
                "persistent",
            );
            add(
                "f32 master weights",
                4 * n,
                format!("4 B x {n}"),
                "persistent",
            );
        }
        Some(r) => {
            let frozen = n - (nt - d.layers as u64 * adapter_count(d, r));
            add(
                "frozen weights",
                c * frozen,
                format!("{c} B ({dt}) x {frozen}"),
                "persistent",
            );
            let masters = if c == 4 { 4 * nt } else { (c + 4) * nt };
            add(
                "trainable weights and masters",
                masters,
                format!("{} B x {nt} trainable", masters / nt.max(1)),
                "persistent",
            );
            let adapted = d.adapted_parameters();
            // weight_map builds W + B (s A) for every adapted weight each step, and the graph
            // keeps B (s A) and the sum.
            add(
                "LoRA merged weights (B sA and W + B sA; all layers)",
                2 * c * adapted,
                format!("2 x {c} B x {adapted} adapted"),
                "persistent",
            );
        }
    }
    add(
        "gradient sums (f32)",
        4 * nt,
        format!("4 B x {nt} trainable"),
        "persistent",
    );
    let (mb, mdt) = if spec.bf16_moments {
        (4, "bf16")
    } else {
        (8, "f32")
    };
    add(
        if spec.bf16_moments {
            "AdamW moments m, v (bf16)"
        } else {
            "AdamW moments m, v (f32)"
        },
        mb * nt,
        format!("{mb} B ({mdt}, two) x {nt} trainable"),
        "persistent",
    );
    add(
        "process / device context",
        spec.baseline,
        "measured before any tensor".into(),
        "persistent",
    );
    // Saved layer inputs: the embedding output and every layer's output.
    let layers = d.layers as u64;
    add(
        "saved layer inputs",
        (layers + 1) * tok * h * c,
        format!("({} layers + 1) x {tok} tokens x {h} x {c} B", d.layers),
        "activations",
    );
    // Head and loss over one chunk of positions. Kept by the graph: the logits (compute dtype;
    // their f32 form is the same tensor in f32), the max-shifted logits and exp; the backward's
    // gradients of exp, shifted and logits, each summed into a zero tensor (2 more), and the
    // gradient of the detached max's broadcast, which candle stores and never frees: 9 x 4 B per
    // logit. Plus the gradient of the last hidden states for all positions and its concatenation.
    let chunk = (spec.micro_batch * spec.head_chunk.min(spec.seq_len).max(1)) as u64;
    let v = d.vocab as u64;
    let head = chunk * v * (c + 8 * 4) + 2 * tok * h * 4;
    add(
        "head and loss chunk",
        head,
        format!("{chunk} positions x {v} vocab x ({c} + 8 x 4) B + 2 x {tok} x {h} x 4 B"),
        "transient: head",
    );
    // One layer's backward (Llama::layer_backward), in chunks of `n` positions. Whole-sequence
    // tensors at the attention backward: q, k, v, dO, the MLP piece's input gradient, dq's blocks
    // and their concatenation (c (4 qd + 2 kvd + H)), dK and dV accumulated in f32 and rounded
    // (4 + c per element of k and v); plus the largest query block's scores: probabilities,
    // dP and two products in f32 (4 x 4 B, attend_backward).
    let rows = (spec.micro_batch * spec.query_block.min(spec.seq_len).max(1)) as u64;
    let e = largest_block(d, spec.micro_batch, spec.seq_len, spec.query_block);
    let attn = tok * (c * (4 * qd + 2 * kvd + h) + 2 * kvd * (4 + c)) + 16 * e;
    // The MLP piece: q, k, v and attention's output for the sequence, the gradients collected so
    // far and their concatenation (c (4 qd + 2 kvd + 2 H)); one chunk's graph: kept, the
    // attention output (a variable and its transposed copy), projection, residual, the f32 norm's
    // square, scaled and weighted forms, gate, silu, up, product, down, sum, the product with
    // the gradient (11 H-wide, 4 I-wide); in its backward, silu's derivative and the gradients
    // of gate, up and product with their zero-initialised sums (8 I-wide): 4 B x (11 H + 2 qd +
    // 12 I) per position in f32.
    let norm = if c == 4 { 0 } else { c * h };
    let mlp = tok * c * (4 * qd + 2 * kvd + 2 * h) + rows * (4 * (11 * h + 2 * qd + 12 * i) + norm);
    // The q/k/v piece: dq, dk, dv and the input gradients (c (qd + 2 kvd + 3 H)); one chunk's
    // graph: the input, the norm's three f32 forms, q, k, v, v made contiguous, RoPE's four
    // products, two sums and concatenation for q and k, the logit scale's product, and the
    // products with dq, dk, dv; its backward's norm and projection gradients:
    // 4 B x (8 H + 9 qd + 9 kvd) per position in f32.
    let qkv = tok * c * (qd + 2 * kvd + 3 * h) + rows * (4 * (8 * h + 9 * qd + 9 * kvd) + norm);
    let (layer_name, layer_bytes, layer_formula) = if attn >= mlp.max(qkv) {
        (
            "layer: attention backward (one query block)",
            attn,
            format!(
                "{tok} x (c (4 qd + 2 kvd + H) + 2 kvd (4 + c)) B + {e} scores of the largest block x 16 B"
            ),
        )
    } else if mlp >= qkv {
        (
            "layer: MLP piece (one chunk's graph)",
            mlp,
            format!(
                "{tok} x c (4 qd + 2 kvd + 2 H) B + {rows} positions x 4 B x (11 H + 2 qd + 12 I)"
            ),
        )
    } else {
        (
            "layer: q/k/v piece (one chunk's graph)",
            qkv,
            format!(
                "{tok} x c (qd + 2 kvd + 3 H) B + {rows} positions x 4 B x (8 H + 9 qd + 9 kvd)"
            ),
        )
    };
    add(layer_name, layer_bytes, layer_formula, "transient: layer");
    // The layer's parameter gradients as candle returns them (compute dtype) and the sum that
    // adds them to the f32 accumulation: (c + 4) B per parameter of one layer.
    let lp = match spec.lora {
        None => d.layer_parameters(),
        Some(r) => adapter_count(d, r) + 2 * h,
    };
    add(
        "layer: its parameter gradients in flight",
        (c + 4) * lp,
        format!("({c} + 4) B x {lp} parameters of a layer"),
        "transient: layer",
    );
    let persistent: u64 = items
        .iter()
        .filter(|x| x.stage == "persistent" || x.stage == "activations")
        .map(|x| x.bytes)
        .sum();
    let layer = layer_bytes + (c + 4) * lp;
    let (peak_stage, transient) = if head >= layer {
        ("head", head)
    } else {
        ("layer", layer)
    };
    let peak = persistent + transient;
    MemoryPlan {
        spec: spec.clone(),
        parameters: n,
        trainable_parameters: nt,
        items,
        peak_stage,
        peak_bytes: peak,
        budget_bytes: budget,
        fits: budget.map(|b| peak <= b),
    }
}

fn adapter_count(d: &Dims, r: usize) -> u64 {
    d.adapted().iter().map(|(o, i)| (r * (o + i)) as u64).sum()
}

/// Parse a byte size: `141G`, `512M`, `80GB`, `1.5T`, or plain bytes (powers of 1000: GPU cards
/// are sold in GB).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let digits = upper.trim_end_matches('B');
    let (num, mult) = match digits.chars().last() {
        Some('K') => (&digits[..digits.len() - 1], 1e3),
        Some('M') => (&digits[..digits.len() - 1], 1e6),
        Some('G') => (&digits[..digits.len() - 1], 1e9),
        Some('T') => (&digits[..digits.len() - 1], 1e12),
        _ => (digits, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 141G, 512M)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a size (e.g. 141G, 512M)"));
    }
    Ok((v * mult).round() as u64)
}

/// A global allocator that counts the bytes a process has allocated and their peak: what
/// [`plan_memory`] predicts (the tensors' bytes), apart from what glibc keeps resident for reuse.
/// A binary opts in with `#[global_allocator] static A: AllocCounter = AllocCounter;`
/// (examples/step_bench.rs, tests/train_plan.rs); every call goes to the system allocator.
pub struct AllocCounter;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl AllocCounter {
    /// The most bytes allocated at once so far (0 where the counter is not the global allocator).
    pub fn peak() -> usize {
        PEAK.load(Ordering::Relaxed)
    }
}

fn grew(n: usize) {
    let now = ALLOCATED.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for AllocCounter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) };
        ALLOCATED.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as above.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            ALLOCATED.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}
