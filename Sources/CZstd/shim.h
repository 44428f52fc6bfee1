// The system libzstd (Debian: libzstd-dev), https://github.com/facebook/zstd, RFC 8878.
#include <zstd.h>
