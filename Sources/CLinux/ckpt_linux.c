#define _GNU_SOURCE
#include "ckpt_linux.h"
#include <fcntl.h>
#include <sys/mman.h>

ssize_t ckpt_splice(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out, size_t length, int more) {
#ifdef __linux__
    loff_t in = off_in ? *off_in : 0, out = off_out ? *off_out : 0;
    ssize_t n = splice(fd_in, off_in ? &in : NULL, fd_out, off_out ? &out : NULL, length,
                       SPLICE_F_MOVE | (more ? SPLICE_F_MORE : 0));
    if (n > 0) {
        if (off_in) *off_in = in;
        if (off_out) *off_out = out;
    }
    return n;
#else
    (void)fd_in; (void)off_in; (void)fd_out; (void)off_out; (void)length; (void)more;
    return -1;
#endif
}

int ckpt_map_populate(void) {
#ifdef MAP_POPULATE
    return MAP_POPULATE;
#else
    return 0;
#endif
}

int ckpt_o_direct(void) {
#ifdef O_DIRECT
    return O_DIRECT;
#else
    return 0;
#endif
}
