// Function multi-versioning for hot CPU loops: the function is compiled for the baseline and for
// x86-64-v3 (AVX2 + FMA), and the loader picks the best one for the running CPU. Put it on
// non-template, non-inline functions only (GCC's target_clones rule).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTDIFFINST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// Also AVX-512 (x86-64-v4): for loops that gain from its 32 vector registers.
#define FASTDIFFINST_CPU_CLONES_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDIFFINST_CPU_CLONES
#define FASTDIFFINST_CPU_CLONES_AVX512
#endif

// Callees of a clone are inlined into it (and so compiled for its ISA) only when forced.
#if defined(__GNUC__)
#define FASTDIFFINST_FORCE_INLINE inline __attribute__((always_inline))
#else
#define FASTDIFFINST_FORCE_INLINE inline
#endif
