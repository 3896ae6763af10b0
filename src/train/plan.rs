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
    /// The step runs on the CPU, where f32 takes the fused kernels (src/model/cpu.rs: one pass
    /// where tensor ops keep temporaries) and AdamW updates in place.
    #[serde(default)]
    pub cpu: bool,
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
    /// The stage the peak falls in: "head", "layer" or "optimizer".
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
    // Head and loss over one chunk of positions (Llama::head_loss_backward, no graph): the
    // logits in the compute dtype, their f32 form when that is another dtype, and their f32
    // gradient; with bf16 compute the head weight's gradient in bf16 before its f32 sum. Plus the
    // gradient of the last hidden states for all positions and its concatenation.
    let chunk = (spec.micro_batch * spec.head_chunk.min(spec.seq_len).max(1)) as u64;
    let v = d.vocab as u64;
    let widen = if c == 4 { 0 } else { 4 };
    let head_grad = if c == 4 { 0 } else { c * v * h };
    let head = chunk * v * (c + 4 + widen) + head_grad + 2 * tok * h * c;
    add(
        "head and loss chunk",
        head,
        format!(
            "{chunk} positions x {v} vocab x ({c} + 4 + {widen}) B + {head_grad} B + 2 x {tok} x {h} x {c} B"
        ),
        "transient: head",
    );
    // One layer's backward (Llama::layer_backward): the layer recomputed once for the sequence,
    // then differentiated by hand; its largest of three stages. MLP: the input norm's output,
    // the residual after attention, the second norm's output and the output gradient (4 H), q
    // and attention's output (2 qd), k, v (2 kvd), gate, up and the gradients of their product,
    // gate and up (5 I), in the compute dtype, and the norms' f32 factors (8 B).
    let mlp = tok * (c * (4 * h + 2 * qd + 2 * kvd + 5 * i) + 8);
    // Attention (attend_backward): the input norm's output, the residual's gradient and the
    // output gradient (3 H), q, dO, dq's blocks and their concatenation (4 qd), k, v (2 kvd),
    // dK and dV summed in f32 and rounded (2 kvd (4 + c)), the norms' factors; plus the largest
    // query block's probabilities, dP and dS with their rounding, and the tensor ops' temporary
    // (16 B per score; 12 B where the fused CPU kernel computes dS in one pass, f32 on the CPU).
    let e = largest_block(d, spec.micro_batch, spec.seq_len, spec.query_block);
    let per_score = if spec.cpu && c == 4 { 12 } else { 16 };
    let attn = tok * (c * (3 * h + 4 * qd + 2 * kvd) + 2 * kvd * (4 + c) + 8) + per_score * e;
    // q, k, v and the input norm: their gradients as rows (qd + 2 kvd), the norm's output,
    // the residual's gradient, the output gradient, the norm's input gradient, the sum's
    // partial and the layer's input gradient (5 H).
    let qkv = tok * (c * (qd + 2 * kvd + 5 * h) + 8);
    let (layer_name, layer_bytes, layer_formula) = if attn >= mlp.max(qkv) {
        (
            "layer: attention backward (one query block)",
            attn,
            format!(
                "{tok} x (c (3 H + 4 qd + 2 kvd) + 2 kvd (4 + c) + 8) B + {e} scores of the largest block x {per_score} B"
            ),
        )
    } else if mlp >= qkv {
        (
            "layer: MLP backward",
            mlp,
            format!("{tok} x (c (4 H + 2 qd + 2 kvd + 5 I) + 8) B"),
        )
    } else {
        (
            "layer: q/k/v and norm backward",
            qkv,
            format!("{tok} x (c (qd + 2 kvd + 5 H) + 8) B"),
        )
    };
    add(layer_name, layer_bytes, layer_formula, "transient: layer");
    // The layer's weight gradients, all held until the layer's backward ends (compute dtype),
    // and the sum that adds them to the f32 accumulation: (c + 4) B per parameter of one layer.
    // Under LoRA the gradient of every adapted weight is full-size too (its merge `W + B (s A)`
    // is what the layer multiplies) and passes through the merge's graph to A and B, whose
    // product with the gradient and its backward hold two more of the largest weight.
    let (in_flight, what) = match spec.lora {
        None => {
            let lp = d.layer_parameters();
            (
                (c + 4) * lp,
                format!("({c} + 4) B x {lp} parameters of a layer"),
            )
        }
        Some(r) => {
            let adapted: u64 = d.adapted().iter().map(|(o, i)| (o * i) as u64).sum();
            let largest = d
                .adapted()
                .iter()
                .map(|(o, i)| (o * i) as u64)
                .max()
                .unwrap_or(0);
            let lp = adapter_count(d, r) + 2 * h;
            (
                c * (adapted + 2 * largest) + (c + 4) * lp,
                format!(
                    "{c} B x ({adapted} adapted + 2 x {largest}) + ({c} + 4) B x {lp} trainable of a layer"
                ),
            )
        }
    };
    add(
        "layer: its parameter gradients in flight",
        in_flight,
        what,
        "transient: layer",
    );
    // The peak is the largest of the step's stages, each holding what exists at that moment
    // (recompute.rs's order): the head's chunk comes first, with every saved layer input and no
    // layer's gradient sum yet; the backward of layer i holds the inputs of layers 0..=i and the
    // sums of the layers after it (both linear in i, so the largest is at i = L-1 or i = 0);
    // the embedding's backward and the optimizer come last, with every sum (and, off the CPU, a
    // few temporaries of the largest parameter).
    let sum_of = |stage: &str| -> u64 {
        items
            .iter()
            .filter(|x| x.stage == stage)
            .map(|x| x.bytes)
            .sum()
    };
    let constant = sum_of("persistent") - 4 * nt;
    let act = tok * h * c;
    let layer_train = match spec.lora {
        None => d.layer_parameters(),
        Some(r) => adapter_count(d, r) + 2 * h,
    };
    let layer_sums = 4 * layer_train * layers;
    let other_sums = 4 * nt - layer_sums;
    let largest = d.embedding().max(
        d.adapted()
            .iter()
            .map(|(o, i)| (o * i) as u64)
            .max()
            .unwrap_or(0),
    );
    let layer = layer_bytes + in_flight;
    // AdamW on the CPU updates weights and moments in place (a bf16 variable takes its rounded
    // copy of the master); elsewhere the tensor ops hold a few f32 temporaries of one parameter
    let optimizer_temps = match (spec.cpu, c) {
        (true, 4) => 0,
        (true, _) => c * largest,
        (false, _) => 3 * 4 * largest,
    };
    let stages = [
        ("head", constant + other_sums + (layers + 1) * act + head),
        ("layer", constant + other_sums + layers * act + layer),
        (
            "layer",
            constant + other_sums + layer_sums - 4 * layer_train + act + layer,
        ),
        ("optimizer", constant + 4 * nt + optimizer_temps),
    ];
    let (peak_stage, peak) =
        stages
            .iter()
            .copied()
            .fold(("head", 0), |best, s| if s.1 > best.1 { s } else { best });
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
