#include "ckpt_build_info.h"

#ifndef CKPT_COMMIT
#define CKPT_COMMIT ""
#endif

const char *ckpt_build_commit(void) { return CKPT_COMMIT; }
