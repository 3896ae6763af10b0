//! The human report: metadata issues, then one table per backend (bands x metrics, PASS/FAIL),
//! the two verdicts and the diagnosis.

use std::fmt::Write;

use super::run::{BackendResult, VerifyReport};

fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if !x.is_finite() {
        format!("{x}")
    } else {
        format!("{x:.2e}")
    }
}

/// Render `r` as text.
pub fn render(r: &VerifyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "reference  {} ({})", r.reference.display(), r.recipe);
    let _ = writeln!(
        s,
        "gguf       {} ({}, {} parameters; runs as {})",
        r.gguf.display(),
        r.file_type,
        r.parameters,
        r.runtime_recipe.as_deref().unwrap_or("unreadable")
    );
    let l = &r.lines;
    let line = |name: &str, v: Option<f64>| v.map(|x| format!("{name} {}", sci(x)));
    let parts: Vec<String> = [
        line("NMSE <", l.max_nmse),
        line("KLD <", l.max_kld),
        l.min_top1.map(|x| format!("top-1 >= {:.1}%", x * 100.0)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let _ = writeln!(
        s,
        "lines      {} ({} tier): {}",
        l.class.name(),
        l.tier,
        parts.join(", ")
    );
    let _ = writeln!(
        s,
        "tokens     {} over {} positions; original window c = {}",
        r.tokens, r.length, r.original_context
    );
    for n in &r.notes {
        let _ = writeln!(s, "note       {n}");
    }
    if r.metadata.is_empty() {
        let _ = writeln!(s, "metadata   PASS");
    } else {
        let _ = writeln!(s, "metadata   FAIL");
        for i in &r.metadata {
            let _ = writeln!(s, "  - {}: {}", i.key, i.message);
        }
    }
    if r.weights.pass {
        let _ = writeln!(
            s,
            "weights    PASS ({} tensors within {} x a plain quantization to their types)",
            r.weights.tensors.len(),
            super::weights::WEIGHT_FACTOR
        );
    } else {
        let _ = writeln!(s, "weights    FAIL");
        for t in r.weights.failures() {
            let _ = writeln!(
                s,
                "  - {} ({}): differs from the checkpoint by {:.3} (relative RMS; line {:.3}, \
                 plain {} {:.3}){}",
                t.tensor,
                t.ggml_type,
                t.rel_error,
                t.line,
                t.ggml_type,
                t.plain_rel_error,
                t.finding
                    .as_deref()
                    .map(|f| format!(": {f}"))
                    .unwrap_or_default()
            );
        }
    }
    for u in &r.weights.unchecked {
        let _ = writeln!(s, "  unchecked: {u}");
    }
    if let Some(p) = &r.plain_quantization {
        let _ = writeln!(
            s,
            "plain      a plain quantization to the same types costs KLD {} within c (our forward)",
            sci(p[0].kld_mean)
        );
    }
    for g in &r.approximation {
        let _ = writeln!(s, "approx     {g}");
    }
    if let Some(eff) = &r.approximation_effect {
        let _ = writeln!(
            s,
            "  effect of the approximation (runtime form vs exact recipe):"
        );
        for m in eff {
            let _ = writeln!(
                s,
                "  {:>13}  NMSE {}  KLD {}  top-1 {:.1}%  ppl x{:.4}",
                m.band.label(),
                sci(m.nmse),
                sci(m.kld_mean),
                m.top1 * 100.0,
                m.ppl_ratio
            );
        }
    }
    for b in &r.backends {
        render_backend(&mut s, b);
    }
    let _ = writeln!(s, "\n{}", if r.pass { "PASS" } else { "FAIL" });
    s
}

/// One table of bands: metrics and verdict per band.
fn render_bands(
    s: &mut String,
    title: &str,
    bands: &[super::run::BandResult],
    reading: Option<&[super::BandMetrics]>,
) {
    let _ = writeln!(
        s,
        "  {title}\n  {:>13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>9}  verdict",
        "band",
        "NMSE",
        "max|d|",
        "KLD mean",
        "KLD p99",
        "KLD max",
        "top-1",
        "PPL x",
        if reading.is_some() { "reading" } else { "" }
    );
    for (i, band) in bands.iter().enumerate() {
        let r = reading
            .and_then(|r| r.get(i))
            .map(|r| sci(r.kld_mean))
            .unwrap_or_default();
        let m = &band.metrics;
        let failed: Vec<&str> = band
            .checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.metric)
            .collect();
        let verdict = if band.checks.is_empty() {
            "(reported)".to_string()
        } else if band.pass {
            "PASS".to_string()
        } else {
            format!("FAIL ({})", failed.join(", "))
        };
        let _ = writeln!(
            s,
            "  {:>13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6.1}% {:>8.4} {:>9}  {}{}",
            m.band.label(),
            sci(m.nmse),
            sci(m.max_abs_diff),
            sci(m.kld_mean),
            sci(m.kld_p99),
            sci(m.kld_max),
            m.top1 * 100.0,
            m.ppl_ratio,
            r,
            if band.within_original { "" } else { ">c " },
            verdict
        );
    }
}

/// One backend's band tables, verdicts and diagnosis.
fn render_backend(s: &mut String, b: &BackendResult) {
    let _ = writeln!(s, "\n{} ({:.1} s)", b.backend, b.seconds);
    render_bands(s, "fidelity: against the checkpoint", &b.bands, None);
    render_bands(
        s,
        &format!(
            "consistency: against our forward of the file's own weights with the reference \
             recipe{}; reading: KLD against what its keys say",
            if b.rounding.iter().any(|r| r.kld_mean > 0.0 || r.nmse > 0.0) {
                format!(
                    ", activations rounded as it rounds them (cost within c: KLD {})",
                    sci(b.rounding[0].kld_mean)
                )
            } else {
                String::new()
            }
        ),
        &b.consistency,
        Some(&b.reading),
    );
    let _ = writeln!(
        s,
        "  arithmetic: against our f32 forward of the same weights within c, KLD {} (NMSE {})",
        sci(b.arithmetic.kld_mean),
        sci(b.arithmetic.nmse)
    );
    let pf = |p: bool| if p { "PASS" } else { "FAIL" };
    let _ = writeln!(
        s,
        "  fidelity {}   runtime {}   long-context {}   (KLD at position 0: {}; first bad \
         position: {})",
        pf(b.fidelity_pass),
        pf(b.runtime_pass),
        pf(b.long_context_pass),
        sci(b.kld_position0),
        b.first_bad_position
            .map_or("none".to_string(), |p| p.to_string())
    );
    for d in &b.diagnosis {
        let _ = writeln!(s, "  diagnosis: {d}");
    }
}
