//! The model card (`README.md` of a release): the recipe in words, how to run it in llama.cpp,
//! and one row per file, every number taken from the manifest (so the card and `release.json`
//! cannot disagree).

use std::fmt::Write;

use super::manifest::{BackendSummary, FileEntry, Manifest, Summary};
use crate::rope::{Recipe, RopeMethod, ScaleLaw};

/// The recipe as a sentence a user can check against the paper or the config.
pub fn recipe_in_words(r: &Recipe) -> String {
    let c = r.original_context;
    let rope = match r.method {
        RopeMethod::Default => format!("plain RoPE with base {}", r.rope_base),
        RopeMethod::Abf => format!("RoPE base raised to {} (ABF)", r.rope_base),
        RopeMethod::Linear => format!("position interpolation by {} (linear)", r.factor),
        RopeMethod::Ntk => format!("NTK-aware base scaling by {}", r.factor),
        RopeMethod::Dynamic => format!("dynamic NTK scaling up to {}", r.factor),
        RopeMethod::Yarn => format!("YaRN, factor {}", r.factor),
        RopeMethod::NtkByParts => format!("NTK-by-parts, factor {}", r.factor),
        RopeMethod::Llama3 => format!("Llama 3 frequency bands, factor {}", r.factor),
        #[allow(unreachable_patterns)]
        _ => r.method.name().to_string(),
    };
    let law = match r.scale_law {
        ScaleLaw::None => String::new(),
        ScaleLaw::Log => format!(
            "; attention logits scaled by max(1, ln(p + 1) / ln {c}){}",
            exempt(r.skip_layers)
        ),
        ScaleLaw::Step { beta, length } => format!(
            "; attention logits scaled by 1 + {beta:.6} ln(1 + floor(p / {length})){}",
            exempt(r.skip_layers)
        ),
    };
    format!(
        "{rope}{law}; pretrained window {c} tokens, extended to {} tokens",
        r.context
    )
}

fn exempt(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => ", layer 0 exempt".into(),
        n => format!(", layers 0-{} exempt", n - 1),
    }
}

fn cells(s: Option<&Summary>) -> [String; 3] {
    match s {
        Some(s) => [
            format!("{:.3e}", s.kld),
            format!("{:.2}%", s.top1 * 100.0),
            format!("{:.4}", s.ppl_ratio),
        ],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

/// The backend whose numbers the table shows: llama.cpp when it was run (what users run).
pub fn shown(f: &FileEntry) -> Option<&BackendSummary> {
    f.backends
        .iter()
        .find(|b| b.backend == "llama.cpp")
        .or_else(|| f.backends.first())
}

/// The whole card.
pub fn render(m: &Manifest) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {} (GGUF)\n", m.name);
    let _ = writeln!(
        s,
        "{} with {}. Converted, quantized and verified by abf {} from `{}`.\n",
        m.name, m.recipe, m.abf_version, m.source
    );
    let _ = writeln!(s, "## Run it in llama.cpp\n");
    let first = m
        .files
        .iter()
        .find(|f| f.pass)
        .or(m.files.first())
        .and_then(|f| f.files.first())
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "```\nllama-cli -m {first} -c {ctx}\nllama-server -m {first} -c {ctx}\n```\n",
        ctx = m.context
    );
    let _ = writeln!(
        s,
        "`-c {}` uses the extended window. The files carry the rope base and scaling in their \
         metadata, so no `--rope-*` flag is needed (one would override them). A split set is \
         loaded from its first part.\n",
        m.context
    );
    let _ = writeln!(s, "## Files\n");
    let _ = writeln!(
        s,
        "Against the full-precision checkpoint, {} over {} positions; within the original window \
         (< {}) and beyond it.\n",
        m.verified_tokens, m.verified_length, m.original_context
    );
    let _ = writeln!(
        s,
        "| file | type | size (MB) | bits/weight | KLD < c | top-1 < c | PPL x < c | KLD > c | \
         top-1 > c | PPL x > c | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for f in &m.files {
        let b = shown(f);
        let [k0, t0, p0] = cells(b.and_then(|b| b.within.as_ref()));
        let [k1, t1, p1] = cells(b.and_then(|b| b.beyond.as_ref()));
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} | {k0} | {t0} | {p0} | {k1} | {t1} | {p1} | {} |",
            f.files.join(", "),
            f.outtype,
            f.bytes as f64 / 1e6,
            f.bits_per_weight,
            if f.pass { "PASS" } else { "FAIL" }
        );
    }
    let backend = m
        .files
        .first()
        .and_then(shown)
        .map(|b| b.backend.clone())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "\nNumbers from the {backend} run; `release.json` has every backend's. KLD is the mean \
         KL divergence of the file's next-token distribution from the checkpoint's, top-1 the \
         share of positions with the same most likely token, PPL x the perplexity ratio."
    );
    let failed: Vec<&FileEntry> = m.files.iter().filter(|f| !f.pass).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed verification\n");
        for f in failed {
            let _ = writeln!(s, "- {} ({}):", f.files.join(", "), f.outtype);
            for x in &f.findings {
                let _ = writeln!(s, "  - {x}");
            }
        }
    }
    let _ = writeln!(
        s,
        "\n## Verification\n\nEvery file was run by llama.cpp and by abf's reading of it and \
         compared with the checkpoint and with the file's own weights under the recipe \
         (`abf-verify`, docs/verifier.md): the runtime must compute the recipe beyond the \
         original window, and each type must cost no more than its line.{}\n\n`SHA256SUMS` \
         lists every file's SHA-256 (`sha256sum -c SHA256SUMS`).",
        match &m.imatrix {
            Some(i) => format!(" Quantized with the importance matrix `{i}`."),
            None => String::new(),
        }
    );
    s
}
