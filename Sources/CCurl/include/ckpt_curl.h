// libcurl, loaded at run time (dlopen of libcurl.so.4) so the tools stay free of a link-time
// dependency on it: local files never need it, and the packaged binary runs where it is absent
// (reading a URL then says what to install). Only the few calls ckpt makes are wrapped; the
// option and info numbers are libcurl's stable ABI (curl/curl.h, CURLOPT_* and CURLINFO_*).
#ifndef CKPT_CURL_H
#define CKPT_CURL_H
#include <stddef.h>

/// Loads libcurl once (thread-safe). Returns 0, or -1 with a message in `error`.
int ckpt_curl_load(char *error, size_t error_length);

/// The loaded library's version text ("libcurl/7.88.1 OpenSSL/3.0.15 ..."), or "".
const char *ckpt_curl_version(void);

/// What one GET delivered. The body of a 2xx reply goes to `buffer` (at most `capacity` bytes:
/// more aborts the transfer and sets `overflow`); any other reply's body is dropped. `headers`
/// holds the last response's header lines (after redirects), NUL-terminated; a line that does
/// not fit is left out whole and `headers_truncated` set.
typedef struct {
    long status;
    size_t received;
    int overflow;
    int curl_code;
    char curl_error[256];
    char headers[16384];
    size_t headers_length;
    int headers_truncated;
} ckpt_http_result;

/// `result->headers` (Swift does not import a C array this long).
const char *ckpt_http_result_headers(const ckpt_http_result *result);

/// An easy handle (its connection is reused by later requests on it), or NULL.
void *ckpt_http_handle_new(void);
void ckpt_http_handle_free(void *handle);

/// GET `url` with the extra request lines `header_lines` ("Name: value", `header_count` of
/// them), following redirects (custom Authorization goes to the first host only, libcurl's
/// rule), into `buffer`. Returns curl's code (0: a reply arrived, whatever its status).
int ckpt_http_get(void *handle, const char *url, const char *const *header_lines, int header_count,
                  void *buffer, size_t capacity, long connect_timeout_seconds, long low_speed_seconds,
                  ckpt_http_result *result);

#endif
