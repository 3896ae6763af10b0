//! The LLaMA-family forward, driven by the recipe.
