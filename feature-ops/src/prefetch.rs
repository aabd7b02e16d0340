//! A cache hint for lookups whose table slots are known a little before they are read.
#![allow(unsafe_code)]

/// Asks the first-level cache for the line holding `x`.
#[inline(always)]
pub(crate) fn line<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing into the program; the address is that of
    // a live reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const T).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}
