//! The allocator setting a CPU training step wants. glibc hands every freed block above its mmap
//! threshold (adaptive, at most 32 MiB) back to the kernel and trims the heap's top above 128 KiB,
//! while a step allocates and frees the same large temporaries layer after layer (loss chunks of
//! `chunk x vocab` logits, the recomputed layer's activations, gradients): each comes back as
//! fresh pages to fault in and zero, about 10% of a SmolLM2 step on 2 cores (perf,
//! docs/benchmarks.md). Keeping freed memory in the heap for reuse removes that; the cost is a
//! resident set nearer the step's high-water mark (3.1 -> 3.5 GB there; PyTorch's is 3.6 GB).

/// Keep freed memory for reuse (glibc `mallopt`: mmap threshold and trim threshold raised past
/// any tensor). Process-wide, so binaries opt in; a no-op returning false off glibc or when
/// glibc refuses the values.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc accepts mmap thresholds up to HEAP_MAX_SIZE / 2 from mallopt on some versions
        // and any value on others: ask for 1 GiB, then fall back to the documented 32 MiB.
        // SAFETY: mallopt takes two integers and changes only the allocator's parameters.
        let mmap = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1
                || libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
        };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 };
        mmap && trim
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// glibc (every Linux build machine and CI) takes both settings; a refusal would leave the
    /// training step re-faulting its temporaries, as before, and fail here.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::keep_freed_memory());
        // the heap still works: a large block freed and allocated again
        let a = vec![1u8; 64 << 20];
        drop(a);
        let b = vec![2u8; 64 << 20];
        assert_eq!(b[b.len() - 1], 2);
    }
}
