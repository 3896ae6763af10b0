//! Long-context evaluation: perplexity by position, passkey, attention entropy.
