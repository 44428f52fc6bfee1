// The system zlib (https://zlib.net, RFC 1950/1951), linked as libz.
#include <zlib.h>
