#pragma once
// The target attributes of kiln's x86 kernels. Each kernel is compiled for its ISA through a function attribute, so
// the rest of kiln stays baseline x86-64, and runs only where the dispatch found that ISA: best_matmul_isa()
// (matmul.h) for AVX2 (with FMA and F16C) and AVX-512 (F and BW on top), plus a feature check for VNNI and BF16.
// One definition per level keeps every kernel's feature set equal to the check that dispatches to it.
#define KILN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KILN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define KILN_TARGET_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define KILN_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))
