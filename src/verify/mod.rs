//! The logits verifier: reference against candidate, by position band.
