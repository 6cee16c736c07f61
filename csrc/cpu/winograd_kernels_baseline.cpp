// The Winograd transforms (winograd_kernels.inc) for the baseline x86-64 (SSE2; on other architectures,
// the compiler's default target): the table isa.h's select_table falls back to.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "winograd_kernels.h"

#define FD_WINOGRAD_TABLE transform_kernels_baseline
#include "winograd_kernels.inc"
