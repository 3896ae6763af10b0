//! Kernels compiled for the CPU they run on. The crate targets baseline x86-64 (SSE2), where
//! `f32::round` is a libm call and loops use 4-lane registers; a kernel body inlined into a
//! function with wider features enabled is compiled for them, and the widest one the CPU has is
//! picked at run time (the first listed that it reports).

/// `for_cpu!(fn name<T: Bound>(a: A, b: B) -> R = body; ["avx512f", "avx2"]);` defines `name`,
/// which calls `body` (an `#[inline(always)]` function of the same arguments) compiled with the
/// first listed feature the CPU has, else as built. A body whose operations round exactly as
/// their scalar forms (IEEE add, mul, div, sqrt, round; Rust never fuses multiply-adds) gives
/// the same bits in every variant.
macro_rules! for_cpu {
    ($(#[$doc:meta])* $vis:vis fn $name:ident $(<$g:ident: $bound:path>)?
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident; [$($feat:tt),+ $(,)?]) => {
        $(#[$doc])*
        $vis fn $name $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            $crate::simd::for_cpu!(@try [$($feat),+] fn $(<$g: $bound>)? ($($arg: $ty),*)
                $(-> $ret)? = $body);
            $body($($arg),*)
        }
    };
    // one feature's test and call, then the next features'
    (@try [$feat:tt $(, $rest:tt)*] fn $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),*)
        $(-> $ret:ty)? = $body:ident) => {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!($feat) {
            #[target_feature(enable = $feat)]
            fn wide $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                $body($($arg),*)
            }
            // SAFETY: the CPU has the feature `wide` is compiled for (checked above)
            return unsafe { wide($($arg),*) };
        }
        $crate::simd::for_cpu!(@try [$($rest),*] fn $(<$g: $bound>)? ($($arg: $ty),*)
            $(-> $ret)? = $body);
    };
    (@try [] fn $($_:tt)*) => {};
}

pub(crate) use for_cpu;
