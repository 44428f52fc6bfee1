// CRC-32 (ISO-HDLC: the zlib, PNG and zip polynomial, reflected 0xEDB88320) with the
// same contract as zlib's crc32(): pass the previous result (0 to start), get the next.
#ifndef CKPT_FAST_CRC32_H
#define CKPT_FAST_CRC32_H
#include <stddef.h>
#include <stdint.h>

uint32_t ckpt_crc32(uint32_t crc, const void *data, size_t length);
/// The same without the 512-bit fold (tests: the 128-bit one on long inputs too).
uint32_t ckpt_crc32_narrow(uint32_t crc, const void *data, size_t length);

/// CRC-32C (Castagnoli, reflected 0x82F63B78) as OCDBT uses it: pass 0 to start. Uses the
/// SSE4.2 crc32 instruction when the CPU has it.
uint32_t ckpt_crc32c(uint32_t crc, const void *data, size_t length);

/// 1 if the carry-less multiply path is in use on this CPU, else 0 (zlib's table code).
int ckpt_crc32_is_accelerated(void);

#endif
