// The attention loops (attention_kernels.inc) for the baseline x86-64 (SSE2; on other architectures, the
// compiler's default target): the table isa.h's select_table falls back to.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention_kernels.h"
#include "isa.h"

#define FD_ATTN_TABLE attention_kernels_baseline
#include "attention_kernels.inc"
