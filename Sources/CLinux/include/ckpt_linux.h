// Linux system calls that Swift's Glibc module does not import (they sit behind
// _GNU_SOURCE): zero-copy moves between a pipe and a file.
#ifndef CKPT_LINUX_H
#define CKPT_LINUX_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// splice(2) with SPLICE_F_MOVE; offsets may be NULL for pipes. Returns bytes moved, 0 at
/// end of input, or -1 with errno set.
ssize_t ckpt_splice(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out, size_t length, int more);

/// MAP_POPULATE, for read-only mappings that are read once right away.
int ckpt_map_populate(void);

/// O_DIRECT, for outputs written once that should bypass the page cache.
int ckpt_o_direct(void);

#endif
